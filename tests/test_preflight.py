"""tools/preflight.py on the CPU: the tiny config end to end (one process and torchrun with 2), its table and JSON,
the verdict's rules, the projection's batch counts against train_gpt's own scoring loop, and the one-line refusals
(DEVICE=cuda without CUDA, bad options, no data). The numbers of a CPU run mean nothing for a GPU; the code path is
the one a GPU runs."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tiny_run import REPO_ROOT, make_tiny_data

TOOLS = REPO_ROOT / "tools"
PREFLIGHT = TOOLS / "preflight.py"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
FAST = ["--tiny", "--steps", "8", "--warmup", "2", "--reps", "1"]


@pytest.fixture(scope="module")
def pf():
    import preflight
    return preflight


@pytest.fixture(scope="module")
def data_env(tg, tmp_path_factory):
    data, tok = make_tiny_data(tmp_path_factory.mktemp("preflight"), tg)
    return dict(DATA_PATH=str(data), TOKENIZER_PATH=str(tok), VOCAB_SIZE="320")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def preflight(args, env, timeout=300, torchrun=0):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                              if torchrun else []) + [str(PREFLIGHT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(data_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("pf") / "report.json"
    p = preflight(FAST + ["--json", str(out)], clean_env(**data_env))
    assert p.returncode == 0, p.stderr[-3000:]
    return p, json.loads(out.read_text())


def test_tiny_cpu_table(tiny_run):
    p, _ = tiny_run
    out = p.stdout
    for row in ("| attention backend (training) | sdpa x", "| attention backend (eval) | sdpa x",
                "| warmup: compile + 2 steps |", "| graphs compiled in the timed loop | 0 | 8 steps, late QAT from step 7",
                "| ms/step (1 process, 1,024 tokens/step) |", "| steps in MAX_WALLCLOCK_SECONDS=600 |",
                "| peak memory (training / eval) |", "| sliding plain |", "| SLOT batch (3 steps) |",
                "| SLOT causal (8 steps) |", "| TTT chunk |", "| SLOT off |", "| SLOT batch (configured) |",
                "| SLOT causal |"):
        assert row in out, row
    last = out.strip().splitlines()[-1]
    assert last.startswith("verdict: fix this first: ran on cpu, not a GPU"), last


def test_tiny_cpu_json(tg, tiny_run):
    _, r = tiny_run
    assert r["device_type"] == "cpu" and r["world_size"] == 1 and r["verdict"] == "fix this first"
    assert "not a GPU" in r["reasons"][0] and r["errors"] == []
    tr, ev, c = r["train"], r["eval"], r["config"]
    assert tr["steps"] == 8 and tr["warmup_steps"] == 2 and tr["late_qat_step"] == 7 and tr["recompiles"] == {}
    # attend counted every call: 2 layers x (8 micro-batches x (2 warmup + 8 timed steps) + 3 one-batch validations:
    # the warmup's priming, step 0 and the last step)
    assert tr["attention_calls"] == {"flash_attn_3": 0, "flash_attn_2": 0, "sdpa": 2 * (8 * 10 + 3)}
    assert tr["ms_per_step"] > 0 and tr["ms_per_step_8gpu"] == pytest.approx(tr["ms_per_step"] / 8)
    assert r["projection"]["steps"] == min(c["iterations"], int(600_000 / tr["ms_per_step_8gpu"]))
    assert set(ev["stages"]) == {"sliding plain", "SLOT batch", "SLOT causal", "TTT chunk"}
    assert all(st["ms"] >= 0 and st["first_seconds"] >= 0 for st in ev["stages"].values())
    assert all(ev["stages"][s]["ms"] > 0 for s in ("sliding plain", "SLOT batch", "SLOT causal"))
    assert ev["recompiles"] == {} and ev["attention_calls"]["sdpa"] > 0
    pe = r["projection"]["eval"]
    assert pe["ttt_chunks"] == math.ceil(r["val_tokens"] / c["ttt_chunk_tokens"])
    for m, part in pe["modes"].items():
        assert part["total"] == pytest.approx(part["roundtrip"] + part["sliding"] + part["ttt"] + part["compile"]), m
    assert pe["modes"]["batch"]["sliding"] == pytest.approx(pe["sliding_batches"] * ev["stages"]["SLOT batch"]["ms"] / 1e3)
    assert r["peak_memory_mb"] > 0 and r["device_memory_mb"] is None


def test_torchrun_two_processes(data_env, tmp_path):
    """The collectives of a multi-GPU preflight (gloo here): the ranks agree, rank 0 alone prints."""
    out = tmp_path / "r2.json"
    p = preflight(FAST + ["--json", str(out)], clean_env(**data_env), torchrun=2)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["train"]["steps"] == 8 and r["errors"] == []
    assert r["train"]["ms_per_step_8gpu"] == pytest.approx(r["train"]["ms_per_step"] * 2 / 8)
    assert r["eval"]["stages"]["TTT chunk"]["chunk_tokens"] == 512 * 2 // 8
    assert p.stdout.count("verdict:") == 1 and "| ms/step (2 processes," in p.stdout


# ---- the verdict ----
def go_report() -> dict:
    """A report the verdict passes: CUDA, flash-attn used everywhere, the seed's speed, eval in budget."""
    calls = {"flash_attn_3": 100, "flash_attn_2": 0, "sdpa": 0}
    return dict(device="cuda:0", device_type="cuda", errors=[], peak_memory_mb=40_000.0, device_memory_mb=81_559.0,
                attention=dict(flash_loaded="flash_attn_3", flash_notes=[]),
                config=dict(slot_enabled=True, slot_mode="batch", eval_time_limit_seconds=600.0),
                train=dict(recompiles={}, ms_per_step_8gpu=84.0, attention_calls=dict(calls)),
                eval=dict(recompiles={}, attention_calls=dict(calls)),
                projection=dict(steps=7142, eval=dict(modes={m: dict(total=t) for m, t in
                                                             (("off", 400.0), ("batch", 450.0), ("causal", 650.0))})))


def test_verdict_go(pf):
    assert pf.verdict(go_report()) == []


@pytest.mark.parametrize("change,words", [
    (lambda r: r.update(device="cpu", device_type="cpu"), "not a GPU"),
    (lambda r: r["errors"].append("training failed: OutOfMemoryError: CUDA out of memory"), "out of memory"),
    (lambda r: r["attention"]["flash_notes"].append("flash_attn_3 fails its first call (RuntimeError: x)"),
     "flash-attn is installed but unusable"),
    (lambda r: r["train"]["attention_calls"].update(sdpa=5), "5 attention calls ran on SDPA"),
    (lambda r: r["train"]["recompiles"].update(forward=1), "1 graphs compiled inside the timed training loop"),
    (lambda r: r["train"].update(ms_per_step_8gpu=90.0), "90.0 ms/step projected on 8 GPUs > 88.2"),
    (lambda r: r["eval"]["recompiles"].update(head_nll=2), "eval passes would recompile"),
    (lambda r: r["projection"]["eval"]["modes"]["batch"].update(total=601.0), "(SLOT batch) projected at 601 s"),
    (lambda r: r["config"].update(slot_mode="causal"), "(SLOT causal) projected at 650 s"),
    (lambda r: r.update(peak_memory_mb=80_000.0), "peak memory 80,000 MiB"),
])
def test_verdict_reasons(pf, change, words):
    r = go_report()
    change(r)
    reasons = pf.verdict(r)
    assert len(reasons) == 1 and words in reasons[0], reasons


def test_verdict_edges(pf):
    r = go_report()
    r["train"]["ms_per_step_8gpu"] = 84.0 * 1.05  # at the slack: still go
    assert pf.verdict(r) == []
    assert pf.verdict(r, slack=0.0)  # no slack: the seed's 84.0 is the limit
    r = go_report()
    r["config"]["slot_enabled"] = False  # SLOT off: the off projection (400 s) decides
    r["projection"]["eval"]["modes"]["batch"]["total"] = 9999.0
    assert pf.verdict(r) == []
    r = go_report()  # SDPA on a box without flash-attn: a note, not a reason
    r["attention"]["flash_loaded"] = None
    r["train"]["attention_calls"] = {"sdpa": 100}
    assert pf.verdict(r) == []


# ---- the projection counts what eval_pass runs ----
def test_projection_counts_the_batches_of_eval_pass(tg, pf, data_env, monkeypatch):
    """project_eval's batch and chunk counts for 8 ranks equal the scoring batches train_gpt.eval_pass runs on the
    busiest of 8 ranks (counted by wrapping score_batch), for the sliding pass and the TTT pass."""
    env = dict(pf.TINY_ENV, **data_env, EVAL_BATCH_SEQS="2", AMP="0")
    cfg = tg.Config.from_env(env)
    val = tg.ValData(tg.load_val_tokens(cfg), None)
    n = val.tokens.numel() - 1
    model = tg.GPT(cfg)
    rt = tg.Runtime(device=torch.device("cpu"), amp=False)
    calls = []

    def score_batch(model, hidden_fn, x, *args):  # counts; the scores themselves are not needed here
        calls.append(1)
        return torch.zeros_like(x, dtype=torch.bool), {"plain": torch.zeros(0, dtype=torch.float64)}
    monkeypatch.setattr(tg, "score_batch", score_batch)
    monkeypatch.setattr(tg, "ttt_train_chunk", lambda *a, **k: None)  # training does not change the count

    def busiest(ttt):
        counts = []
        for rank in range(8):
            calls.clear()
            tg.eval_pass(model, val, cfg, rt, seq_len=cfg.eval_seq_len, stride=cfg.eval_stride,
                         batch_seqs=cfg.eval_batch_seqs, slot=False, ttt=ttt, rank=rank, world=8)
            counts.append(len(calls))
        return max(counts)
    stages = {s: dict(ms=1.0, first_seconds=0.0) for s in ("sliding plain", "SLOT batch", "SLOT causal", "TTT chunk")}
    pe = pf.project_eval(cfg, n, dict(stages=stages))
    assert pe["sliding_batches"] == busiest(False)
    assert pe["ttt_batches"] == busiest(True)
    assert pe["ttt_chunks"] == math.ceil(n / cfg.ttt_chunk_tokens) > 1
    off = pe["modes"]["off"]
    assert off["sliding"] == pytest.approx(pe["sliding_batches"] / 1e3)
    assert off["ttt"] == pytest.approx(pe["ttt_chunks"] / 1e3)


def test_ttt_slice_gives_each_rank_the_8gpu_share(tg, pf):
    cfg = tg.Config()  # the competition shape: 32,768-token chunks, 16 rows, 512 windows
    for world in (1, 2, 4, 8):
        C, k = pf.ttt_slice_chunks(cfg, 32, world, 62_021_632)
        assert C == 32768 * world // 8 and k >= 2
        assert C // cfg.eval_stride // world == 512 // 8  # windows per rank per chunk, as on 8 GPUs
        assert len(tg.ttt_rows(0, C, cfg.eval_seq_len)) // world == 16 // 8  # training rows per rank
        assert len(tg.window_plan(k * C, cfg.eval_seq_len, cfg.eval_stride)) >= 32 * world
    with pytest.raises(pf.ToolError, match="TTT_CHUNK_TOKENS"):
        pf.ttt_slice_chunks(dataclasses.replace(cfg, ttt_chunk_tokens=64 * 12), 32, 1, 62_021_632)
    with pytest.raises(pf.ToolError, match="too short"):
        pf.ttt_slice_chunks(cfg, 32, 1, 10_000)


def test_bad_ttt_config_is_refused_before_training(pf, data_env, monkeypatch, capsys):
    for k, v in dict(data_env, TTT_CHUNK_TOKENS="1040", EVAL_STRIDE="16").items():  # 1040/8 = 130: not a multiple of 16
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(pf, "measure_training", lambda *a, **k: pytest.fail("trained before refusing"))
    assert pf.main(["--tiny"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "TTT_CHUNK_TOKENS=1040" in err, err


# ---- refusals: one line, exit 2 ----
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("how", ["env", "flag"])
def test_refuses_cuda_without_cuda(tg, pf, data_env, monkeypatch, capsys, how):
    for k, v in data_env.items():
        monkeypatch.setenv(k, v)
    if how == "env":
        monkeypatch.setenv("DEVICE", "cuda")
    rc = pf.main(["--tiny"] + (["--device", "cuda"] if how == "flag" else []))
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [f"error: {tg.cuda_problem()}"], err
    assert "CPU build" in err or "CUDA unusable" in err


def main_rc(pf, argv) -> int:
    try:
        return pf.main(argv)
    except SystemExit as e:  # argparse's own errors (tools/_cli.py: one line, status 2)
        return e.code


@pytest.mark.parametrize("argv,words", [(["--steps", "3"], "--steps must be >= 8"),
                                        (["--warmup", "1"], "--warmup >= 2"),
                                        (["--device", "tpu"], "invalid choice")])
def test_bad_options_are_one_line(pf, capsys, argv, words):
    assert main_rc(pf, ["--tiny"] + argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_missing_data_is_one_line(pf, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DATA_PATH", str(tmp_path / "nothing"))
    assert pf.main(["--tiny"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "DATA_PATH" in err and "does not exist" in err, err

