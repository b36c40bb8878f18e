"""Reliability: every way a run can go wrong ends with one clear line, the right exit status and no traceback.

Every test runs the real script (`python train_gpt.py`, or torchrun) as a subprocess on a tiny model and tiny
shards written with `train_gpt.write_shard`; kills and signals are real. The fast failures (bad data, tokenizer,
config, artifact) are a table run two at a time by one fixture; each row is then its own test.
Needs the offline tokenizer (data/tokenizers/offline_1024_bpe.model); skips cleanly without it.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "train_gpt.py"
TOKENIZER = REPO_ROOT / "data" / "tokenizers" / "offline_1024_bpe.model"
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(),
                                reason=f"{TOKENIZER} is absent (python data/prepare_offline.py)")

TINY = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", VE_LAYERS="0,1", XSA_LAST_N="1",
            BIGRAM_VOCAB_SIZE="64", TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="2048", EVAL_SEQ_LEN="32",
            EVAL_STRIDE="8", EVAL_BATCH_SEQS="8", TTT_CHUNK_TOKENS="256", VAL_BATCH_SIZE="2048", ITERATIONS="3",
            WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0", VAL_MAX_TOKENS="2000", OMP_NUM_THREADS="1", PRESET="cpu",
            VOCAB_SIZE="1024", TOKENIZER_PATH=str(TOKENIZER))
FAST = dict(TTT_ENABLED="0", SLOT_ENABLED="0")  # for runs whose eval does not matter
NO_TRACEBACK = "Traceback"


@dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err


def _clean_env() -> dict:
    """The inherited environment without anything train_gpt.py (or torchrun) would read."""
    import train_gpt as tg
    ours = {f.name.upper() for f in tg.fields(tg.Config)} | set(tg.RETIRED_VARS) | tg.FOREIGN_VARS
    return {k: v for k, v in os.environ.items()
            if k not in ours and not k.startswith(tg._OUR_PREFIXES) and not k.startswith(("TORCHELASTIC_", "PET_"))}


def make_env(data: Path, out: Path, **over) -> dict:
    env = _clean_env()
    env.update(TINY, DATA_PATH=str(data), OUT_DIR=str(out))
    env.update({k: str(v) for k, v in over.items()})
    return env


def _default_sigint():  # a background shell starts children with SIGINT ignored; Python then keeps ignoring it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(env: dict, cwd: Path, timeout: float = 120, argv=None) -> Result:
    t = time.time()
    p = subprocess.run(argv or [sys.executable, str(SCRIPT)], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, preexec_fn=_default_sigint)
    return Result(p.returncode, p.stdout, p.stderr, time.time() - t)


class Running:
    """A background run whose output goes to files (no pipe can fill up); `log` is its OUT_DIR/<RUN_ID>.txt."""

    def __init__(self, env: dict, cwd: Path, log: Path):
        self.log, cwd = log, Path(cwd)
        self.out_f, self.err_f = open(cwd / f"{log.stem}.stdout", "w+"), open(cwd / f"{log.stem}.stderr", "w+")
        self.t0 = time.time()
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT)], env=env, cwd=cwd, stdout=self.out_f,
                                     stderr=self.err_f, text=True, preexec_fn=_default_sigint)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120) -> None:
        """Poll the log file until a line matches `pattern` `count` times (the log holds the program's source:
        patterns must match real log lines, not the f-strings that print them)."""
        end = time.time() + timeout
        needle = re.compile(pattern, re.M)
        while time.time() < end:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            if len(needle.findall(text)) >= count:
                return
            if self.proc.poll() is not None:
                pytest.fail(f"run ended (rc={self.proc.returncode}) before {needle!r}:\n{self.result().text[-3000:]}")
            time.sleep(0.01)
        self.proc.kill()
        pytest.fail(f"no {needle!r} in {self.log} after {timeout}s")

    def result(self, timeout: float = 120) -> Result:
        self.proc.wait(timeout)
        self.out_f.seek(0)
        self.err_f.seek(0)
        r = Result(self.proc.returncode, self.out_f.read(), self.err_f.read(), time.time() - self.t0)
        self.out_f.close()
        self.err_f.close()
        return r


def one_error_line(r: Result, rc: int, *fragments: str) -> str:
    """The run exited with `rc`, printed no traceback, and stderr is exactly one line holding every fragment."""
    assert NO_TRACEBACK not in r.text, r.text[-3000:]
    assert r.rc == rc, f"rc={r.rc} (want {rc}):\n{r.text[-3000:]}"
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{r.err}"
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---- shared data and one full run ----
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tg):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    tg.write_shard(d / "fineweb_train_000000.bin", rng.integers(0, 1024, 20000))
    tg.write_shard(d / "fineweb_val_000000.bin", rng.integers(0, 1024, 3000))
    return d


BASE_RUN_ID = "base"
BASE_OVER = dict(RUN_ID=BASE_RUN_ID, SEED=7, TTT_EPOCHS=1)  # TTT and SLOT on: every eval stage exists


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_dir):
    """One complete run, with a typo'd variable and a tiny eval budget (neither changes the numbers); a second
    run of the same config and seed goes alongside it (in its own OUT_DIR) for the determinism test."""
    work = tmp_path_factory.mktemp("base")
    env = make_env(data_dir, work / "out", SLOT_ENABLE=1, EVAL_TIME_LIMIT_SECONDS=0.001, **BASE_OVER)
    env2 = dict(env, OUT_DIR=str(work / "out2"))
    with ThreadPoolExecutor(2) as ex:
        r, r2 = ex.map(lambda e: run_script(e, work, timeout=300), (env, env2))
    for x in (r, r2):
        assert x.rc == 0 and NO_TRACEBACK not in x.text, x.text[-3000:]
    out = work / "out"
    return dict(result=r, env=env, out=out, ptz=out / f"{BASE_RUN_ID}.ptz",
                summary=json.loads((out / f"{BASE_RUN_ID}.json").read_text()), again=(r2, work / "out2"))


# ---- the fast failures: a table, run two at a time ----
def _write_bad_shard(src: Path, dst: Path, defect: str) -> None:
    raw = bytearray(src.read_bytes())
    head = np.frombuffer(bytes(raw[:1024]), dtype="<i4").copy()
    if defect == "magic":
        head[0] = 12345
    elif defect == "version":
        head[1] = 7
    raw[:1024] = head.tobytes()
    if defect == "truncated":
        raw = raw[:-100]
    if defect == "token":
        toks = np.frombuffer(bytes(raw[1024:]), dtype="<u2").copy()
        toks[42] = 1500
        raw[1024:] = toks.tobytes()
    dst.write_bytes(bytes(raw))


def _train_only(data: Path, d: Path) -> dict:
    (d / "tr").mkdir()
    shutil.copy(data / "fineweb_train_000000.bin", d / "tr")
    return dict(DATA_PATH=d / "tr")


def _data_variant(data: Path, d: Path, split: str, defect: str) -> dict:
    nd = d / "data"
    shutil.copytree(data, nd)
    f = nd / f"fineweb_{split}_000000.bin"
    _write_bad_shard(data / f.name, f, defect)
    return dict(DATA_PATH=nd)


HOW_TO_GET_DATA = "python data/prepare_offline.py"
# id: (setup(data_dir, case_dir, base) -> env overrides, exit status, fragments of the one line ({d}: case_dir))
CASES = {
    # DATA_PATH missing, empty, or without val shards
    "data_missing": (lambda data, d, b: dict(DATA_PATH=d / "nope"), 2,
                     ["DATA_PATH {d}/nope does not exist", HOW_TO_GET_DATA]),
    "data_empty": (lambda data, d, b: (d / "empty").mkdir() or dict(DATA_PATH=d / "empty"), 2,
                   ["DATA_PATH {d}/empty has no fineweb_val_*.bin shards", HOW_TO_GET_DATA]),
    "data_no_val": (lambda data, d, b: _train_only(data, d), 2,
                    ["DATA_PATH {d}/tr has no fineweb_val_*.bin shards", HOW_TO_GET_DATA]),
    # shard defects: the file and the defect
    "shard_bad_magic": (lambda data, d, b: _data_variant(data, d, "val", "magic"), 2,
                        ["{d}/data/fineweb_val_000000.bin: bad magic 12345 (expected 20240520)"]),
    "shard_bad_version": (lambda data, d, b: _data_variant(data, d, "val", "version"), 2,
                          ["{d}/data/fineweb_val_000000.bin: unsupported shard version 7 (expected 1)"]),
    "shard_truncated": (lambda data, d, b: _data_variant(data, d, "val", "truncated"), 2,
                        ["{d}/data/fineweb_val_000000.bin: truncated body", "3000 tokens"]),
    "shard_token_id": (lambda data, d, b: _data_variant(data, d, "val", "token"), 2,
                       ["{d}/data/fineweb_val_000000.bin: token id 1500 at index 42 is >= VOCAB_SIZE=1024"]),
    "train_shard_token_id": (lambda data, d, b: _data_variant(data, d, "train", "token"), 2,
                             ["{d}/data/fineweb_train_000000.bin: token id 1500 at index 42 is >= VOCAB_SIZE=1024"]),
    # tokenizer: both values
    "tokenizer_missing": (lambda data, d, b: dict(TOKENIZER_PATH=d / "no.model"), 2,
                          ["TOKENIZER_PATH {d}/no.model does not exist", "VOCAB_SIZE=1024"]),
    "tokenizer_vocab": (lambda data, d, b: dict(VOCAB_SIZE=512), 2,
                        [f"TOKENIZER_PATH {TOKENIZER} has vocab size 1024 but VOCAB_SIZE=512"]),
    # malformed or out-of-range values: the variable and the allowed values
    "slot_steps_abc": (lambda data, d, b: dict(SLOT_STEPS="abc"), 2,
                       ["SLOT_STEPS='abc' is malformed: expected an integer"]),
    "eval_stride_0": (lambda data, d, b: dict(EVAL_STRIDE=0), 2,
                      ["EVAL_STRIDE=0 is out of range: must be a positive integer"]),
    "eval_stride_gt_seq": (lambda data, d, b: dict(EVAL_STRIDE=64), 2,
                           ["EVAL_STRIDE=64 is out of range: <= EVAL_SEQ_LEN=32"]),
    "ttt_chunk_not_multiple": (lambda data, d, b: dict(TTT_CHUNK_TOKENS=100), 2,
                               ["TTT_CHUNK_TOKENS=100 is out of range: a multiple of EVAL_STRIDE=8"]),
    "matrix_lr_negative": (lambda data, d, b: dict(MATRIX_LR=-0.1), 2,
                           ["MATRIX_LR=-0.1 is out of range: must be >= 0"]),
    "tied_embed_lr_negative": (lambda data, d, b: dict(TIED_EMBED_LR=-1e-3), 2,
                               ["TIED_EMBED_LR=-0.001 is out of range: must be >= 0"]),
    "slot_mode_other": (lambda data, d, b: dict(SLOT_MODE="other"), 2,
                        ["SLOT_MODE='other' is out of range: one of batch, causal"]),
    # LOAD_ARTIFACT missing, truncated, corrupted: the file (and nothing is touched: see test_load_artifact)
    "artifact_missing": (lambda data, d, b: dict(EVAL_ONLY=1, LOAD_ARTIFACT=d / "gone.ptz"), 2,
                         ["LOAD_ARTIFACT {d}/gone.ptz: cannot read (No such file or directory)"]),
    "artifact_truncated": (lambda data, d, b: _bad_artifact(b, d, "truncated"), 2,
                           ["{d}/bad.ptz: truncated or corrupted artifact"]),
    "artifact_header_truncated": (lambda data, d, b: _bad_artifact(b, d, "header"), 2,
                                  ["{d}/bad.ptz: truncated artifact (12 bytes: the header is incomplete)"]),
    "artifact_corrupted": (lambda data, d, b: _bad_artifact(b, d, "corrupted"), 2,
                           ["{d}/bad.ptz: ", "corrupted artifact"]),
    "artifact_not_ours": (lambda data, d, b: _bad_artifact(b, d, "garbage"), 2,
                          ["{d}/bad.ptz: not an artifact of this program (bad magic)"]),
    # a rerun with the RUN_ID of an earlier run: refused, the earlier log untouched (it used to get a second run)
    "run_id_exists": (lambda data, d, b: (d / "out" / "run_id_exists.txt").write_text("an earlier run\n") and {}, 2,
                      ["{d}/out/run_id_exists.txt exists (an earlier run with RUN_ID=run_id_exists)",
                       "set another RUN_ID"]),
}
ARTIFACT_CASES = [k for k in CASES if k.startswith("artifact_")]
CONFIG_CASES = ["slot_steps_abc", "eval_stride_0", "eval_stride_gt_seq", "ttt_chunk_not_multiple",
                "matrix_lr_negative", "tied_embed_lr_negative", "slot_mode_other"]


def _bad_artifact(base: dict, d: Path, how: str) -> dict:
    blob = bytearray(base["ptz"].read_bytes())
    if how == "truncated":
        blob = blob[: len(blob) // 2]
    elif how == "header":
        blob = blob[:12]
    elif how == "corrupted":  # flip bytes in the middle of the compressed payload
        mid = len(blob) // 2
        blob[mid: mid + 64] = bytes(b ^ 0xFF for b in blob[mid: mid + 64])
    else:
        blob = bytearray(os.urandom(4096))
    (d / "bad.ptz").write_bytes(bytes(blob))
    return dict(EVAL_ONLY=1, LOAD_ARTIFACT=d / "bad.ptz")


@pytest.fixture(scope="module")
def fast_results(tmp_path_factory, data_dir, base):
    """Run every row of CASES (two at a time); each case gets its own folder (cwd) and a pre-filled OUT_DIR."""
    cases = {}
    for cid, (setup, _, _) in CASES.items():
        d = tmp_path_factory.mktemp(cid)
        out = d / "out"
        out.mkdir()
        (out / "previous.txt").write_text("a file from an earlier run\n")
        env = make_env(data_dir, out, RUN_ID=cid, **FAST)
        env.update({k: str(v) for k, v in setup(data_dir, d, base).items()})
        cases[cid] = (d, env, snapshot(d))

    def one(cid):
        d, env, before = cases[cid]
        r = run_script(env, d, timeout=120)
        return cid, (d, r, before, snapshot(d))

    with ThreadPoolExecutor(2) as ex:
        return dict(ex.map(one, CASES))


@pytest.mark.parametrize("cid", list(CASES))
def test_fast_failure_is_one_line(cid, fast_results):
    d, r, before, after = fast_results[cid]
    _, rc, frags = CASES[cid]
    line = one_error_line(r, rc, *(f.format(d=d) for f in frags))
    assert line.startswith("error: "), line
    print(f"{cid}: {line}")  # `pytest -rP -k fast_failure` lists every row's message
    assert r.seconds < 60, f"{cid} took {r.seconds:.0f}s to fail"


@pytest.mark.parametrize("cid", CONFIG_CASES + ARTIFACT_CASES + ["run_id_exists"])
def test_failure_touches_nothing(cid, fast_results):
    """Bad config values and bad LOAD_ARTIFACT files fail before anything is created or modified (OUT_DIR, cwd)."""
    d, r, before, after = fast_results[cid]
    assert after == before, f"files changed: {set(after.items()) ^ set(before.items())}"


# ---- the full run: typo warning, eval budget guard, determinism ----
def test_unknown_variable_warns_and_run_works(base):
    r = base["result"]
    warn = [l for l in r.out.splitlines() if "SLOT_ENABLE=" in l]
    assert warn == ["WARNING: unknown variable SLOT_ENABLE=1 is ignored; did you mean SLOT_ENABLED?"], warn
    assert base["summary"]["stages"] and base["ptz"].is_file()


def test_eval_budget_warning_before_eval(base):
    lines = base["result"].out.splitlines()
    warn = [i for i, l in enumerate(lines) if l.startswith("WARNING: estimated eval time")]
    assert len(warn) == 1, lines
    line = lines[warn[0]]
    assert re.fullmatch(r"WARNING: estimated eval time [0-9.e+-]+s exceeds EVAL_TIME_LIMIT_SECONDS=0\.001 .*",
                        line), line
    first_stage = next(i for i, l in enumerate(lines) if l.startswith("stage:"))
    assert warn[0] < first_stage
    assert any(l.startswith("eval_budget:estimate_seconds:") for l in lines[:warn[0]])


def test_deterministic_on_cpu(base):
    """Same config and seed, one process each: every stage's val_bpb and val_loss identical to the last digit."""
    r, out2 = base["again"]
    again = json.loads((out2 / f"{BASE_RUN_ID}.json").read_text())
    first = base["summary"]
    assert set(first["stages"]) >= {"post_ema", "roundtrip", "sliding", "sliding_slot", "ttt", "ttt_slot"}
    assert list(again["stages"]) == list(first["stages"])
    for k, s in first["stages"].items():
        assert (again["stages"][k]["val_bpb"], again["stages"][k]["val_loss"]) == (s["val_bpb"], s["val_loss"]), k
    exact = lambda out: [l for l in out.splitlines() if "_exact " in l]
    assert exact(r.out) == exact(base["result"].out) and exact(r.out)
    assert (out2 / f"{BASE_RUN_ID}.ptz").read_bytes() == base["ptz"].read_bytes()


# ---- world size ----
def test_world_size_not_dividing_the_batch(data_dir, tmp_path):
    """torchrun with 3 gloo ranks: rank 0 prints one line (torchrun itself then reports the failed workers)."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    env = make_env(data_dir, tmp_path / "out", RUN_ID="ws", **FAST)
    r = run_script(env, tmp_path, timeout=300,
                   argv=[torchrun, "--standalone", "--nproc_per_node=3", str(SCRIPT)])
    assert r.rc != 0
    errors = [l for l in r.text.splitlines() if l.startswith("error:")]
    assert errors == ["error: world size 3 must divide 8 (the global batch TRAIN_BATCH_TOKENS=2048 is split into 8 "
                      "micro-batches): use 1, 2, 4 or 8 processes"], r.text[-3000:]
    # torchrun's own launcher prints a ChildFailedError traceback for any failed worker; none comes from our ranks
    assert 'train_gpt.py", line' not in r.text, r.text[-3000:]
    assert "exitcode  : 2" in r.text
    assert not (tmp_path / "out" / "ws.ptz").exists()


def test_more_ranks_than_micro_batches(tg):
    cfg = tg.Config.from_env(dict(TINY))
    with pytest.raises(tg.UserError, match=r"world size 16 must divide 8 .*use 1, 2, 4 or 8 processes"):
        tg.grad_accum_steps(cfg, 16)
    assert tg.grad_accum_steps(cfg, 8) == 1


# ---- kills and signals ----
def test_kill9_during_export_keeps_previous_artifact(base, tmp_path):
    """Rerun the base run (same RUN_ID, a copy of its OUT_DIR without the log, which would refuse the rerun) and
    SIGKILL it once it reaches the export."""
    out = tmp_path / "out"
    shutil.copytree(base["out"], out)
    (out / f"{BASE_RUN_ID}.txt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".ptz", ".json")}
    run = Running(dict(base["env"], OUT_DIR=str(out)), tmp_path, out / f"{BASE_RUN_ID}.txt")
    run.wait_for(r"^DIAGNOSTIC post_ema val_loss:\d")  # just before the export
    run.proc.send_signal(signal.SIGKILL)
    r = run.result()
    assert r.rc == -signal.SIGKILL
    assert "Serialized model" not in r.out, "the kill came too late: the export had finished"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".ptz", ".json")} == before


def test_kill9_mid_write_keeps_previous_file(tmp_path):
    """atomic_write in a child, SIGKILLed after the new bytes are written but before the rename."""
    target = tmp_path / "model.ptz"
    code = f"""
import os, sys, time
sys.path.insert(0, {str(REPO_ROOT)!r})
import train_gpt as tg
from pathlib import Path
p = Path({str(target)!r})
tg.atomic_write(p, b"old" * 1000)
def stuck(fd):
    print("writing", flush=True)
    time.sleep(120)
tg.os.fsync = stuck
tg.atomic_write(p, b"new" * 3_000_000)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        tmps = [p for p in tmp_path.iterdir() if p != target]
        assert len(tmps) == 1 and tmps[0].stat().st_size == 9_000_000  # really mid-write: the temp file is full
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill()
    assert target.read_bytes() == b"old" * 1000
    assert tmps[0].name.startswith(".") and tmps[0].name.endswith(".tmp")  # a leftover never looks complete


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_training(sig, data_dir, tmp_path):
    out = tmp_path / "out"
    run = Running(make_env(data_dir, out, RUN_ID="sig", ITERATIONS=100000, **FAST), tmp_path, out / "sig.txt")
    run.wait_for(r"^step:2/100000 train_loss:\d")
    run.proc.send_signal(sig)
    r = run.result(timeout=60)
    one_error_line(r, 130, f"interrupted ({sig.name}): stopped", "no artifact or summary was written")
    assert sorted(p.name for p in out.iterdir()) == ["sig.txt"]  # no .ptz, .json or temp file


def test_crash_during_eval_then_eval_only_finishes(base, data_dir, tmp_path):
    out = tmp_path / "out"
    env = make_env(data_dir, out, **BASE_OVER)  # the base run's config: same seed, same artifact
    run = Running(env, tmp_path, out / f"{BASE_RUN_ID}.txt")
    run.wait_for(r"^Serialized model int6\+\w+: \d+ bytes")
    run.proc.send_signal(signal.SIGTERM)
    r = run.result(timeout=60)
    one_error_line(r, 130, "interrupted (SIGTERM)")
    ptz, summary = out / f"{BASE_RUN_ID}.ptz", out / f"{BASE_RUN_ID}.json"
    assert ptz.is_file() and not summary.exists()
    assert "final stage:" not in r.out, "the crash came too late: the eval had finished"
    r2 = run_script(dict(env, EVAL_ONLY="1", LOAD_ARTIFACT=str(ptz), RUN_ID="finish"), tmp_path, timeout=300)
    assert r2.rc == 0 and NO_TRACEBACK not in r2.text, r2.text[-3000:]
    s = json.loads((out / "finish.json").read_text())
    assert s["mode"] == "eval_only" and s["artifact"] == str(ptz)
    assert list(s["stages"]) == [k for k in base["summary"]["stages"] if k != "post_ema"]
    for k, st in s["stages"].items():  # the same artifact scores the same as in the uninterrupted run
        assert st["val_bpb"] == base["summary"]["stages"][k]["val_bpb"], k


def test_nonfinite_loss_stops_at_that_step(data_dir, tmp_path):
    out = tmp_path / "out"
    r = run_script(make_env(data_dir, out, RUN_ID="nan", MATRIX_LR=1e30, ITERATIONS=6, **FAST), tmp_path)
    line = one_error_line(r, 2, "non-finite training loss", "lower the learning rates")
    step = int(re.search(r"at step (\d+)", line).group(1))
    logged = [int(m) for m in re.findall(r"^step:(\d+)/6 train_loss", r.out, re.M)]
    assert logged == list(range(1, step)), (logged, line)  # every earlier step was finite and logged
    assert sorted(p.name for p in out.iterdir()) == ["nan.txt"]


def test_debug_shows_the_traceback(data_dir, tmp_path):
    r = run_script(make_env(data_dir, tmp_path / "out", DATA_PATH=tmp_path / "nope", DEBUG=1), tmp_path)
    assert r.rc == 1
    assert "Traceback (most recent call last)" in r.err and "DataError: DATA_PATH" in r.err
