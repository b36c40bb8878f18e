"""Two CPU processes (torchrun, gloo) agree with one process on the same tiny run.

Training: the global batch is world-independent (8 micro-batches per step: 8 on one process, 4 per rank on two)
and the ranks see the same token sets; grads are averaged over ranks (reduce-scatter for the banks, all-reduce for
the rest) and clipped after averaging, so the two runs differ only in float summation order. Evaluation: windows
and TTT rows are split contiguously across ranks and the NLL/token/byte sums are all-reduced in fp64.

EVAL_BATCH_SEQS=1: the seed's batch-mode SLOT fits one delta per scoring batch, and a rank's batch holds other
windows than the single process's batch (by design, as in the seed), so with bigger batches the *_slot stages
differ by ~1e-7 relative. With one window per batch every stage is world-invariant. TTT is world-invariant here
because each 64-token chunk has 2 rows <= TTT_BATCH_SEQS.

Tolerance: every stage's val_loss and val_bpb within 1e-6 relative; token and byte counts exact. Measured on a
2-core CPU: <= 2.3e-9 relative (post_ema 5e-10, ttt_slot 2.2e-9). A real sharding bug (a window or row dropped
or counted twice, grads summed instead of averaged) moves bpb by far more than 1e-6 here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_run  # noqa: E402

REL_TOL = 1e-6
EXTRA = dict(EVAL_BATCH_SEQS=1, ITERATIONS=5, WARMDOWN_ITERS=2)

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def runs(tg, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data, tok = tiny_run.make_tiny_data(root, tg, val_tokens=385)
    # one process, in-process (same numerics as `python train_gpt.py` with OMP_NUM_THREADS=1)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w1 = tg.run(tiny_run.tiny_env(data, tok, root / "w1", RUN_ID="w1", **EXTRA))
    finally:
        torch.set_num_threads(n)
    # two processes
    out2 = root / "w2"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(root)),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1",
           **tiny_run.tiny_env(data, tok, out2, RUN_ID="w2", **EXTRA)}
    # `python -m torch.distributed.run` is torchrun (its console script's entry point), for this interpreter
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tiny_run.TRAIN_GPT)]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    w2 = json.loads((out2 / "w2.json").read_text())
    return w1, w2, p, out2


@needs_gloo
def test_two_processes_agree_with_one(runs):
    w1, w2, _, _ = runs
    assert (w1["world_size"], w2["world_size"]) == (1, 2)
    for k in ("steps", "val_tokens", "val_bytes", "model_params", "preset"):
        assert w1[k] == w2[k], k
    assert w1["steps"] == 5
    assert list(w1["stages"]) == list(w2["stages"]) == ["post_ema", "roundtrip", "sliding", "sliding_slot", "ttt",
                                                        "ttt_slot"]
    worst = 0.0
    for name, a in w1["stages"].items():
        b = w2["stages"][name]
        for key in ("val_loss", "val_bpb"):
            rel = abs(a[key] - b[key]) / abs(a[key])
            worst = max(worst, rel)
            assert rel <= REL_TOL, f"{name}.{key}: {a[key]!r} vs {b[key]!r} (rel {rel:.2e})"
    print(f"worst relative difference over all stages: {worst:.2e}")
    # the artifacts hold (nearly always exactly) the same quantized weights: equal size within 1%
    assert abs(w1["bytes_model"] - w2["bytes_model"]) <= 0.01 * w1["bytes_model"]


@needs_gloo
def test_only_rank0_writes_and_prints(runs):
    _, w2, p, out2 = runs
    assert sorted(x.name for x in out2.iterdir()) == ["w2.json", "w2.ptz", "w2.txt"]
    assert p.stdout.count("final stage:") == 1  # rank 1 is silent
    assert p.stdout.count("world_size:2 grad_accum_steps:4") == 1
    log = (out2 / "w2.txt").read_text()
    assert "world_size:2 grad_accum_steps:4" in log
    exact = tiny_run.exact_lines(log)
    for name in ("roundtrip", "sliding", "sliding_slot", "ttt", "ttt_slot"):
        assert exact[name] == (round(w2["stages"][name]["val_loss"], 8), round(w2["stages"][name]["val_bpb"], 8))
    assert Path(w2["artifact"]).stat().st_size == w2["bytes_model"]


def test_grad_accum_rule(tg):
    cfg = tg.Config()
    assert [tg.grad_accum_steps(cfg, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    for w in (3, 16):
        with pytest.raises(tg.UserError, match=f"world size {w} must divide 8"):
            tg.grad_accum_steps(cfg, w)
    assert [tg.shard_range(10, r, 4) for r in range(4)] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert [tg.shard_range(1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]
