"""The int6/int8 artifact: per-row quantization error bounds, pack/unpack, export -> file -> model -> export again,
and one-line ArtifactErrors naming the file for every kind of damage."""
import dataclasses
import os

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(tg, **kw):
    base = dict(vocab_size=320, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, rope_dims=16, ve_layers=(0, 1),
                xsa_last_n=1, bigram_vocab_size=64, bigram_dim=16, ve_dim=16, train_seq_len=32, compile=False)
    base.update(kw)
    cfg = dataclasses.replace(tg.Config(), **base)
    cfg.validate()
    return cfg


def trained_like(tg, cfg, seed=0):
    """A model with non-trivial weights everywhere (heavy-tailed, so the clip search has something to choose)."""
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            t = torch.distributions.StudentT(3.0).sample(p.shape) if p.numel() > 1 else torch.randn(p.shape, generator=g)
            p.copy_(0.05 * t.float() + (1.0 if p.ndim < 2 else 0.0))
    return model.eval()


def quant_cfg(tg, **kw):
    """One layer wide enough (D=288) that every matrix class is quantized: attn/mlp int6, tok_emb int8."""
    return tiny_cfg(tg, num_layers=1, model_dim=288, num_heads=4, num_kv_heads=4, ve_layers=(0,), xsa_last_n=1, **kw)


def row_sse(q, s, w):
    return (q.float() * s.float()[:, None] - w).square().sum(1)


# ---- quantize_rows ----
@pytest.mark.parametrize("rows, cols", [(48, 512), (16, 1536), (64, 96)])
def test_int6_rows_error_bounds(tg, rows, cols):
    torch.manual_seed(rows)
    w = torch.distributions.StudentT(2.5).sample((rows, cols)).float() * 0.02
    w[0, 5] = 2.0  # one outlier row: clipping pays off there
    q, s = tg.quantize_rows(w, 31, tg.INT6_PERCENTILES)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and q.shape == w.shape and s.shape == (rows,)
    assert q.abs().max() <= 31
    sf = s.float()[:, None]
    err = (q.float() * sf - w).abs()
    inside = w.abs() <= 31 * sf
    # inside the chosen clip every element is within half a step of its value
    assert (err[inside] <= 0.5 * sf.expand_as(w)[inside] * (1 + 1e-3)).all()
    # the clip search minimises each row's squared error over the candidate percentiles...
    sse = row_sse(q, s, w)
    for pct in tg.INT6_PERCENTILES:
        qc, sc = tg.quantize_rows(w, 31, (pct,))
        assert (sse <= row_sse(qc, sc, w) + 1e-12).all(), pct
    # ...so it is bounded by the row-max grid, where every element is within half a step
    q1, s1 = tg.quantize_rows(w, 31, (1.0,))
    step = s1.float()
    assert ((q1.float() * step[:, None] - w).abs().amax(1) <= 0.5 * step * (1 + 1e-3)).all()
    assert (sse.div(cols).sqrt() <= 0.5 * step * (1 + 1e-3)).all()
    assert torch.equal(s1, (w.abs().amax(1) / 31).half())  # row-max scale, fp16
    # the outlier row chose a clip below its max, and that helped
    assert sse[0] < row_sse(q1, s1, w)[0]


def test_int8_rows_error_bounds(tg):
    torch.manual_seed(1)
    w = torch.randn(40, 256) * 0.01
    q, s = tg.quantize_rows(w, 127, (tg.INT8_CLIP_Q,))
    assert q.abs().max() <= 127 and s.dtype == torch.float16
    clip = torch.quantile(w.abs(), tg.INT8_CLIP_Q, dim=1)
    assert torch.equal(s, (clip / 127).half())
    sf = s.float()[:, None]
    err = (q.float() * sf - w).abs()
    inside = w.abs() <= 127 * sf
    assert (err[inside] <= 0.5 * sf.expand_as(w)[inside] * (1 + 1e-3)).all()
    # beyond the clip the value saturates at +-127 steps
    out = ~inside
    assert (q.abs()[out] == 127).all()
    torch.testing.assert_close(err[out], w.abs()[out] - 127 * sf.expand_as(w)[out], rtol=1e-3, atol=1e-7)


def test_quantize_rows_zero_and_tiny_rows_have_a_positive_scale(tg):
    w = torch.randn(4, 128)
    w[1] = 0.0
    w[2] *= 1e-8
    for qmax, pct in ((31, tg.INT6_PERCENTILES), (127, (tg.INT8_CLIP_Q,))):
        q, s = tg.quantize_rows(w, qmax, pct)
        assert (s.float() > 0).all(), s
        assert (q[1] == 0).all()


# ---- quantize_state / pack / unpack / dequantize ----
def test_quantize_state_kinds_and_roundtrip_bounds(tg):
    cfg = quant_cfg(tg, control_tensor_name_patterns="q_gain,skip_weights")
    model = trained_like(tg, cfg)
    sd = model.state_dict()
    arrays, meta = tg.quantize_state(sd, cfg)
    flat = tg.unbank(sd, cfg.num_layers)
    assert set(meta) == set(flat)
    for name, t in flat.items():
        kind = meta[name]["kind"]
        assert meta[name]["shape"] == list(t.shape)
        if t.numel() <= tg.PASSTHROUGH_MAX:
            want = "fp32" if ("q_gain" in name or "skip_weights" in name) else "fp16"
            assert kind == want, name
        elif ".attn." in name or ".mlp." in name:
            assert kind == "int6", name
        else:
            assert kind == "int8", name
    assert meta["tok_emb.weight"]["kind"] == "int8"
    for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"):
        assert meta[f"blocks.0.{m}.weight"]["kind"] == "int6"
    assert arrays["blocks.0.mlp.fc.weight.q"].dtype == np.int8 and arrays["blocks.0.mlp.fc.weight.scale"].dtype == np.float16
    assert arrays["smear"].dtype == np.float16 and arrays["skip_weights"].dtype == np.float32

    deq = tg.dequantize_state(arrays, meta, cfg)
    assert set(deq) == set(sd)
    dflat = tg.unbank(deq, cfg.num_layers)
    for name, t in flat.items():
        d, t = dflat[name], t.float()
        kind = meta[name]["kind"]
        if kind == "fp32":
            assert torch.equal(d, t)
        elif kind == "fp16":
            assert torch.equal(d, t.half().float())
        else:
            qmax = 31 if kind == "int6" else 127
            s = torch.from_numpy(arrays[name + ".scale"].copy()).float()[:, None]
            torch.testing.assert_close(d, torch.from_numpy(arrays[name + ".q"].copy()).float() * s, rtol=0, atol=0)
            inside = t.abs() <= qmax * s
            assert ((d - t).abs()[inside] <= 0.5 * s.expand_as(t)[inside] * (1 + 1e-3)).all(), name
            if kind == "int6":
                rowmax_step = (t.abs().amax(1) / 31).half().float()
                assert ((d - t).square().mean(1).sqrt() <= 0.5 * rowmax_step * (1 + 1e-3)).all(), name


def test_pack_unpack_is_lossless_and_keeps_the_smallest(tg, monkeypatch):
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX", 1024)  # quantize the tiny model's matrices too
    cfg = tiny_cfg(tg)
    arrays, meta = tg.quantize_state(trained_like(tg, cfg).state_dict(), cfg)
    assert {m["kind"] for m in meta.values()} == {"int6", "int8", "fp16"}
    blob, method, sizes = tg.pack_artifact(arrays, meta, {"x": 1, "t": [9, 10]})
    assert blob.startswith(tg.ARTIFACT_MAGIC)
    assert set(sizes) >= {"lzma"} and min(sizes.values()) == sizes[method] and len(blob) > sizes[method]
    arrays2, meta2, arch2 = tg.unpack_artifact(blob)
    assert meta2 == meta and arch2 == {"x": 1, "t": [9, 10]} and list(arrays2) == list(arrays)
    for k in arrays:
        assert arrays2[k].dtype == arrays[k].dtype and arrays2[k].shape == arrays[k].shape, k
        assert arrays2[k].tobytes() == arrays[k].tobytes(), k
    assert len(blob) < sum(a.nbytes for a in arrays.values())  # int6 codes in int8 bytes compress


def test_export_load_export_is_exact(tg, tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX", 1024)  # quantize the tiny model's matrices too
    cfg = tiny_cfg(tg)
    model = trained_like(tg, cfg)
    blob, _, _, _ = tg.export_model(model, cfg)
    path = tmp_path / "a.ptz"
    tg.atomic_write(path, blob)
    assert path.read_bytes() == blob
    assert [p.name for p in tmp_path.iterdir()] == ["a.ptz"]  # no temp file left behind
    # the architecture comes from the artifact, not the config it is loaded with
    other = dataclasses.replace(tg.Config(), num_layers=5, model_dim=128)
    loaded, lcfg = tg.load_artifact(str(path), other)
    for k in tg.ARCH_FIELDS:
        assert getattr(lcfg, k) == getattr(cfg, k), k
    # the loaded model holds exactly the dequantized weights
    arrays, meta, _ = tg.unpack_artifact(blob)
    deq = tg.dequantize_state(arrays, meta, cfg)
    lsd = loaded.state_dict()
    for k, v in deq.items():
        assert lsd[k].dtype == torch.float32 and torch.equal(lsd[k], v), k
    ref = tg.GPT(cfg)
    ref.load_state_dict(deq, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids, ids.roll(-1, 1)), ref.eval()(ids, ids.roll(-1, 1)), rtol=0, atol=0)
        torch.testing.assert_close(loaded.forward_hidden(ids), ref.forward_hidden(ids), rtol=0, atol=0)
    assert {m["kind"] for m in meta.values()} == {"int6", "int8", "fp16"}
    # export again: the quantized weights are a fixed point, byte for byte
    arrays2, meta2 = tg.quantize_state(loaded.state_dict(), lcfg)
    assert meta2 == meta and list(arrays2) == list(arrays)
    for k in arrays:
        assert arrays2[k].tobytes() == arrays[k].tobytes(), k


def test_int8_requantization_is_a_fixed_point_at_competition_width(tg):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((256, 512)).float() * 0.05
    q, s = tg.quantize_rows(w, 127, (tg.INT8_CLIP_Q,), "higher")  # as quantize_state calls it
    q2, s2 = tg.quantize_rows(q.float() * s.float()[:, None], 127, (tg.INT8_CLIP_Q,), "higher")
    assert torch.equal(q2, q)
    assert torch.equal(s2, s)


def test_int6_requantization_is_a_fixed_point_at_competition_width(tg):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 1536)).float() * 0.05
    q, s = tg.quantize_rows(w, 31, tg.INT6_PERCENTILES)
    q2, s2 = tg.quantize_rows(q.float() * s.float()[:, None], 31, tg.INT6_PERCENTILES)
    assert torch.equal(q2, q) and torch.equal(s2, s)


# ---- damage ----
def damaged_variants(blob: bytes) -> dict:
    m = len(blob)
    head = len(b"PGOLF-A1") + 2
    out = {
        "empty": b"",
        "bad_magic": b"XXXXXXXX" + blob[8:],
        "header_only": blob[:head + 3],
        "truncated_half": blob[: m // 2],
        "truncated_last_byte": blob[:-1],
        "bad_method_index": blob[:8] + bytes([200]) + blob[9:],
        "bad_method_name": blob[:head] + b"nosuchc\0" * blob[9] + blob[head + 8 * blob[9]:],
        "flipped_crc": blob[:head + 8 * blob[9]] + bytes([blob[head + 8 * blob[9]] ^ 0xFF]) + blob[head + 8 * blob[9] + 1:],
        "trailing_garbage": blob + b"\x00garbage",
    }
    for frac in (0.3, 0.6, 0.9):  # flip one byte inside the compressed payload
        i = int(m * frac)
        out[f"flip_{frac}"] = blob[:i] + bytes([blob[i] ^ 0x55]) + blob[i + 1:]
    return out


def test_damaged_artifacts_raise_artifact_error_naming_the_file(tg, tmp_path):
    cfg = tiny_cfg(tg, num_layers=1, ve_layers=(0,), model_dim=32, vocab_size=64)
    blob, _, _, _ = tg.export_model(trained_like(tg, cfg), cfg)
    tg.atomic_write(tmp_path / "ok.ptz", blob)
    tg.load_artifact(str(tmp_path / "ok.ptz"), cfg)  # the undamaged one loads
    for kind, bad in damaged_variants(blob).items():
        path = tmp_path / f"{kind}.ptz"
        path.write_bytes(bad)
        with pytest.raises(tg.ArtifactError) as ei:
            tg.load_artifact(str(path), cfg)
        msg = str(ei.value)
        assert str(path) in msg and "\n" not in msg, (kind, msg)
        assert isinstance(ei.value, tg.UserError)
    with pytest.raises(tg.ArtifactError, match="cannot read") as ei:
        tg.load_artifact(str(tmp_path / "missing.ptz"), cfg)
    assert str(tmp_path / "missing.ptz") in str(ei.value)
    with pytest.raises(tg.ArtifactError, match="cannot read"):
        tg.load_artifact(str(tmp_path), cfg)  # a folder


def test_artifact_of_another_shape_is_an_artifact_error(tg, tmp_path):
    cfg = tiny_cfg(tg, num_layers=1, ve_layers=(0,), model_dim=32, vocab_size=64)
    arrays, meta = tg.quantize_state(trained_like(tg, cfg).state_dict(), cfg)
    arch = {k: getattr(cfg, k) for k in tg.ARCH_FIELDS}
    arch["model_dim"] = 64  # the header claims a shape the tensors do not have
    blob, _, _ = tg.pack_artifact(arrays, meta, arch)
    path = tmp_path / "mismatch.ptz"
    path.write_bytes(blob)
    with pytest.raises(tg.ArtifactError) as ei:
        tg.load_artifact(str(path), cfg)
    assert str(path) in str(ei.value)


def test_atomic_write_replaces_and_cleans_up(tg, tmp_path, monkeypatch):
    path = tmp_path / "sub" / "f.bin"
    tg.atomic_write(path, b"one")
    tg.atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]

    def boom(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        tg.atomic_write(path, b"three")
    assert path.read_bytes() == b"two"  # the old file is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]  # and the temp file is gone


# ---- fitting the artifact into ARTIFACT_TARGET_BYTES ----
def test_export_over_budget_coarsens_int6_until_it_fits(tg, monkeypatch, tmp_path):
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX", 1024)  # quantize the tiny model's matrices too
    cfg = tiny_cfg(tg)
    model = trained_like(tg, cfg)
    blob1, method, sizes, step1 = tg.export_model(model, cfg)
    assert step1 == 1.0
    assert tg.export_model(model, cfg, budget=len(blob1))[0] == blob1  # at the budget: untouched, byte for byte
    budget = int(0.85 * len(blob1))
    blob, m2, sizes2, step = tg.export_model(model, cfg, budget=budget)
    assert len(blob) <= budget and step > 1.0 and (m2, sizes2) == (method, sizes)
    a1, meta1, _ = tg.unpack_artifact(blob1)
    a2, meta2, _ = tg.unpack_artifact(blob)
    assert meta1 == meta2
    for name, m in meta1.items():
        if m["kind"] == "int6":  # one common factor on every int6 row scale (up to the fp16 rounding)
            s1, s2 = a1[name + ".scale"].astype(np.float32), a2[name + ".scale"].astype(np.float32)
            np.testing.assert_allclose(s2, np.float16(s1 * step).astype(np.float32), rtol=1e-3)
            assert np.abs(a2[name + ".q"]).max() <= 31
        else:  # int8 embeddings and passthrough tensors are never touched
            for k in (name, name + ".q", name + ".scale"):
                if k in a1:
                    assert a1[k].tobytes() == a2[k].tobytes(), k
    # the coarsest step that fits, within the bisection's precision: a clearly finer step would not fit
    arrays, meta = tg.quantize_state(model.state_dict(), cfg)
    mats = {k: (w, torch.from_numpy(arrays[k + ".scale"])) for k, w in tg.unbank(model.state_dict(), 2).items()
            if meta[k]["kind"] == "int6"}
    assert tg.int6_bits(mats, step) < tg.int6_bits(mats, 1.0) < tg.int6_bits(mats, 0.5)
    finer = step / 1.15
    for k, (w, s) in mats.items():
        arrays[k + ".q"], arrays[k + ".scale"] = (t.numpy() for t in tg.coarsen_rows(w, s, finer))
    assert len(tg.pack_artifact(arrays, meta, {k: getattr(cfg, k) for k in tg.ARCH_FIELDS}, only=method)[0]) > budget
    tg.atomic_write(tmp_path / "fit.ptz", blob)
    loaded, _ = tg.load_artifact(str(tmp_path / "fit.ptz"), cfg)  # a coarser grid, the same format
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(ids, ids.roll(-1, 1)))


def test_export_with_an_unreachable_budget_returns_its_best(tg, monkeypatch):
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX", 1024)
    cfg = tiny_cfg(tg)
    model = trained_like(tg, cfg)
    blob, _, _, step = tg.export_model(model, cfg, budget=100)  # less than the fp16 tensors alone
    assert len(blob) > 100 and 1.0 < step <= 32.0  # the caller reports FAIL artifact_too_large
    tg.unpack_artifact(blob)
