"""Perturbation test (slot.md 5.7, T2) of the final evaluation path, on a saved artifact or a random tiny model.

For each mode it scores a token stream with `train_gpt.score_stream` (the exact code path of the final eval:
sliding windows, score-first TTT and SLOT as the environment configures them), then, for each of --positions
random positions u, replaces stream[u] by another token, rescores, and counts the targets before u whose NLL
moved. A compliant evaluation (condition C1: a prediction depends only on the artifact and the strict prefix)
moves none of them, not by a single bit: everything runs on the CPU, one thread, in float64 by default (the logic, in
eager torch ops) or with --dtype float32 / amp (the torch.compile'd head of a CPU run, COMPILE_HEAD=1 by default, and
bf16 autocast), so "unchanged" means identical. The modes are SLOT off, SLOT_MODE=batch (the seed, labelled non-causal: expected to leak) and
SLOT_MODE=causal; every other eval setting (EVAL_SEQ_LEN, EVAL_STRIDE, EVAL_BATCH_SEQS, TTT_*, SLOT_LR, ...)
comes from the environment exactly as train_gpt.py reads it.

    SLOT_LR=0.005 SLOT_STEPS=8 python tools/check_causality.py --artifact logs/run.ptz
    TTT_CHUNK_TOKENS=256 python tools/check_causality.py --random-tiny --modes causal --positions 16

Exit status: 0 when every mode labelled causal is clean (and, with --strict, no mode leaks); 1 on a violation;
2 on bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import torch

from _cli import Parser
from _common import ToolError, random_tiny_model, tg, tiny_config

MODES = {
    "off": dict(slot_enabled=False),
    "batch": dict(slot_enabled=True, slot_mode="batch"),
    "causal": dict(slot_enabled=True, slot_mode="causal"),
}


def load_stream(cfg, n_targets: int, source: str, offset: int, seed: int) -> tuple[torch.Tensor, str]:
    """n_targets+1 tokens: from the val shards of DATA_PATH ('val'), random ('random'), or val when present."""
    files = tg.shard_files(cfg.data_path, "val") if source != "random" else []
    if source == "val" and not files:
        raise ToolError(f"DATA_PATH {cfg.data_path} has no fineweb_val_*.bin shards (use --data random)")
    if files:
        parts, have = [], 0
        for f in files:
            t = tg.load_shard(f, cfg.vocab_size)
            parts.append(t)
            have += t.size
            if have >= offset + n_targets + 1:
                break
        toks = np.concatenate(parts)[offset: offset + n_targets + 1]
        if toks.size < n_targets + 1:
            raise ToolError(f"the val shards hold {toks.size} tokens after --offset {offset}; need {n_targets + 1}")
        return torch.from_numpy(toks.astype(np.int64)), f"val shards of {cfg.data_path} (offset {offset})"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (n_targets + 1,), generator=g), "random tokens"


def setup_notes(cfg, n: int, modes) -> list[str]:
    """What the setup can and cannot expose (a test that cannot fail proves nothing)."""
    notes = []
    plan = tg.window_plan(n, cfg.eval_seq_len, cfg.eval_stride)
    if len(plan) == 1:
        notes.append(f"note: one window (--tokens {n} <= EVAL_SEQ_LEN={cfg.eval_seq_len}): leaks across windows "
                     "are invisible; raise --tokens or lower EVAL_SEQ_LEN")
    elif min(cfg.eval_batch_seqs, len(plan)) < 2:
        notes.append("note: one window per scoring batch (EVAL_BATCH_SEQS=1): leaks through a batch-shared delta "
                     "are invisible")
    if cfg.ttt_enabled:
        chunks = -(-n // cfg.ttt_chunk_tokens)
        if chunks < 2:
            notes.append(f"note: TTT is on but the stream is one chunk (TTT_CHUNK_TOKENS={cfg.ttt_chunk_tokens} >= "
                         f"{n} targets), so TTT never trains; set TTT_CHUNK_TOKENS <= {max(n // 4, cfg.eval_stride)} "
                         "to test it")
    return notes


def check_mode(model, tokens: torch.Tensor, cfg, positions: np.ndarray, tol: float, seed: int) -> dict:
    """Score, perturb each position, rescore; count earlier targets whose NLL moved by more than tol."""
    t0 = time.perf_counter()
    base = tg.score_stream(model, tokens, cfg)
    unscored = int(torch.isnan(base).sum())
    rng = np.random.default_rng(seed)
    moved = checked = leaky = 0
    worst, worst_at = 0.0, None
    V = cfg.vocab_size
    for u in positions:
        pert = tokens.clone()
        pert[u] = (int(tokens[u]) + int(rng.integers(1, V))) % V
        nll = tg.score_stream(model, pert, cfg)
        unscored += int(torch.isnan(nll).sum())
        d = (nll[: u - 1] - base[: u - 1]).abs()  # targets tokens[1..u-1]: strictly before the perturbed token
        d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
        k = int((d > tol).sum())
        checked += d.numel()
        moved += k
        leaky += k > 0
        if d.numel() and float(d.max()) > worst:
            worst, worst_at = float(d.max()), (int(u), int(d.argmax()) + 1)
    again = (tg.score_stream(model, tokens, cfg) - base).abs()  # control: the unperturbed stream, scored again
    unstable = int((torch.where(torch.isnan(again), torch.zeros_like(again), again) > tol).sum())
    return {"unstable": unstable, "moved": moved, "checked": checked, "max_change": worst, "worst": worst_at, "leaky_positions": leaky,
            "positions": len(positions), "unscored": unscored, "seconds": time.perf_counter() - t0,
            "compliance": tg.stage_compliance(tg.final_variant(cfg), cfg)}


def verdict(r: dict) -> tuple[str, bool, bool]:
    """(text, violation: a mode labelled causal moved, leak: any movement)."""
    if r["unstable"]:  # neither verdict can be trusted: a busy machine can change MKL/oneDNN's thread split
        return "NOT REPRODUCIBLE (the unperturbed stream scored twice differed: rerun on an idle machine)", True, True
    leak = r["moved"] > 0 or r["unscored"] > 0
    if not leak:
        return "OK (no earlier NLL moved)", False, False
    if r["compliance"] == "causal":
        return "VIOLATION (labelled causal)", True, True
    return "LEAKS (expected: labelled non-causal)", False, True


def build_model(args, cfg):
    if args.artifact:
        model, cfg = tg.load_artifact(args.artifact, cfg)
        what = f"artifact {args.artifact}"
    else:
        cfg = tiny_config(cfg)
        model = random_tiny_model(cfg, args.seed)
        what = "random tiny model"
    cfg = dataclasses.replace(cfg, amp=args.dtype == "amp", compile=False,
                              compile_head=cfg.compile_head and args.dtype != "float64")
    what += f" ({cfg.num_layers}x{cfg.model_dim}, {tg.count_params(model):,} params)"
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    return model.to(dtype).cpu().eval(), cfg, what


def main(argv=None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact", help="a saved .ptz artifact (logs/<RUN_ID>.ptz)")
    src.add_argument("--random-tiny", action="store_true",
                     help="a random tiny model (2 layers, d=32, every feature on)")
    ap.add_argument("--modes", default="off,batch,causal", help="comma list of off, batch, causal (default: all)")
    ap.add_argument("--positions", type=int, default=8, help="perturbed positions per mode (default 8)")
    ap.add_argument("--tokens", type=int, default=1024, help="targets in the stream (default 1024)")
    ap.add_argument("--data", choices=("auto", "val", "random"), default="auto",
                    help="stream source: val shards of DATA_PATH, random tokens, or val when present (default)")
    ap.add_argument("--offset", type=int, default=0, help="first val token used (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="positions, replacement tokens, random model/stream")
    ap.add_argument("--tol", type=float, default=0.0, help="|dNLL| that counts as moved (default 0: any bit)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--dtype", choices=("float64", "float32", "amp"), default="float64",
                    help="float64 (default: the logic, in eager torch ops), float32 (the CPU run's compiled head) "
                         "or amp (float32 + bf16 autocast where this CPU runs it fast: the CPU run's exact path)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any requested mode leaks, batch included")
    args = ap.parse_args(argv)
    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise ToolError(f"--modes {args.modes!r}: use a comma list of {', '.join(MODES)}")
        if args.positions < 1 or args.tokens < 2:
            raise ToolError("--positions must be >= 1 and --tokens >= 2")
        torch.set_num_threads(max(args.threads, 1))
        env = dict(os.environ)
        for w in tg.env_warnings(env):
            print(w)
        cfg = tg.Config.from_env(env)
        model, cfg, what = build_model(args, cfg)
        tokens, source = load_stream(cfg, args.tokens, args.data, args.offset, args.seed)
    except (ToolError, tg.UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = tokens.numel() - 1
    rng = np.random.default_rng(args.seed)
    positions = np.sort(rng.choice(np.arange(2, n + 1), size=min(args.positions, n - 1), replace=False))
    plan = tg.window_plan(n, cfg.eval_seq_len, cfg.eval_stride)
    print(f"model: {what}")
    print(f"stream: {n} targets, {source}; perturbed token positions: {', '.join(map(str, positions))}")
    print(f"eval: EVAL_SEQ_LEN={cfg.eval_seq_len} EVAL_STRIDE={cfg.eval_stride} EVAL_BATCH_SEQS={cfg.eval_batch_seqs} "
          f"({len(plan)} windows) TTT_ENABLED={int(cfg.ttt_enabled)}"
          + (f" TTT_CHUNK_TOKENS={cfg.ttt_chunk_tokens} TTT_EPOCHS={cfg.ttt_epochs} TTT_LR={cfg.ttt_lr}"
             if cfg.ttt_enabled else "")
          + f" SLOT_LR={cfg.slot_lr} SLOT_STEPS={cfg.slot_steps} SLOT_CONTEXT={cfg.slot_context}"
          + (f" CTW_WEIGHT={cfg.ctw_weight}" if getattr(cfg, "ctw_weight", 0) else "")
          + f"; {args.dtype}, tol {args.tol:g}")
    for note in setup_notes(cfg, n, modes):
        print(note)
    print(f"{'mode':<7} {'label':<11} {'moved/checked earlier targets':>30} {'leaky perturbations':>20} "
          f"{'max |dNLL|':>11} {'seconds':>8}  verdict")
    violation = leaked = False
    results = {}
    for m in modes:
        mcfg = dataclasses.replace(cfg, **MODES[m])
        r = check_mode(model, tokens, mcfg, positions, args.tol, args.seed + 1)
        text, viol, leak = verdict(r)
        results[m] = r
        violation |= viol
        leaked |= leak
        print(f"{m:<7} {r['compliance']:<11} {r['moved']:>14,}/{r['checked']:<15,} "
              f"{r['leaky_positions']:>9}/{r['positions']:<10} {r['max_change']:>11.3g} {r['seconds']:>8.1f}  {text}")
        if r["unscored"]:
            print(f"        {r['unscored']} NLL values were missing (targets not scored exactly once)")
        if r["worst"] and leak:
            u, t = r["worst"]
            print(f"        largest change: target at stream position {t} moved when token {u} was perturbed")
    if "batch" in results and results["batch"]["moved"] == 0 and results["batch"]["compliance"] != "causal":
        print("note: batch mode showed no leak: this setup may be too small to expose one (see the notes above)")
    if any(r["unstable"] for r in results.values()):
        print("FAIL: scoring was not reproducible on this machine, so no verdict holds (rerun it while the machine is idle)")
        return 1
    if violation:
        print("FAIL: a mode labelled causal let a later token change an earlier prediction")
        return 1
    if args.strict and leaked:
        print("FAIL (--strict): a requested mode leaks")
        return 1
    print("PASS: every mode labelled causal is causal on this stream" + (" (no mode leaks)" if not leaked else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
