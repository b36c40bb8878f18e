"""GPTQ int6 export (GPTQ=1): the rounding beats round-to-nearest on the layer's outputs, the Hessians are those of
every banked linear's inputs, the artifact bytes do not depend on the world size, the fit rule works on GPTQ's
codes, and the calibration's time is taken from the training budget."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_run  # noqa: E402
from test_artifact import tiny_cfg, trained_like  # noqa: E402

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def correlated_inputs(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(c) + 2 * torch.randn(c, c, generator=g) / c ** 0.5
    scale = torch.rand(c, generator=g) * 3 + 0.1  # unequal column energies: the act-order has something to order
    return (torch.randn(n, c, generator=g) @ mix) * scale


@pytest.mark.parametrize("rows, cols, block", [(64, 256, 128), (48, 200, 64), (16, 96, 128)])
def test_gptq_lowers_the_output_error_of_round_to_nearest(tg, rows, cols, block):
    X = correlated_inputs(8 * cols, cols, rows)
    w = torch.distributions.StudentT(4.0).sample((rows, cols)) * 0.02
    q_rtn, s = tg.quantize_rows(w, 31, tg.INT6_PERCENTILES)  # the grid both use: the clip search's row scales
    H = X.double().T @ X.double()
    q = tg.gptq_codes(w[None], s[None], *tg.gptq_factors(H[None]), block=block)[0]
    assert q.shape == w.shape and torch.equal(q, q.round()) and q.abs().max() <= 31
    err = lambda codes: ((codes.float() * s.float()[:, None] - w) @ X.T).square().sum().item()  # ||(W - W^)X||^2
    assert err(q) < 0.7 * err(q_rtn)
    # equal diagonal, no correlation: nothing to push the error onto, GPTQ is round-to-nearest
    ident = tg.gptq_codes(w[None], s[None], *tg.gptq_factors(3 * torch.eye(cols, dtype=torch.float64)[None]))[0]
    assert torch.equal(ident, q_rtn.float())


def test_gptq_batches_are_independent_and_dead_inputs_are_rounded(tg):
    """A stack of layers gives each layer's own result; an input that is never active keeps plain rounding."""
    ws, ss, hs = [], [], []
    for i in range(3):
        X = correlated_inputs(512, 64, i)
        X[:, 5] = 0  # a dead input
        w = torch.randn(32, 64) * 0.05
        ws.append(w), ss.append(tg.quantize_rows(w, 31, tg.INT6_PERCENTILES)[1]), hs.append(X.double().T @ X.double())
    q = tg.gptq_codes(torch.stack(ws), torch.stack(ss), *tg.gptq_factors(torch.stack(hs)))
    for i in range(3):
        alone = tg.gptq_codes(ws[i][None], ss[i][None], *tg.gptq_factors(hs[i][None]))[0]
        assert torch.equal(q[i], alone)
        np.testing.assert_array_equal(q[i][:, 5], (ws[i][:, 5] / ss[i].float()).round().clamp(-31, 31))


def test_hessians_are_those_of_every_banked_linear(tg, monkeypatch):
    """calibrate's recorder against an independent record of every F.linear call of the same forward pass."""
    cfg = tiny_cfg(tg, gptq_calib_seqs=3)
    model = trained_like(tg, cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, cfg.train_seq_len), generator=torch.Generator().manual_seed(1))
    weights = tg.unbank({n: getattr(model, n).detach() for n in tg.BANK_NAMES}, cfg.num_layers)
    rec = tg.HessianRecorder(weights)
    with torch.no_grad(), rec:
        model.forward_hidden(ids)
    names = {w.data_ptr(): k for k, w in weights.items()}
    want = {k: 0 for k in weights}
    real = F.linear

    def spy(x, w, *a):
        if w.data_ptr() in names:
            x2 = x.detach().flatten(0, -2).double()
            want[names[w.data_ptr()]] = want[names[w.data_ptr()]] + x2.T @ x2
        return real(x, w, *a)
    monkeypatch.setattr(F, "linear", spy)
    with torch.no_grad():
        model.forward_hidden(ids)
    assert sorted(rec.h) == sorted(want) and len(want) == 6 * cfg.num_layers
    for k, h in rec.h.items():
        assert torch.is_tensor(want[k]), f"{k}: F.linear never saw this bank slice"
        torch.testing.assert_close(h, want[k], rtol=1e-12, atol=0)
    L = cfg.num_layers
    for i in range(L):  # Q, K and V read one input; the MLP's two matrices and the out-proj their own
        a = rec.h[f"blocks.{i}.attn.c_q.weight"]
        assert torch.equal(a, rec.h[f"blocks.{i}.attn.c_k.weight"]) and torch.equal(a, rec.h[f"blocks.{i}.attn.c_v.weight"])
        assert rec.h[f"blocks.{i}.mlp.proj.weight"].shape == (cfg.mlp_dim, cfg.mlp_dim)
        assert not torch.equal(a, rec.h[f"blocks.{i}.attn.proj.weight"])


def test_calibration_sequences(tg, tiny_data):
    """Every rank's share is seeded per sequence: two ranks' Hessians sum to the single process's."""
    data, tok = tiny_data
    cfg = tiny_cfg(tg, data_path=str(data), tokenizer_path=str(tok), gptq_calib_seqs=5)
    model = trained_like(tg, cfg)
    one = tg.calibrate(model, cfg, tg.Runtime(device=torch.device("cpu"), amp=False))
    parts = [tg.calibrate(model, cfg, tg.Runtime(device=torch.device("cpu"), rank=r, world_size=2, amp=False))
             for r in range(2)]
    n = cfg.gptq_calib_seqs * cfg.train_seq_len
    for k, h in one.items():
        torch.testing.assert_close(parts[0][k] + parts[1][k], h, rtol=1e-9, atol=1e-9)
        assert h.dtype == torch.float64 and torch.all(torch.linalg.eigvalsh(h) > -1e-6 * h.diagonal().max())
    assert one["blocks.0.attn.c_q.weight"].trace() == pytest.approx(n * cfg.model_dim, rel=1e-3)  # rms-normed input
    # more ranks than sequences: a rank without a share contributes zeros (and still joins the all-reduce)
    empty = tg.calibrate(model, dataclasses.replace(cfg, gptq_calib_seqs=1),
                         tg.Runtime(device=torch.device("cpu"), rank=0, world_size=2, amp=False))
    assert sorted(empty) == sorted(one) and all(not h.any() for h in empty.values())


@pytest.fixture(scope="module")
def tiny_data(tg, tmp_path_factory):
    return tiny_run.make_tiny_data(tmp_path_factory.mktemp("gptq"), tg)


def test_fit_rule_on_gptq_codes(tg, monkeypatch, tiny_data):
    """Over budget, GPTQ's codes are coarsened by one common step found on their own entropy, and the artifact
    loads with the unchanged loader."""
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX", 1024)
    data, tok = tiny_data
    cfg = tiny_cfg(tg, data_path=str(data), tokenizer_path=str(tok), gptq_calib_seqs=4)
    model = trained_like(tg, cfg)
    hs = tg.calibrate(model, cfg, tg.Runtime(device=torch.device("cpu"), amp=False))
    blob_r, _, _, _ = tg.export_model(model, cfg)
    blob1, method, sizes, step1 = tg.export_model(model, cfg, 0, hs)
    assert step1 == 1.0 and blob1 != blob_r
    budget = int(0.85 * len(blob1))
    blob, m2, _, step = tg.export_model(model, cfg, budget, hs)
    assert len(blob) <= budget and step > 1.0 and m2 == method
    a1, meta, _ = tg.unpack_artifact(blob1)
    a2, _, _ = tg.unpack_artifact(blob)
    sd = model.state_dict()
    mats = {k: (w, torch.tensor(a1[k + ".scale"])) for k, w in tg.unbank(sd, cfg.num_layers).items()
            if meta[k]["kind"] == "int6"}
    gptq = tg.gptq_kinds(mats, hs)
    assert sorted(len(ks) for ks, _, _ in gptq) == [cfg.num_layers] * 6
    codes = tg.int6_codes(mats, step, gptq)
    rtn = tg.int6_codes(mats, step)
    moved = 0
    for k, (q, s) in codes.items():  # the artifact holds GPTQ's codes at the common step, not RTN's
        assert np.array_equal(a2[k + ".q"], q.numpy()) and np.array_equal(a2[k + ".scale"], s.numpy())
        moved += int((q != rtn[k][0]).sum())
    assert moved > 0
    assert tg.int6_bits(mats, step, gptq) < tg.int6_bits(mats, 1.0, gptq)
    path = Path(tiny_data[0]).parent / "gptq_fit.ptz"
    tg.atomic_write(path, blob)
    loaded, _ = tg.load_artifact(str(path), cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(ids, ids.roll(-1, 1)))


@needs_gloo
def test_artifact_bytes_are_identical_across_world_sizes(tg, tiny_data, tmp_path):
    """One process and two (torchrun, gloo) calibrate the same weights and quantize once (rank 0, broadcast):
    the same bytes on every rank of both runs, and not the round-to-nearest bytes."""
    data, tok = tiny_data
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(tmp_path)),
            "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"}
    worker = str(Path(__file__).resolve().parent / "gptq_worker.py")
    blobs = {}
    for n in (1, 2):
        env = dict(base, **tiny_run.tiny_env(data, tok, tmp_path / f"w{n}", GPTQ="1", GPTQ_CALIB_SEQS="5"))
        cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                                  if n == 2 else []) + [worker]
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"world {n} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        for r in range(n):
            blobs[(n, r)] = (tmp_path / f"w{n}" / f"rank{r}.ptz").read_bytes()
    assert blobs[(1, 0)] == blobs[(2, 0)] == blobs[(2, 1)]
    assert blobs[(1, 0)] != (tmp_path / "w1" / "rtn.ptz").read_bytes()


def test_run_takes_calibration_from_the_training_budget(tg, tiny_data, tmp_path):
    """GPTQ=1: training stops GPTQ_RESERVE_SECONDS early, calibration runs after it, and the log and summary say
    how long each took; GPTQ=0 trains for the whole budget."""
    data, tok = tiny_data
    env = tiny_run.tiny_env(data, tok, tmp_path, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=6, EVAL_BATCH_SEQS=64,
                            TTT_ENABLED=0, SLOT_ENABLED=0, GPTQ=1, GPTQ_RESERVE_SECONDS=5, GPTQ_CALIB_SEQS=4)
    s = tg.run(dict(env, RUN_ID="gptq"))
    assert 1.0 <= s["train_seconds"] < 3.5 and s["steps"] >= 1, s  # the budget less the reserve, + the last step
    log = (tmp_path / "gptq.txt").read_text()
    log = log[log.index("\nconfig "):]  # after the source code
    m = re.search(r"^gptq:calibrated seqs:4 calib_time:(\d+)ms reserve:5000ms train\+calib:(\d+)ms$", log,
                  re.M)
    assert m, log[-3000:]
    assert int(m.group(2)) == round(1000 * (s["train_seconds"] + s["calib_seconds"]))
    assert abs(int(m.group(1)) - 1000 * s["calib_seconds"]) <= 1
    assert log.index("stopping_early") < m.start() < log.index("DIAGNOSTIC post_ema") < log.index("Serialized model")
    assert "roundtrip" in s["stages"] and s["fits"] and s["bytes_model"] == (tmp_path / "gptq.ptz").stat().st_size
    s0 = tg.run(dict(env, RUN_ID="rtn", GPTQ="0", MAX_WALLCLOCK_SECONDS="1.0"))
    assert s0["train_seconds"] >= 1.0 and "calib_seconds" not in s0
    log0 = (tmp_path / "rtn.txt").read_text()
    assert "gptq:" not in log0[log0.index("\nconfig "):]


def test_gptq_config_errors(tg):
    env = {"PRESET": "cpu"}
    assert tg.Config.from_env(env).gptq is False  # the default reproduces the seed: round to nearest
    for bad, msg in ((dict(GPTQ_CALIB="self"), "GPTQ_CALIB"), (dict(GPTQ_CALIB_SEQS="0"), "GPTQ_CALIB_SEQS"),
                     (dict(GPTQ="1", GPTQ_RESERVE_SECONDS="300"), "GPTQ_RESERVE_SECONDS"),
                     (dict(GPTQ_RESERVE_SECONDS="-1"), "GPTQ_RESERVE_SECONDS")):
        with pytest.raises(tg.UserError, match=msg):
            tg.Config.from_env(dict(env, **bad))
    ok = tg.Config.from_env(dict(env, GPTQ="1", GPTQ_RESERVE_SECONDS="300", MAX_WALLCLOCK_SECONDS="0"))
    assert ok.gptq and ok.gptq_reserve_seconds == 300  # no wall clock: no reserve to take
    assert any("GPTQ_CALIBS" in w for w in tg.env_warnings({"GPTQ_CALIBS": "1"}))
    assert tg.Config.from_env(dict(env, GPTQ_CALIB="train")).gptq_calib_seqs == 64  # retired: train is accepted
