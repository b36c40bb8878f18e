"""GPU-only checks (skipped without CUDA): flash-attn vs SDPA inside tg.attend, compiled vs eager forward and
backward, fused (CUDA) vs unfused (CPU) optimizer step, bf16 Newton-Schulz, a tiny end-to-end run on CUDA against
the same run on CPU, and the full-size random-init artifact under the 16 MB cap."""
import contextlib
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_run  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = torch.device("cuda")


@contextlib.contextmanager
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def tiny_cfg(tg, **kw):
    base = dict(vocab_size=320, num_layers=3, model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=16,
                ve_layers=(1, 2), xsa_last_n=2, bigram_vocab_size=64, bigram_dim=32, ve_dim=32, train_seq_len=64,
                compile=False)
    base.update(kw)
    cfg = dataclasses.replace(tg.Config(), **base)
    cfg.validate()
    return cfg


def randomized(tg, cfg, seed=0):
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.ndim >= 2 else 0.1) + (1.0 if p.ndim < 2 else 0.0))
    return model


def reference_attention(q, k, v):
    """Plain fp32 causal GQA attention on (B,T,H,D) / (B,T,Hkv,D)."""
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / D ** 0.5
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool, device=q.device), 1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", s.softmax(-1), v.float())


def qkv(dtype, B=2, T=256, H=8, Hkv=4, D=64, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(B, T, h, D, device=DEV, generator=g).to(dtype) for h in (H, Hkv, Hkv)]


def test_sdpa_path_matches_reference(tg, monkeypatch):
    monkeypatch.setattr(tg, "_fa3", None)
    monkeypatch.setattr(tg, "_fa2", None)
    assert tg.attention_backend(DEV) == "sdpa"
    with no_tf32():
        q, k, v = qkv(torch.float32)
        torch.testing.assert_close(tg.attend(q, k, v), reference_attention(q, k, v), rtol=1e-4, atol=1e-4)
    q, k, v = qkv(torch.bfloat16)
    torch.testing.assert_close(tg.attend(q, k, v).float(), reference_attention(q, k, v), rtol=2e-2, atol=2e-2)


def test_flash_attn_matches_sdpa(tg, monkeypatch):
    if tg._fa3 is None and tg._fa2 is None:
        pytest.skip("neither flash-attn 3 nor flash-attn 2 is installed")
    assert tg.attention_backend(DEV) in ("flash_attn_3", "flash_attn_2")
    q, k, v = qkv(torch.bfloat16, T=512)
    fa = tg.attend(q, k, v)
    assert fa.shape == q.shape and fa.dtype == torch.bfloat16
    monkeypatch.setattr(tg, "_fa3", None)
    monkeypatch.setattr(tg, "_fa2", None)
    sdpa = tg.attend(q, k, v)
    torch.testing.assert_close(fa.float(), sdpa.float(), rtol=2e-2, atol=2e-2)
    ref = reference_attention(q, k, v)
    assert (fa.float() - ref).abs().max() < 3e-2 and (sdpa.float() - ref).abs().max() < 3e-2


def test_compiled_matches_eager(tg):
    cfg = tiny_cfg(tg)
    model = randomized(tg, cfg).to(DEV)
    g = torch.Generator(device=DEV).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (4, 64), device=DEV, generator=g)
    tgt = torch.randint(0, cfg.vocab_size, (4, 64), device=DEV, generator=g)
    with no_tf32():
        model.eval()
        with torch.no_grad():
            eager = model.forward_hidden(ids)
            comp = torch.compile(model.forward_hidden, dynamic=False)(ids)
        torch.testing.assert_close(comp, eager, rtol=1e-3, atol=1e-3)
    # the training forward and backward under bf16 autocast, as train() runs them
    model.train()
    rt = tg.Runtime(device=DEV, amp=True, compile=True)
    fwd = tg.maybe_compile(model, rt)
    losses, grads = [], []
    for f in (model, fwd):
        model.zero_grad(set_to_none=True)
        with tg.amp_ctx(rt):
            loss = f(ids, tgt)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    cos = F.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.99, cos


def test_fused_adam_and_muon_on_cuda_match_cpu(tg):
    """Two optimizer steps from the same weights and batch: fused AdamW + fp32 Muon on CUDA vs CPU. Compared on the
    update (after - before): Adam's first steps are ~lr*sign(g), so an element whose gradient is at the noise level
    may legitimately differ; the banks' Muon updates are dense and must match closely."""
    cfg = tiny_cfg(tg)
    init = {k: v.clone() for k, v in randomized(tg, cfg).state_dict().items()}
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    updates = []
    with no_tf32():
        for dev in (torch.device("cpu"), DEV):
            model = tg.GPT(cfg).to(dev)
            model.load_state_dict(init)
            rt = tg.Runtime(device=dev, amp=False)
            opt = tg.Optimizers(model, cfg, rt)
            assert opt.adam.defaults["fused"] is (dev.type == "cuda")
            model.train()
            for _ in range(2):
                opt.zero_grad()
                model(ids.to(dev), ids.roll(-1, 1).to(dev)).backward()
                opt.set_schedule(1.0, 0)
                opt.step()
            updates.append({k: v.detach().cpu() - init[k] for k, v in model.state_dict().items()})
    cpu, gpu = updates
    for bank in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"):
        torch.testing.assert_close(gpu[bank], cpu[bank], rtol=1e-3, atol=1e-5, msg=bank)
    a = torch.cat([v.flatten() for v in cpu.values()])
    b = torch.cat([v.flatten() for v in gpu.values()])
    assert F.cosine_similarity(a, b, dim=0) > 0.999
    assert ((a - b).abs() > 1e-3).float().mean() < 1e-3


def test_newton_schulz_bf16_on_cuda(tg):
    g = torch.Generator(device=DEV).manual_seed(3)
    G = torch.randn(4, 512, 1536, device=DEV, generator=g)
    with no_tf32():
        a = tg.newton_schulz(G, 5, torch.float32)
    b = tg.newton_schulz(G, 5, torch.bfloat16)
    assert b.dtype == torch.float32 and b.shape == G.shape
    sv = torch.linalg.svdvals(b.double())
    assert sv.min() > 0.5 and sv.max() < 1.5
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_tiny_run_on_cuda_matches_cpu(tg, tmp_path):
    data, tok = tiny_run.make_tiny_data(tmp_path / "data", tg)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = tg.run(tiny_run.tiny_env(data, tok, tmp_path / "cpu", RUN_ID="cpu"))
    finally:
        torch.set_num_threads(n)
    gpu = tg.run(tiny_run.tiny_env(data, tok, tmp_path / "gpu", RUN_ID="gpu", DEVICE="cuda", AMP="1", COMPILE="0"))
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert gpu["val_tokens"] == cpu["val_tokens"] and gpu["val_bytes"] == cpu["val_bytes"]
    assert list(gpu["stages"]) == list(cpu["stages"])
    for name, st in cpu["stages"].items():  # bf16 autocast vs fp32: close, not equal
        assert gpu["stages"][name]["val_bpb"] == pytest.approx(st["val_bpb"], rel=2e-2), name
    assert gpu["fits"] and gpu["peak_memory_mb"] > 0
    # EVAL_ONLY on CUDA reads the artifact written on CUDA back
    again = tg.run(tiny_run.tiny_env(data, tok, tmp_path / "gpu2", RUN_ID="gpu2", DEVICE="cuda", AMP="1",
                                     EVAL_ONLY="1", LOAD_ARTIFACT=gpu["artifact"]))
    for name in ("roundtrip", "sliding", "ttt"):
        assert again["stages"][name]["val_bpb"] == pytest.approx(gpu["stages"][name]["val_bpb"], rel=1e-3), name


def test_full_size_random_init_artifact_fits(tg, monkeypatch):
    """The competition model at init, exported: code + artifact under 16,000,000 bytes (~10.6 MB measured).
    Only one compressor is run (zstd-22 ~ 15-35 s; brotli-11 on 27 MB takes minutes): pack_artifact keeps the
    smallest candidate, so the real artifact is never larger than this one."""
    cfg = tg.Config()
    torch.manual_seed(cfg.seed)
    with torch.device(DEV):
        model = tg.GPT(cfg)
    assert tg.count_params(model) == 26_928_220
    every = tg._compressors()
    one = "zstd" if "zstd" in every else "lzma"
    monkeypatch.setattr(tg, "_compressors", lambda: {one: every[one]})
    blob, method, sizes, _ = tg.export_model(model.cpu(), cfg)
    assert method == one
    total = len(blob) + tg.code_bytes()
    assert total <= 16_000_000, f"{total} bytes ({method}, candidates {sizes})"
