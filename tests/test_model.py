"""Model and optimizer math: parameter count, the forward/head split, causality, banking, Newton-Schulz, the
optimizer's parameter groups. Tiny configs on CPU (fp32), except the parameter count, which builds the
competition model on the meta device (shapes only, no init cost)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(tg, **kw):
    base = dict(vocab_size=64, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8, ve_layers=(1, 2),
                xsa_last_n=1, bigram_vocab_size=32, bigram_dim=8, ve_dim=8, train_seq_len=16, compile=False)
    base.update(kw)
    cfg = dataclasses.replace(tg.Config(), **base)
    cfg.validate()
    return cfg


def randomized(tg, cfg, seed=0):
    """A GPT whose every parameter is random (the init zeroes out-proj and MLP-down, which would hide bugs)."""
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim >= 2 else 1.0) + (1.0 if p.ndim < 2 else 0.0))
    return model.eval()


# ---- parameter count ----
def test_param_count_competition_preset_is_the_seeds(tg):
    cfg = tg.Config.from_env({"PRESET": "competition"})
    with torch.device("meta"):
        model = tg.GPT(cfg)
    assert tg.count_params(model) == 26_928_220
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["qo_bank"] == (22, 512, 512)
    assert shapes["kv_bank"] == (22, 256, 512)
    assert shapes["mlp_up_bank"] == (11, 1536, 512)
    assert shapes["mlp_down_bank"] == (11, 512, 1536)
    assert shapes["bigram.embed.weight"] == (1536, 128)
    assert shapes["ve_shared.embed.weight"] == (1024, 128)
    assert shapes["skip_weights"] == (5, 512)


def test_cpu_preset_is_the_reference_model(tg):
    """At the CPU preset VE_DIM equals the KV width (128): no VE projection, as the reference, whose CPU copy has
    2,986,772 parameters at these shapes (../shared/anchors/README.md)."""
    model = tg.GPT(tg.Config.from_env({"PRESET": "cpu"}))
    assert tg.count_params(model) == 2_986_772
    assert isinstance(model.ve_shared.proj, torch.nn.Identity) and isinstance(model.bigram.proj, torch.nn.Linear)


def test_param_count_formula_on_tiny_configs(tg):
    for kw in (dict(), dict(tie_embeddings=False), dict(bigram_vocab_size=0), dict(ve_enabled=False),
               dict(ve_dim=16, bigram_dim=32)):  # equal widths: no projection (the reference's rule)
        cfg = tiny_cfg(tg, **kw)
        L, D, V, kv, M = cfg.num_layers, cfg.model_dim, cfg.vocab_size, cfg.num_kv_heads * cfg.head_dim, cfg.mlp_dim
        n = V * D + D + min(L // 2, L - L // 2) * D  # tok_emb, smear, skip_weights
        n += 2 * L * D * D + 2 * L * kv * D + 2 * L * M * D  # banks
        n += L * (cfg.num_heads + 4 * D)  # q_gain, attn/mlp scales, resid_mix
        if cfg.bigram_vocab_size:
            n += cfg.bigram_vocab_size * cfg.bigram_dim + cfg.bigram_dim * D * (cfg.bigram_dim != D) + 1
        if cfg.ve_enabled and cfg.ve_layers:
            n += V * cfg.ve_dim + cfg.ve_dim * kv * (cfg.ve_dim != kv) + 1 + len(cfg.ve_layers)
        if not cfg.tie_embeddings:
            n += V * D
        assert tg.count_params(tg.GPT(cfg)) == n, kw


# ---- forward = head(trunk) ----
@pytest.mark.parametrize("tie", [True, False])
def test_forward_is_cross_entropy_of_compute_logits_of_forward_hidden(tg, tie):
    cfg = tiny_cfg(tg, tie_embeddings=tie)
    model = randomized(tg, cfg)
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (3, 16))
    tgt = torch.randint(0, cfg.vocab_size, (3, 16))
    with torch.no_grad():
        h = model.forward_hidden(ids)
        logits = model.compute_logits(h)
        loss = model(ids, tgt)
    assert h.shape == (3, 16, cfg.model_dim)
    assert logits.shape == (3, 16, cfg.vocab_size) and logits.dtype == torch.float32
    ref = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tgt.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)  # softcap_nll's 2c*sigmoid(2z/c) form: to rounding
    # the head is softcap(raw_logits), raw_logits is linear in h, and |logits| < softcap
    raw = model.raw_logits(h)
    torch.testing.assert_close(logits, cfg.logit_softcap * torch.tanh(raw / cfg.logit_softcap))
    torch.testing.assert_close(model.raw_logits(2 * h - 0.5 * h), 1.5 * raw, rtol=1e-5, atol=1e-5)
    assert logits.abs().max() < cfg.logit_softcap
    # the final hidden state is RMS-normalised
    torch.testing.assert_close(h.pow(2).mean(-1), torch.ones(3, 16), rtol=1e-4, atol=1e-4)


def test_forward_hidden_is_causal(tg):
    cfg = tiny_cfg(tg)
    model = randomized(tg, cfg)
    torch.manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        h = model.forward_hidden(ids)
        for t in (1, 7, 15):
            ids2 = ids.clone()
            ids2[:, t:] = torch.randint(0, cfg.vocab_size, ids2[:, t:].shape)
            ids2[:, t] = (ids[:, t] + 1) % cfg.vocab_size
            h2 = model.forward_hidden(ids2)
            torch.testing.assert_close(h2[:, :t], h[:, :t], rtol=0, atol=1e-6)
            assert (h2[:, t] - h[:, t]).abs().max() > 1e-4  # the changed token itself matters


def test_forward_hidden_rows_are_independent_and_deterministic(tg):
    cfg = tiny_cfg(tg)
    model = randomized(tg, cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = model.forward_hidden(ids)
        torch.testing.assert_close(model.forward_hidden(ids), h, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_hidden(ids[2:3]), h[2:3], rtol=1e-5, atol=1e-5)


def test_qat_fake_quant_only_in_training_and_is_straight_through(tg):
    cfg = tiny_cfg(tg)
    model = randomized(tg, cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model.forward_hidden(ids)
        model.qat = True
        torch.testing.assert_close(model.forward_hidden(ids), ref, rtol=0, atol=0)  # eval: no fake quant
        model.train()
        assert (model.forward_hidden(ids) - ref).abs().max() > 1e-5  # training: banks on the int6 grid
    w = torch.randn(5, 40, requires_grad=True)
    wq = tg.fake_quant_int6(w)
    s = w.detach().abs().amax(-1, keepdim=True) / 31
    k = wq.detach() / s
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
    assert k.abs().max() <= 31 + 1e-4
    wq.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w))  # straight-through


def test_init_matches_reference(tg):
    cfg = tiny_cfg(tg)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    L = cfg.num_layers
    assert torch.count_nonzero(model.qo_bank[L:]) == 0  # out-proj zero
    assert torch.count_nonzero(model.mlp_down_bank) == 0
    assert torch.count_nonzero(model.bigram.embed.weight) == 0
    for w in (model.qo_bank[0], model.kv_bank[0], model.kv_bank[L], model.bigram.proj.weight):
        r, c = w.shape
        g = w @ w.T if r <= c else w.T @ w
        torch.testing.assert_close(g, torch.eye(min(r, c)), rtol=0, atol=1e-5)


# ---- banks ----
def test_unbank_rebank_roundtrip(tg):
    cfg = tiny_cfg(tg)
    model = randomized(tg, cfg)
    sd = model.state_dict()
    L = cfg.num_layers
    flat = tg.unbank(sd, L)
    for bank in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"):
        assert bank not in flat
    for i in range(L):
        assert torch.equal(flat[f"blocks.{i}.attn.c_q.weight"], sd["qo_bank"][i])
        assert torch.equal(flat[f"blocks.{i}.attn.proj.weight"], sd["qo_bank"][L + i])
        assert torch.equal(flat[f"blocks.{i}.attn.c_k.weight"], sd["kv_bank"][i])
        assert torch.equal(flat[f"blocks.{i}.attn.c_v.weight"], sd["kv_bank"][L + i])
        assert torch.equal(flat[f"blocks.{i}.mlp.fc.weight"], sd["mlp_up_bank"][i])
        assert torch.equal(flat[f"blocks.{i}.mlp.proj.weight"], sd["mlp_down_bank"][i])
    n_mats = sum(1 for k in flat if ".attn." in k or ".mlp." in k)
    assert n_mats == 6 * L
    back = tg.rebank(flat, L)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    model2 = tg.GPT(cfg)
    model2.load_state_dict(back, strict=True)


def test_unbank_names_competition(tg):
    cfg = tg.Config()
    with torch.device("meta"):
        sd = tg.GPT(cfg).state_dict()
    flat = tg.unbank(sd, cfg.num_layers)
    assert sum(1 for k in flat if ".attn." in k or ".mlp." in k) == 66
    assert tuple(flat["blocks.10.mlp.fc.weight"].shape) == (1536, 512)
    assert tuple(flat["blocks.3.attn.c_v.weight"].shape) == (256, 512)


# ---- Newton-Schulz ----
@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (3, 48, 80)])
def test_newton_schulz_is_near_orthogonal(tg, shape):
    torch.manual_seed(5)
    G = torch.randn(*shape)
    G3 = G if G.ndim == 3 else G[None]
    X = tg.newton_schulz(G3, 5, torch.float32)
    assert X.shape == G3.shape and X.dtype == torch.float32
    for g, x in zip(G3, X):
        sv = torch.linalg.svdvals(x)
        # NS5 with (3.4445, -4.7750, 2.0315) does not converge to 1: it maps singular values into a band around 1
        assert sv.min() > 0.5 and sv.max() < 1.5, sv
        U, _, Vh = torch.linalg.svd(g, full_matrices=False)
        polar = U @ Vh
        cos = (x * polar).sum() / (x.norm() * polar.norm())
        assert cos > 0.97, cos
        # same singular vectors: U^T X V is (near) diagonal with positive entries
        core = U.T @ x @ Vh.T
        off = core - torch.diag(torch.diagonal(core))
        assert off.abs().max() < 1e-3 * core.abs().max() + 1e-3
        assert torch.diagonal(core).min() > 0.5


def test_newton_schulz_is_scale_invariant_and_bf16_close(tg):
    torch.manual_seed(6)
    G = torch.randn(2, 32, 48)
    a = tg.newton_schulz(G, 5, torch.float32)
    torch.testing.assert_close(tg.newton_schulz(G * 1000.0, 5, torch.float32), a, rtol=1e-4, atol=1e-4)
    b = tg.newton_schulz(G, 5, torch.bfloat16)
    assert b.dtype == torch.bfloat16  # in its compute dtype: the update is all-gathered in it
    assert (b.float() - a).abs().max() < 0.1


# ---- optimizers ----
def test_optimizer_groups_partition_the_parameters(tg):
    for kw in (dict(), dict(tie_embeddings=False)):
        cfg = tiny_cfg(tg, **kw)
        model = tg.GPT(cfg)
        rt = tg.Runtime(device=torch.device("cpu"), amp=False)
        opt = tg.Optimizers(model, cfg, rt)
        seen = [id(p) for g in opt.adam.param_groups for p in g["params"]] + [id(b) for b in opt.muon.banks]
        assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
        assert [id(b) for b in opt.muon.banks] == [id(b) for b in model.banks()]
        lrs = {id(p): g["lr"] for g in opt.adam.param_groups for p in g["params"]}
        emb_lr = cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
        assert lrs[id(model.tok_emb.weight)] == emb_lr
        assert lrs[id(model.bigram.embed.weight)] == emb_lr
        assert lrs[id(model.bigram.proj.weight)] == cfg.scalar_lr
        assert lrs[id(model.ve_shared.proj.weight)] == cfg.scalar_lr
        if not cfg.tie_embeddings:
            assert lrs[id(model.lm_head.weight)] == cfg.head_lr
        opt.set_schedule(0.5, 0)
        assert opt.muon.lr == 0.5 * cfg.matrix_lr
        assert opt.muon.momentum == cfg.muon_momentum_warmup_start
        assert lrs[id(model.tok_emb.weight)] * 0.5 == \
            [g["lr"] for g in opt.adam.param_groups if any(p is model.tok_emb.weight for p in g["params"])][0]


def test_optimizer_step_clips_and_updates_banks(tg):
    cfg = tiny_cfg(tg, grad_clip_norm=0.3, muon_wd=0.0)
    model = randomized(tg, cfg)
    model.train()
    rt = tg.Runtime(device=torch.device("cpu"), amp=False)
    opt = tg.Optimizers(model, cfg, rt)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    before = [b.detach().clone() for b in model.banks()]
    opt.zero_grad()
    model(ids, ids.roll(-1, 1)).backward()
    expect = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters())).item()
    opt.set_schedule(1.0, 0)
    norm = float(opt.step())
    assert norm == pytest.approx(expect, rel=1e-6)  # the banks' part crosses the ranks in fp32
    assert norm > 0.3  # so the clip was active
    for b, b0 in zip(model.banks(), before):
        upd = (b0 - b.detach()) / cfg.matrix_lr  # the first Muon update is NS(g + mu * g) * shape scale
        scale = max(1.0, b.size(-2) / b.size(-1)) ** 0.5
        sv = torch.linalg.svdvals(upd / scale)
        assert sv.max() < 1.5 and sv.max() > 0.5


def test_rope_tables_of_the_run_lengths_are_buffers(tg):
    """RoPE tables of TRAIN_SEQ_LEN and EVAL_SEQ_LEN are precomputed, non-persistent buffers (graph inputs, not fp64
    cos/sin that inductor would recompute inside every RoPE kernel: +25% on a compiled CPU train step), equal to the
    computed tables; other lengths are computed; the artifact's state dict does not hold them."""
    cfg = tiny_cfg(tg, train_seq_len=16, eval_seq_len=24, eval_stride=8, rope_dims=8)
    model = tg.GPT(cfg)
    for T in (16, 24):
        c, s = model.rotary.tables(T, "cpu")
        assert c is getattr(model.rotary, f"c{T}") and s is getattr(model.rotary, f"s{T}")
        c2, s2 = tg.Rotary(8, cfg.rope_base).tables(T, "cpu")
        assert torch.equal(c, c2) and torch.equal(s, s2) and c.shape == (T, 4)
    assert not hasattr(model.rotary, "c20") and model.rotary.tables(20, "cpu")[0].shape == (20, 4)
    assert not any("rotary" in k for k in model.state_dict())
    assert model.double().rotary.c16.dtype == torch.float64  # moves with the model


def test_rope_dims_2_is_rejected_or_works_past_1024(tg):
    env = {"PRESET": "competition", "ROPE_DIMS": "2", "NUM_LAYERS": "1", "VE_LAYERS": "0", "XSA_LAST_N": "1",
           "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "VOCAB_SIZE": "64", "BIGRAM_VOCAB_SIZE": "0"}
    try:
        cfg = tg.Config.from_env(env)
    except tg.UserError as e:  # rejecting it up front is a fix too
        assert str(e).startswith("ROPE_DIMS=")
        return
    model = tg.GPT(cfg).eval()
    with torch.no_grad():
        h = model.forward_hidden(torch.zeros(1, cfg.train_seq_len, dtype=torch.long))
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float64])
def test_softcap_nll_is_ce_of_the_softcap_eager_and_compiled(tg, dt):
    """The training loss: loss and dL/dz as torch's CE of c*tanh(z/c), eager and under torch.compile (what a run
    uses), also when the loss is scaled before backward (gradient accumulation, TTT weights); a nan logit gives a nan
    loss (the NaN guard)."""
    g = torch.Generator().manual_seed(0)
    z0 = (12 * torch.randn(300, 77, generator=g)).to(dt)  # V not a multiple of the vector width
    y = torch.randint(0, 77, (300,), generator=g)
    ref = z0.clone().requires_grad_()
    want = F.cross_entropy(30.0 * torch.tanh(ref.to(torch.promote_types(dt, torch.float32)) / 30.0), y)
    (0.25 * want).backward()
    for fn in (tg.softcap_nll, torch.compile(tg.softcap_nll, fullgraph=True)):
        z = z0.clone().requires_grad_()
        loss = fn(z, y, 30.0).mean()
        (0.25 * loss).backward()
        assert z.grad.dtype == dt and loss.dtype == torch.promote_types(dt, torch.float32)
        torch.testing.assert_close(loss, want.detach(), rtol=1e-6 if dt != torch.float64 else 1e-12, atol=0)
        tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8, torch.float64: 1e-12}[dt]
        torch.testing.assert_close(z.grad.float(), ref.grad.float(), rtol=tol, atol=1e-8)
        bad = z0.clone()
        bad[2, 7] = float("nan")
        assert fn(bad, y, 30.0).isnan()[2] and fn(bad, y, 30.0).isfinite().sum() == 299


# ---- attention: one dispatch, counted ----
@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_sdpa_is_causal_gqa_attention(tg, dt):
    """sdpa() on the CPU (GQA by enable_gqa) is causal attention with each K/V head shared by its group of query
    heads: the same as SDPA on K/V heads repeated (what it does on CUDA, tests/test_cuda.py)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 24, h, 16, generator=g, dtype=dt) for h in (4, 2, 2))
    k2, v2 = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)
    torch.testing.assert_close(tg.sdpa(q, k, v), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tg.sdpa(q, k2, v2), want, rtol=1e-5, atol=1e-6)


def test_attention_calls_are_counted_eager_and_compiled_without_recompiles(tg):
    """attend counts the calls of the kernel that ran (a device tensor per backend, set up by setup_runtime), also
    inside a compiled graph, and the count does not make dynamo recompile."""
    cfg = tiny_cfg(tg)
    tg.setup_runtime(tg.Config.from_env({"PRESET": "cpu", "DEVICE": "cpu"}), {})
    model = randomized(tg, cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.forward_hidden(ids)
        assert int(tg.ATTN_CALLS["sdpa"]) == cfg.num_layers
        seen = []
        hook = torch._dynamo.convert_frame.register_bytecode_hook(lambda code, new: seen.append(code.co_name))
        try:
            fn = torch.compile(model.forward_hidden, fullgraph=True, dynamic=False)
            for _ in range(3):
                fn(ids)
        finally:
            hook.remove()
    assert int(tg.ATTN_CALLS["sdpa"]) == 4 * cfg.num_layers and seen == ["forward_hidden"]
    assert int(tg.ATTN_CALLS["flash_attn_3"]) == 0


def test_flash_attn_that_fails_is_noted_and_not_used(tg, monkeypatch):
    """An installed flash-attn that raises at import (a wheel built for another torch) or at its probe call is noted
    (the run logs a WARNING) and attend keeps SDPA; one that passes the probe is used."""
    import types

    def broken(*a, **k):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
    mods = {"flash_attn_interface": types.SimpleNamespace(flash_attn_func=broken)}

    def fake_import(name):
        if name in mods:
            return mods[name]
        raise OSError("undefined symbol: _ZN3c10...")  # flash_attn (2): built for another torch
    monkeypatch.setattr(tg.importlib, "import_module", fake_import)
    monkeypatch.setattr(tg, "FLASH_NOTES", [])
    tg.load_flash_attn(torch.device("cpu"))
    assert tg._flash == [] and len(tg.FLASH_NOTES) == 2
    assert "flash_attn_3 fails its first call (RuntimeError" in tg.FLASH_NOTES[0]
    assert "flash_attn_2 does not import (OSError" in tg.FLASH_NOTES[1]
    mods["flash_attn_interface"] = types.SimpleNamespace(flash_attn_func=lambda q, k, v, causal: tg.sdpa(q, k, v))
    tg.load_flash_attn(torch.device("cpu"))
    try:
        assert [n for n, _ in tg._flash] == ["flash_attn_3"]
    finally:
        tg._flash.clear()
