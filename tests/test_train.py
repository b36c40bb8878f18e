"""Training schedule and the in-process end-to-end run.

- lr_mul (wall-clock and step-based warmdown) and muon_momentum_at as pure functions;
- tg.train with a simulated clock: the wall-clock stop rule and the warmdown it drives, step by step;
- the warmup priming steps are undone exactly;
- tg.run on tiny shards + a tiny SentencePiece model: the JSON summary, the `_exact` log lines, the byte accounting,
  and EVAL_ONLY=1 LOAD_ARTIFACT=<the artifact> reproducing every evaluation stage exactly.
"""
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_run  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- lr_mul and momentum as pure functions ----
def test_lr_mul_step_based(tg):
    cfg = dataclasses.replace(tg.Config(), max_wallclock_seconds=0.0, iterations=100, warmdown_iters=20)
    got = [tg.lr_mul(s, 123.0 * s, cfg) for s in range(101)]
    assert got[:81] == [1.0] * 81  # flat up to the start of the warmdown (step 80 gives 20/20)
    for s in range(80, 101):
        assert got[s] == pytest.approx((100 - s) / 20, abs=1e-12)
    assert got[100] == 0.0 and got[99] == pytest.approx(0.05)
    assert tg.lr_mul(150, 0.0, cfg) == 0.0  # past ITERATIONS: clamped, never negative
    long = dataclasses.replace(cfg, warmdown_iters=400)  # warmdown longer than the run: decays from step 0
    assert tg.lr_mul(0, 0.0, long) == pytest.approx(100 / 400)
    assert tg.lr_mul(50, 0.0, long) == pytest.approx(50 / 400)
    assert tg.lr_mul(99, 0.0, dataclasses.replace(cfg, warmdown_iters=0)) == 1.0


def test_lr_mul_wall_clock(tg):
    cfg = dataclasses.replace(tg.Config(), max_wallclock_seconds=100.0, warmdown_iters=10, iterations=10**6)
    step_ms = 1000.0  # 1 s per step: the warmdown is the last 10 s of the 100 s budget
    for s in range(0, 121):
        want = 1.0 if s <= 90 else max(100 - s, 0) / 10
        assert tg.lr_mul(s, s * step_ms, cfg) == pytest.approx(want, abs=1e-12), s
    assert tg.lr_mul(0, 0.0, cfg) == 1.0  # step 0: no step time measured yet
    # it keys on the measured step time: at 2 s/step the warmdown covers the last 20 s
    assert tg.lr_mul(45, 90_000.0, cfg) == pytest.approx(0.5)
    assert tg.lr_mul(40, 80_000.0, cfg) == 1.0
    assert tg.lr_mul(10, 5_000.0, dataclasses.replace(cfg, warmdown_iters=0)) == 1.0


def test_muon_momentum_warmup(tg):
    cfg = tg.Config()
    assert tg.muon_momentum_at(0, cfg) == pytest.approx(0.92)
    assert tg.muon_momentum_at(750, cfg) == pytest.approx(0.955)
    assert tg.muon_momentum_at(1500, cfg) == pytest.approx(0.99)
    assert tg.muon_momentum_at(9000, cfg) == pytest.approx(0.99)
    vals = [tg.muon_momentum_at(s, cfg) for s in range(0, 1600, 100)]
    assert all(b > a for a, b in zip(vals[:15], vals[1:15]))
    assert tg.muon_momentum_at(0, dataclasses.replace(cfg, muon_momentum_warmup_steps=0)) == 0.99


# ---- tg.train with a simulated clock ----
@pytest.fixture(scope="module")
def tiny_data(tg, tmp_path_factory):
    return tiny_run.make_tiny_data(tmp_path_factory.mktemp("tiny_data"), tg)


def small_cfg(tg, data, tok, **kw):
    env = tiny_run.tiny_env(data, tok, "unused", VAL_LOSS_EVERY=0, **{k.upper(): v for k, v in kw.items()})
    return tg.Config.from_env(env)


class FakeClock:
    """Advances `dt` seconds on every call."""

    def __init__(self, dt):
        self.t, self.dt, self.calls = 1000.0, dt, 0

    def __call__(self):
        self.calls += 1
        self.t += self.dt
        return self.t


def run_train(tg, cfg, tmp_path, clock, monkeypatch):
    lr_calls, sched = [], []
    real_lr_mul, real_sched = tg.lr_mul, tg.Optimizers.set_schedule

    def rec_lr_mul(step, elapsed_ms, c):
        m = real_lr_mul(step, elapsed_ms, c)
        lr_calls.append((step, elapsed_ms, m))
        return m

    def rec_sched(self, mul, step):
        real_sched(self, mul, step)
        sched.append((step, mul, self.muon.lr, self.muon.momentum, [g["lr"] for g in self.adam.param_groups]))
    monkeypatch.setattr(tg, "lr_mul", rec_lr_mul)
    monkeypatch.setattr(tg.Optimizers, "set_schedule", rec_sched)
    rt = tg.Runtime(device=torch.device("cpu"), amp=False)
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg)
    val = tg.ValData(tg.load_val_tokens(cfg), None)
    log_path = tmp_path / "train.txt"
    log_path.unlink(missing_ok=True)  # the Logger never appends to an earlier log
    log = tg.Logger(log_path, True)
    out = tg.train(cfg, rt, model, val, log, clock=clock)
    log.close()
    return out, model, lr_calls, sched, log_path.read_text()


def test_wall_clock_stop_and_warmdown_with_a_simulated_clock(tg, tiny_data, tmp_path, monkeypatch):
    cap, wd = 12.0, 4
    cfg = small_cfg(tg, *tiny_data, MAX_WALLCLOCK_SECONDS=cap, WARMDOWN_ITERS=wd, ITERATIONS=1000, WARMUP_STEPS=0)
    clock = FakeClock(0.5)
    out, model, lr_calls, sched, log = run_train(tg, cfg, tmp_path, clock, monkeypatch)
    # train_time of every step, from the log (one line per step: TRAIN_LOG_EVERY=1)
    times = {int(s): float(t) for s, t in re.findall(r"^step:(\d+)/1000 train_loss:\S+ train_time:(\d+)ms", log, re.M)}
    steps = out["steps"]
    assert sorted(times) == list(range(1, steps + 1))
    step_ms = times[2] - times[1]
    assert step_ms > 0 and all(times[s + 1] - times[s] == step_ms for s in range(1, steps))  # fixed cost per step
    # the stop rule: the first step whose elapsed time reaches the cap is the last one
    assert times[steps] >= 1000 * cap > times[steps - 1]
    assert f"stopping_early: wallclock_cap train_time:{times[steps]:.0f}ms step:{steps}/1000" in log
    assert 1000 * cap <= 1000 * out["train_seconds"] <= 1000 * cap + 2 * step_ms
    assert re.search(rf"^step:{steps}/1000 val_loss:\S+ val_bpb:nan", log, re.M)  # the final validation
    # the schedule: one lr_mul per step, handed to the optimizers unchanged, with the warmup momentum
    assert [s for s, _, _ in lr_calls] == list(range(steps))
    assert [(s, m) for s, m, *_ in sched] == [(s, m) for s, _, m in lr_calls]
    for s, m, muon_lr, mom, adam_lrs in sched:
        assert muon_lr == pytest.approx(cfg.matrix_lr * m)
        assert mom == pytest.approx(tg.muon_momentum_at(s, cfg))
        assert adam_lrs == pytest.approx([cfg.tied_embed_lr * m, cfg.scalar_lr * m])
    # linear decay to 0 over the last WARMDOWN_ITERS * step_time of the budget
    for s, elapsed, m in lr_calls:
        est_step = elapsed / max(s, 1)
        ideal = min(1.0, max(1000 * cap - elapsed, 0) / (wd * est_step))
        assert m == pytest.approx(ideal, abs=1e-9)
        if s >= 3:  # once the step-time estimate has settled, the decay tracks the true step time
            assert m == pytest.approx(min(1.0, max(1000 * cap - elapsed, 0) / (wd * step_ms)), abs=0.1)
    muls = [m for _, _, m in lr_calls]
    assert muls[0] == 1.0 and muls[-1] < 1.5 / wd
    decaying = [m for m in muls if m < 1.0]
    assert len(decaying) >= wd - 1 and all(b < a for a, b in zip(decaying, decaying[1:]))
    assert "late_qat:enabled" in log  # LATE_QAT_THRESHOLD 0.15 is crossed near the end
    assert model.qat is False


def test_iterations_cap_comes_first(tg, tiny_data, tmp_path, monkeypatch):
    cfg = small_cfg(tg, *tiny_data, MAX_WALLCLOCK_SECONDS=1000, ITERATIONS=3, WARMUP_STEPS=0, WARMDOWN_ITERS=2)
    out, _, lr_calls, _, log = run_train(tg, cfg, tmp_path, FakeClock(0.5), monkeypatch)
    assert out["steps"] == 3
    assert "stopping_early" not in log
    assert [m for *_, m in lr_calls] == [1.0, 1.0, 1.0]


def test_warmup_steps_are_undone(tg, tiny_data, tmp_path, monkeypatch):
    finals = []
    for warm in (0, 2):
        cfg = small_cfg(tg, *tiny_data, ITERATIONS=2, WARMUP_STEPS=warm)
        _, model, _, _, log = run_train(tg, cfg, tmp_path, FakeClock(0.01), monkeypatch)
        assert len(re.findall(r"^warmup_step:\d+/\d+$", log, re.M)) == warm
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k


# ---- in-process end-to-end ----
SUMMARY_KEYS = {"run_id", "config", "device", "world_size", "steps", "train_seconds", "model_params", "bytes_code",
                "bytes_model", "bytes_total", "fits", "val_tokens", "val_bytes", "stages", "val_bpb", "eval_seconds",
                "peak_memory_mb"}
STAGES = ["post_ema", "roundtrip", "sliding", "sliding_slot", "ttt", "ttt_slot"]


@pytest.fixture(scope="module")
def e2e(tg, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e_out")
    env = tiny_run.tiny_env(*tiny_data, out)
    summary = tg.run(env)
    return env, out, summary


def test_run_summary(tg, e2e):
    env, out, s = e2e
    assert SUMMARY_KEYS <= set(s)
    on_disk = json.loads((out / "tiny.json").read_text())
    assert on_disk == json.loads(json.dumps(s, default=str))
    assert s["run_id"] == "tiny" and s["device"] == "cpu" and s["world_size"] == 1 and s["mode"] == "train"
    assert s["steps"] == 3 and s["train_seconds"] > 0
    assert s["config"]["num_layers"] == 2 and s["config"]["vocab_size"] == tiny_run.VOCAB
    assert s["model_params"] == tg.count_params(tg.GPT(tg.Config.from_env(env)))
    assert s["val_tokens"] == 639
    assert list(s["stages"]) == STAGES
    for name, st in s["stages"].items():
        assert set(st) >= {"val_loss", "val_bpb", "seconds"}
        assert math.isfinite(st["val_loss"]) and math.isfinite(st["val_bpb"]) and st["seconds"] >= 0
        assert 0 < st["val_loss"] < 2 * math.log(tiny_run.VOCAB), name
        assert st["compliance"] == ("non-causal" if name.endswith("_slot") else "causal")
    # bpb = nats per byte / ln 2, with the same byte count for every sliding/TTT stage
    nats_per_byte = s["stages"]["sliding"]["val_loss"] * s["val_tokens"] / s["val_bytes"]
    assert s["stages"]["sliding"]["val_bpb"] == pytest.approx(nats_per_byte / math.log(2), rel=1e-12)
    assert s["val_bpb"] == s["stages"]["ttt_slot"]["val_bpb"] and s["final_stage"] == "ttt_slot"
    assert s["final_compliant_stage"] == "ttt" and s["val_bpb_compliant"] == s["stages"]["ttt"]["val_bpb"]
    assert s["eval_seconds"] > 0 and s["peak_memory_mb"] > 0
    # bytes: code + the artifact file as written
    artifact = Path(s["artifact"])
    assert artifact == out / "tiny.ptz" and artifact.is_file()
    assert s["bytes_model"] == artifact.stat().st_size
    assert s["bytes_code"] == len((tiny_run.TRAIN_GPT).read_bytes())
    assert s["bytes_total"] == s["bytes_code"] + s["bytes_model"]
    assert s["fits"] is (s["bytes_total"] <= 16_000_000) and s["fits"] is True
    assert sorted(p.name for p in out.iterdir()) == ["tiny.json", "tiny.ptz", "tiny.txt"]


def test_run_log_exact_lines(tg, e2e):
    env, out, s = e2e
    log = (out / "tiny.txt").read_text()
    exact = tiny_run.exact_lines(log)
    legacy = {"final_int6_roundtrip": "roundtrip", "final_int6_sliding_window": "sliding", "legal_ttt": "ttt"}
    assert set(exact) == set(STAGES[1:]) | set(legacy)
    for name, (loss, bpb) in exact.items():
        st = s["stages"][legacy.get(name, name)]
        assert loss == round(st["val_loss"], 8) and bpb == round(st["val_bpb"], 8), name
    assert f"model_params:{s['model_params']}" in log
    assert f"Total submission size int6: {s['bytes_total']} bytes" in log
    assert "config PRESET=competition " in log
    assert re.search(r"^step:3/3 val_loss:[\d.]+ val_bpb:[\d.]+ train_time:\d+ms", log, re.M)
    assert re.findall(r"^warmup_step:.*$", log, re.M) == ["warmup_step:1/1"]


def test_eval_only_reproduces_the_stages_exactly(tg, e2e, tmp_path):
    env, out, s = e2e
    env2 = dict(env, EVAL_ONLY="1", LOAD_ARTIFACT=s["artifact"], RUN_ID="again", OUT_DIR=str(tmp_path))
    s2 = tg.run(env2)
    assert s2["mode"] == "eval_only" and s2["steps"] == 0
    assert list(s2["stages"]) == STAGES[1:]  # no post_ema without training
    for name in STAGES[1:]:
        assert s2["stages"][name]["val_loss"] == s["stages"][name]["val_loss"], name
        assert s2["stages"][name]["val_bpb"] == s["stages"][name]["val_bpb"], name
    assert (s2["bytes_model"], s2["bytes_total"], s2["model_params"], s2["val_bytes"]) == \
        (s["bytes_model"], s["bytes_total"], s["model_params"], s["val_bytes"])
    exact1 = tiny_run.exact_lines((out / "tiny.txt").read_text())
    exact2 = tiny_run.exact_lines((tmp_path / "again.txt").read_text())
    assert exact2 == exact1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.json", "again.txt"]  # no new artifact


def test_eval_only_with_a_damaged_artifact_is_one_line(tg, e2e, tmp_path, capsys):
    import signal
    env, _, s = e2e
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(Path(s["artifact"]).read_bytes()[:100])
    old = signal.getsignal(signal.SIGTERM)
    try:
        rc = tg.main(dict(env, EVAL_ONLY="1", LOAD_ARTIFACT=str(bad), RUN_ID="bad", OUT_DIR=str(tmp_path / "o")))
    finally:
        signal.signal(signal.SIGTERM, old)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(bad) in err[0] and err[0].startswith("error: ")


def test_run_fits_the_artifact_into_the_target(tg, e2e, tiny_data, tmp_path, monkeypatch):
    """ARTIFACT_TARGET_BYTES below the natural size: the run coarsens the int6 grid, says so, writes an artifact
    that fits, and evaluates that artifact (the roundtrip is of the written file)."""
    env, out, s = e2e
    monkeypatch.setattr(tg, "PASSTHROUGH_MAX", 1024)  # the tiny model's matrices become int6
    base = tg.run(dict(env, RUN_ID="plain", OUT_DIR=str(tmp_path), EVAL_BATCH_SEQS="64", TTT_ENABLED="0"))
    assert base["int6_step"] == 1.0
    target = base["bytes_code"] + int(0.9 * base["bytes_model"])
    fit = tg.run(dict(env, RUN_ID="fit", OUT_DIR=str(tmp_path), EVAL_BATCH_SEQS="64", TTT_ENABLED="0",
                      ARTIFACT_TARGET_BYTES=str(target)))
    assert fit["int6_step"] > 1.0 and fit["bytes_total"] <= target and fit["fits"] is True
    assert fit["bytes_model"] == (tmp_path / "fit.ptz").stat().st_size
    log = (tmp_path / "fit.txt").read_text()
    assert re.search(rf"^artifact_fit: int6 step x[\d.]+ to fit ARTIFACT_TARGET_BYTES={target} ", log, re.M)
    assert fit["stages"]["post_ema"]["val_loss"] == base["stages"]["post_ema"]["val_loss"]  # only the export differs
    assert fit["stages"]["roundtrip"]["val_loss"] != base["stages"]["roundtrip"]["val_loss"]


# ---- host syncs of a training step ----
class SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts what blocks the host on a GPU: .item(), bool() and tolist() (aten._local_scalar_dense, is_nonzero), and
    copies from a device to the CPU. On a CPU every tensor is a host tensor, so each of these counts."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.n += 1
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device", src.device)
            self.n += int(src.device.type != "cpu" and torch.device(dst).type == "cpu")
        return func(*args, **kwargs)


def test_a_training_step_syncs_the_host_once(tg, tiny_data, tmp_path, monkeypatch):
    """A step that logs nothing has one host sync: the stop decision (time up, or a non-finite loss on any rank), as
    the reference's one per step. Counted over the steps of two runs that differ by two unlogged steps."""
    counts = {}
    for iters in (12, 14):
        cfg = small_cfg(tg, *tiny_data, ITERATIONS=iters, WARMUP_STEPS=0, TRAIN_LOG_EVERY=1000, WARMDOWN_ITERS=4)
        with SyncCounter() as c:
            out, *_ = run_train(tg, cfg, tmp_path, FakeClock(0.01), monkeypatch)
        assert out["steps"] == iters
        counts[iters] = c.n
    assert (counts[14] - counts[12]) / 2 == 1, counts


def test_rerun_with_the_same_run_id_is_refused(tg, e2e, capsys):
    """A second run with the RUN_ID of a finished one is refused (one line naming the log) before anything is
    touched: the old log used to get the second run appended, and its summary and artifact were overwritten."""
    import signal
    env, out, s = e2e
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    old = signal.getsignal(signal.SIGTERM)
    try:
        rc = tg.main(env)
    finally:
        signal.signal(signal.SIGTERM, old)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"error: {out / 'tiny.txt'} exists (an earlier run with RUN_ID=tiny): set another RUN_ID, or "
                      "unset it for a fresh one")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_packed_wrapper_runs_identically(tg, tiny_data, tmp_path):
    """The same tiny run from the raw train_gpt.py and from its packed wrapper (tools/pack_code.py, as a record
    ships it): identical scores; each counts its own file's bytes as code (and fits the artifact with them), logs
    that file's sha256 at start, and embeds the source it executed (for the wrapper: the minified source)."""
    import hashlib
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor
    sys.path.insert(0, str(tiny_run.REPO_ROOT / "tools"))
    import pack_code
    wrapper = tmp_path / "packed" / "train_gpt.py"
    assert pack_code.main([str(tiny_run.TRAIN_GPT), "-o", str(wrapper)]) == 0
    files = {"raw": tiny_run.TRAIN_GPT, "packed": wrapper}

    def run(name):
        knobs = {f.name.upper() for f in dataclasses.fields(tg.Config)} | {"PRESET", "DEBUG"}
        env = {k: v for k, v in os.environ.items() if k not in knobs}
        env.update(tiny_run.tiny_env(*tiny_data, tmp_path / name, RUN_ID=name, TTT_ENABLED="0"))
        return subprocess.run([sys.executable, str(files[name])], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)

    with ThreadPoolExecutor(2) as ex:
        results = dict(zip(files, ex.map(run, files)))
    logs, sums = {}, {}
    for name, r in results.items():
        assert r.returncode == 0, r.stderr[-2000:]
        logs[name] = (tmp_path / name / f"{name}.txt").read_text()
        sums[name] = json.loads((tmp_path / name / f"{name}.json").read_text())
    exact = {k: tiny_run.exact_lines(v) for k, v in logs.items()}
    assert exact["raw"] and exact["packed"] == exact["raw"]
    executed = {"raw": tiny_run.TRAIN_GPT.read_text(), "packed": pack_code.unpack(wrapper.read_bytes())[1].decode()}
    for name, path in files.items():
        data, log, s = path.read_bytes(), logs[name], sums[name]
        assert s["bytes_code"] == len(data) and s["bytes_total"] == len(data) + s["bytes_model"]
        assert re.search(rf"^Code size: {len(data)} bytes", log, re.M)
        assert f"\ncode:train_gpt.py bytes:{len(data)} sha256:{hashlib.sha256(data).hexdigest()} " \
               f"packed:{int(name == 'packed')}\n" in log
        assert log.split("\n", 1)[1].startswith(executed[name] + "\npython:")  # the source that ran, then the runtime
    assert "Code size: %d bytes (the packed wrapper that ran)" % wrapper.stat().st_size in logs["packed"]
    assert sums["packed"]["bytes_model"] == sums["raw"]["bytes_model"]
    assert len(wrapper.read_bytes()) < len(tiny_run.TRAIN_GPT.read_bytes()) // 3
    # the real logs package and audit: the wrapper run ships the wrapper (default), the raw run the raw file
    import check_record
    import make_record
    for name, extra in (("packed", []), ("raw", ["--raw-code"])):
        assert make_record.main(["--runs", str(tmp_path / name / f"{name}.json"), "--name", f"Tiny_{name}",
                                 "--author", "T", "--github-id", "t", "--track", "cpu_demo", "--date", "2026-01-02",
                                 "--records-dir", str(tmp_path / "records"), *extra]) == 0
        folder = tmp_path / "records" / "cpu_demo" / f"2026-01-02_Tiny_{name}"
        assert (folder / "train_gpt.py").read_bytes() == files[name].read_bytes()
        assert (folder / "train_gpt_source.py").exists() == (name == "packed")
        assert check_record.main([str(folder)]) == 0
