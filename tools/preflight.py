"""Preflight for the first GPU hour: is this box ready for the competition run, and will it match the seed?

    python3 tools/preflight.py                                            # 1 GPU, about 3-5 minutes
    torchrun --standalone --nproc_per_node=8 tools/preflight.py           # 8 GPUs, the real collectives
    python3 tools/preflight.py --tiny                                     # CPU, seconds: the same code path

It runs train_gpt.py's own code at the configured shape (PRESET=competition on a GPU, env vars as train_gpt.py
reads them): setup_runtime (device, flash-attn probe, process group), GPT, a few real `train` steps (WARMUP priming
steps, then --steps timed steps across the late-QAT switch, in-loop validation included), then one scoring batch
per eval stage through score_batch (sliding plain, SLOT batch, SLOT causal) and TTT chunks through eval_pass. It
prints the attention backend that ran (train_gpt.ATTN_CALLS, counted inside attend), the warmup's compile time and
the graphs compiled later (dynamo's bytecode hook: one call per compiled graph), ms/step, the steps the training
budget buys, peak memory, the cost of each eval stage, the eval time projected for 8 GPUs against the 600 s limit,
and a verdict: `verdict: go`, or `verdict: fix this first: <reasons>`.

Projection to 8 GPUs from W < 8: the global batch (TRAIN_BATCH_TOKENS) is the same on any world size (8
micro-batches per step, split over the ranks), so a W-GPU step does the work of 8/W ranks of the 8-GPU step;
ms/step on 8 GPUs = measured x W/8 (ideal scaling: the 8-GPU run adds NCCL collectives, and AdamW runs unsharded
on every rank, so the real number is a bit higher; torchrun on 8 GPUs measures it). Eval batches have the same
shape on any world size; the TTT chunks are measured at the 8-GPU per-rank size (TTT_CHUNK_TOKENS x W/8 per chunk:
the same windows and training rows per rank), and the batch and chunk counts are those of 8 ranks.

Exit status: 0 (either verdict; --strict: 1 for "fix this first"), 2 on bad input, in one line (also DEVICE=cuda
without a usable CUDA).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from _cli import Parser
from _common import ToolError, tg

# The seed, PR #1084 on 8xH100 SXM (../shared/seeds/004: 3-seed means): 7,145 steps at 84.0 ms/step, TTT+SLOT
# eval 386 s.
SEED_STEP_MS, SEED_STEPS, SEED_EVAL_S = 84.0, 7145, 386.0
WORLD = 8  # the competition's GPUs: every projection is for this world size
MEMORY_HEADROOM = 0.95  # peak memory above this fraction of the device's is a verdict reason

# --tiny: a competition-shaped config that runs in seconds on a CPU (every feature on); env vars override it.
TINY_ENV = dict(
    PRESET="competition", DEVICE="cpu", COMPILE="0", COMPILE_HEAD="0", NUM_LAYERS="2", MODEL_DIM="64",
    NUM_HEADS="2", NUM_KV_HEADS="1", ROPE_DIMS="16", VE_LAYERS="0,1", XSA_LAST_N="1", BIGRAM_VOCAB_SIZE="64",
    BIGRAM_DIM="16", VE_DIM="16", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS=str(8 * 2 * 64), EVAL_SEQ_LEN="64",
    EVAL_STRIDE="16", EVAL_BATCH_SEQS="8", TTT_CHUNK_TOKENS="512", TTT_BATCH_SEQS="2", VAL_BATCH_SIZE="1024",
    VAL_MAX_TOKENS="8192")
# The SLOT settings of the mode the config does not run: the README's commands (batch: the seed's; causal: ours).
SLOT_MODE_STEPS = {"batch": 3, "causal": 8}


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {msg[0] if msg else ''}"
    if "Python.h" in str(e):
        text += " (Triton needs the Python headers: install python3-dev, README: Your first GPU run)"
    return text


class Compiles:
    """Graphs dynamo compiles, per phase: the bytecode hook runs once per compiled graph (train_gpt compiles with
    fullgraph, so a graph break is an error, not a count)."""

    def __init__(self):
        self.phase, self.events = "setup", []
        self._hook = None

    def __enter__(self):
        self._hook = torch._dynamo.convert_frame.register_bytecode_hook(
            lambda code, new: self.events.append((self.phase, code.co_name)))
        return self

    def __exit__(self, *exc):
        self._hook.remove()

    def count(self, pred) -> dict:
        return dict(collections.Counter(fn for ph, fn in self.events if pred(ph)))


class Log(tg.Logger):
    """train's logger: keeps every line (on every rank) and moves the compile counter to the timed loop at
    `warmup:done` and out of it at `ema:applying`."""

    def __init__(self, compiles: Compiles, is_main: bool, echo: bool):
        super().__init__(None, is_main)
        self.compiles, self.echo, self.lines = compiles, echo, []

    def __call__(self, msg: str, console: bool = True) -> None:
        self.lines.append(msg)
        if msg.startswith("warmup:done"):
            self.compiles.phase = "train_loop"
        elif msg.startswith("ema:applying"):
            self.compiles.phase = "train_end"
        super().__call__(msg, console and self.echo)

    def value(self, prefix: str, key: str) -> float | None:
        for line in self.lines:
            if line.startswith(prefix):
                for tok in line.split():
                    if tok.startswith(key + ":"):
                        return float(tok.split(":", 1)[1].rstrip("ms"))
        return None


def timed(rt, fn) -> float:
    """Seconds of fn() with the device drained before and after."""
    tg.sync(rt)
    t = time.perf_counter()
    fn()
    tg.sync(rt)
    return time.perf_counter() - t


def slowest(rt, x: float) -> float:
    """The largest x over the ranks (the slowest rank sets the wall clock)."""
    t = torch.tensor(float(x), dtype=torch.float64, device=rt.device)
    return tg.all_reduce_(t, torch.distributed.ReduceOp.MAX).item() if rt.distributed else float(x)


def attention_calls() -> dict:
    return {k: int(v) for k, v in tg.ATTN_CALLS.items()}


def progress(rt, msg: str) -> None:
    if rt.is_main:
        print(f"preflight: {msg}", file=sys.stderr, flush=True)


# ---- training ----
def measure_training(cfg, rt, model, val, compiles: Compiles, args) -> dict:
    """`train` with WARMUP=--warmup, ITERATIONS=--steps and a step-based warmdown over those steps (late QAT
    switches on for the last ~LATE_QAT_THRESHOLD of them, as in the last ~50 s of a real run), on a val set of one
    batch per rank (the in-loop validation runs at step 0 and at the end, outside the timed window)."""
    tcfg = dataclasses.replace(cfg, iterations=args.steps, warmup_steps=args.warmup, max_wallclock_seconds=0.0,
                               warmdown_iters=args.steps, train_log_every=10 ** 9)
    rows = max(cfg.val_batch_size // (rt.world_size * cfg.train_seq_len), 1)
    small = tg.ValData(val.tokens[: rows * rt.world_size * cfg.train_seq_len + 1], val.luts)
    log = Log(compiles, rt.is_main, args.verbose)
    compiles.phase = "warmup"
    before = attention_calls()
    out = tg.train(tcfg, rt, model, small, log)
    compiles.phase = "after_train"
    ms = slowest(rt, 1000 * out["train_seconds"] / max(out["steps"], 1))
    warm = slowest(rt, log.value("warmup:done", "seconds") or 0.0)
    calls = {k: v - before.get(k, 0) for k, v in attention_calls().items()}
    return dict(steps=out["steps"], warmup_steps=args.warmup, warmup_seconds=warm,
                compile_seconds=max(warm - args.warmup * ms * 1e-3, 0.0), ms_per_step=ms,
                ms_per_step_8gpu=ms * rt.world_size / WORLD, late_qat_step=log.value("late_qat:enabled", "step"),
                recompiles=compiles.count(lambda ph: ph == "train_loop"),
                warmup_compiles=compiles.count(lambda ph: ph == "warmup"), attention_calls=calls,
                peak_memory_mb=slowest(rt, tg.peak_memory_mb(rt)))


# ---- evaluation ----
def stage_batch(val, cfg, B: int, rt):
    """B windows of the sliding pass after the first (each scores its last EVAL_STRIDE positions), built as
    eval_pass builds a scoring batch: (x, y, los)."""
    T, s = cfg.eval_seq_len, cfg.eval_stride
    n = val.tokens.numel() - 1
    plan = tg.window_plan(min(n, T + B * s), T, s)
    wins = plan[1:] or plan
    wins = [wins[i % len(wins)] for i in range(B)]
    T = wins[0][1]
    idx = torch.tensor([ws for ws, _, _ in wins])[:, None] + torch.arange(T + 1)
    xy = val.tokens[idx].to(rt.device)
    return xy[:, :-1], xy[:, 1:], torch.tensor([lo for _, _, lo in wins], device=rt.device)


def stage_configs(cfg) -> list[tuple[str, object, bool]]:
    """(name, config, slot) of each scoring stage: SLOT off, then both SLOT modes (the configured mode with its
    SLOT_STEPS, the other with the README's steps)."""
    out = [("sliding plain", cfg, False)]
    for mode in ("batch", "causal"):
        steps = cfg.slot_steps if mode == cfg.slot_mode else SLOT_MODE_STEPS[mode]
        out.append((f"SLOT {mode}", dataclasses.replace(cfg, slot_mode=mode, slot_steps=steps), True))
    return out


def ttt_slice_chunks(cfg, B: int, world: int, n: int) -> tuple[int, int]:
    """(chunk tokens, k): TTT chunks of TTT_CHUNK_TOKENS x world/8 tokens give each rank the windows and training
    rows a rank of 8 gets; k is the fewest chunks (>= 2) whose pass has at least B windows per rank, so that k and
    k+1 chunks score in batches of the same shape (n: the val targets there are)."""
    C = cfg.ttt_chunk_tokens * world // WORLD
    if C * WORLD != cfg.ttt_chunk_tokens * world or C % cfg.eval_stride or 2 * C < cfg.eval_seq_len:
        raise ToolError(f"TTT_CHUNK_TOKENS={cfg.ttt_chunk_tokens}: the preflight measures chunks of "
                        f"TTT_CHUNK_TOKENS x {world}/8 tokens, which must be a multiple of EVAL_STRIDE="
                        f"{cfg.eval_stride} and at least EVAL_SEQ_LEN/2={cfg.eval_seq_len // 2}")
    k = 2
    while len(tg.window_plan(k * C, cfg.eval_seq_len, cfg.eval_stride)) < B * world and k < 64:
        k += 1
    if (k + 1) * C > n:
        raise ToolError(f"the val set ({n} targets) is too short for the TTT measurement ({(k + 1) * C} needed):"
                        " raise VAL_MAX_TOKENS or get the full val set")
    return C, k


def measure_eval(cfg, rt, model, val, compiles: Compiles, args) -> dict:
    """Seconds of one scoring batch per stage (first call: compiles the pass's graphs; then --reps timed calls) and
    of one TTT chunk, scoring + training (the (k+1)-chunk pass minus the k-chunk pass of eval_pass, TTT on)."""
    n = val.tokens.numel() - 1
    B = tg.pass_batch(len(tg.window_plan(n, cfg.eval_seq_len, cfg.eval_stride)), cfg.eval_batch_seqs, WORLD)
    model.eval()
    if rt.cuda:  # the eval's own peak, not the training's
        torch.cuda.reset_peak_memory_stats(rt.device)
    hidden_fn = tg.maybe_compile(model.forward_hidden, rt)
    x, y, los = stage_batch(val, cfg, B, rt)
    stages = {}
    before = attention_calls()
    for name, scfg, slot in stage_configs(cfg):
        progress(rt, f"eval stage {name}")

        def call():
            tg.score_batch(model, hidden_fn, x, y, los, scfg, rt, slot)
        compiles.phase = f"first:{name}"
        first = timed(rt, call)
        compiles.phase = f"timed:{name}"
        times = [timed(rt, call) for _ in range(args.reps)]
        stages[name] = dict(batch=f"{B}x{x.size(1)}", slot_steps=scfg.slot_steps if slot else 0,
                            first_seconds=slowest(rt, first), ms=slowest(rt, 1000 * statistics.median(times)))
    if cfg.ttt_enabled:
        progress(rt, "eval stage TTT chunk")
        C, k = ttt_slice_chunks(cfg, B, rt.world_size, n)
        tcfg = dataclasses.replace(cfg, ttt_chunk_tokens=C, ctw_weight=0.0)

        def ttt_pass(chunks: int):
            sl = tg.ValData(val.tokens[: chunks * C + 1], val.luts)
            tg.eval_pass(model, sl, tcfg, rt, seq_len=cfg.eval_seq_len, stride=cfg.eval_stride, batch_seqs=B,
                         slot=False, ttt=True)
        compiles.phase = "first:TTT chunk"
        first = timed(rt, lambda: ttt_pass(k + 1))
        compiles.phase = "timed:TTT chunk"
        pairs = [(timed(rt, lambda: ttt_pass(k)), timed(rt, lambda: ttt_pass(k + 1))) for _ in range(args.reps)]
        chunk = max(statistics.median(b - a for a, b in pairs), 0.0)  # < 0 only as noise on a busy CPU
        rows = -(-len(tg.ttt_rows(0, C, cfg.eval_seq_len)) // rt.world_size)
        stages["TTT chunk"] = dict(batch=f"{-(-C // cfg.eval_stride // rt.world_size)} windows + {rows} training "
                                         f"row{'s' * (rows > 1)} x {cfg.ttt_epochs} epochs",
                                   first_seconds=slowest(rt, max(first - statistics.median(b for _, b in pairs), 0)),
                                   ms=slowest(rt, 1000 * chunk), chunk_tokens=C)
    compiles.phase = "after_eval"
    for name, st in stages.items():
        if name != "TTT chunk":
            st["first_seconds"] = max(st["first_seconds"] - st["ms"] / 1000, 0.0)  # the call's own time out
    calls = {k: v - before.get(k, 0) for k, v in attention_calls().items()}
    return dict(batch_seqs=B, stages=stages, attention_calls=calls,
                recompiles=compiles.count(lambda ph: ph.startswith("timed:")),
                peak_memory_mb=slowest(rt, tg.peak_memory_mb(rt)))


def project_eval(cfg, n: int, ev: dict) -> dict:
    """Seconds of the run's evaluation on 8 GPUs per SLOT mode (off, batch, causal): roundtrip (plain rows of
    TRAIN_SEQ_LEN) + the sliding pass + the TTT pass (TTT_ENABLED) + the graphs compiled on the eval clock. Batch
    counts are those of train_gpt's own plan on 8 ranks (window_plan, window_chunks, shard_range, pass_batch)."""
    st = ev["stages"]
    T, s = cfg.eval_seq_len, cfg.eval_stride

    def per_rank(k: int) -> int:
        return max(b - a for a, b in (tg.shard_range(k, r, WORLD) for r in range(WORLD)))
    plan = tg.window_plan(n, T, s)
    B = tg.pass_batch(len(plan), cfg.eval_batch_seqs, WORLD)
    sliding_batches = -(-per_rank(len(plan)) // B)
    rows = max(cfg.val_batch_size // (WORLD * cfg.train_seq_len), 1)
    n_rows = len(tg.window_plan(n, cfg.train_seq_len, cfg.train_seq_len))
    rt_B = tg.pass_batch(n_rows, rows, WORLD)
    plain = st["sliding plain"]["ms"] / 1000
    roundtrip = -(-per_rank(n_rows) // rt_B) * plain * (rt_B * cfg.train_seq_len) / (B * T)  # scaled by tokens
    n_chunks = ttt_batches = 0
    if cfg.ttt_enabled and "TTT chunk" in st:
        C = cfg.ttt_chunk_tokens
        n_chunks = -(-n // C)
        per_chunk = collections.Counter(min(c, n_chunks - 1) for c in tg.window_chunks(plan, C))
        ttt_batches = sum(-(-per_rank(k) // B) for k in per_chunk.values())
    out = dict(sliding_batches=sliding_batches, roundtrip_seconds=roundtrip, ttt_chunks=n_chunks,
               ttt_batches=ttt_batches, modes={})
    for mode, stage in (("off", "sliding plain"), ("batch", "SLOT batch"), ("causal", "SLOT causal")):
        cost = st[stage]["ms"] / 1000
        sliding = sliding_batches * cost
        ttt = n_chunks * st["TTT chunk"]["ms"] / 1000 + ttt_batches * (cost - plain) if n_chunks else 0.0
        compile_s = st["sliding plain"]["first_seconds"] + (st[stage]["first_seconds"] if mode != "off" else 0.0) + \
            (st["TTT chunk"]["first_seconds"] if n_chunks else 0.0)
        out["modes"][mode] = dict(roundtrip=roundtrip, sliding=sliding, ttt=ttt, compile=compile_s,
                                  total=roundtrip + sliding + ttt + compile_s)
    return out


# ---- verdict ----
def configured_mode(cfg_d: dict) -> str:
    return cfg_d["slot_mode"] if cfg_d["slot_enabled"] else "off"


def verdict(r: dict, slack: float = 0.05) -> list[str]:
    """The reasons not to start the competition run yet (none: go), from a preflight report."""
    why = []
    if r["device_type"] != "cuda":
        why.append(f"ran on {r['device']}, not a GPU: these numbers say nothing about the competition run")
    why += r["errors"]
    att = r["attention"]
    if att["flash_notes"]:
        why.append("flash-attn is installed but unusable (" + "; ".join(att["flash_notes"]) +
                   "): reinstall a build for this torch/CUDA, or uninstall it to use SDPA")
    flash = att["flash_loaded"]
    sdpa_calls = sum(p.get("attention_calls", {}).get("sdpa", 0) for p in (r.get("train") or {}, r.get("eval") or {}))
    if flash and sdpa_calls:
        why.append(f"{sdpa_calls} attention calls ran on SDPA although {flash} is loaded (q/k/v not bf16 on CUDA?)")
    tr = r.get("train")
    if tr:
        if tr["recompiles"]:
            why.append(f"{sum(tr['recompiles'].values())} graphs compiled inside the timed training loop "
                       f"({', '.join(f'{k} x{v}' for k, v in tr['recompiles'].items())}): each one stalls every rank")
        limit = SEED_STEP_MS * (1 + slack)
        if tr["ms_per_step_8gpu"] > limit:
            why.append(f"{tr['ms_per_step_8gpu']:.1f} ms/step projected on 8 GPUs > {limit:.1f} (the seed's "
                       f"{SEED_STEP_MS} + {100 * slack:.0f}%): ~{r['projection']['steps']:,} steps instead of "
                       f"{SEED_STEPS:,}")
    ev = r.get("eval")
    if ev and ev["recompiles"]:
        why.append(f"{sum(ev['recompiles'].values())} graphs compiled in repeated scoring calls "
                   f"({', '.join(ev['recompiles'])}): eval passes would recompile on the eval clock")
    proj = (r.get("projection") or {}).get("eval")
    if proj:
        mode = configured_mode(r["config"])
        total, limit = proj["modes"][mode]["total"], r["config"]["eval_time_limit_seconds"]
        if total > limit:
            why.append(f"evaluation (SLOT {mode}) projected at {total:.0f} s on 8 GPUs > EVAL_TIME_LIMIT_SECONDS="
                       f"{limit:g}")
    mem, total_mb = r["peak_memory_mb"], r.get("device_memory_mb")
    if total_mb and mem > MEMORY_HEADROOM * total_mb:
        why.append(f"peak memory {mem:,.0f} MiB is over {100 * MEMORY_HEADROOM:.0f}% of the GPU's {total_mb:,.0f} MiB")
    return why


# ---- report ----
def run_preflight(args, env: dict) -> tuple[dict, bool]:
    """(report, whether this process is rank 0)."""
    cfg = tg.Config.from_env(env)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise tg.UserError(tg.cuda_problem())
    tg.check_data_path(cfg.data_path)
    rt = tg.setup_runtime(cfg, env)
    tg.grad_accum_steps(cfg, rt.world_size)  # a world size that does not divide 8: one line, before any work
    torch.manual_seed(cfg.seed)
    val = tg.ValData(tg.load_val_tokens(cfg), tg.load_tokenizer_luts(cfg))
    n = val.tokens.numel() - 1
    if cfg.ttt_enabled:  # a config the TTT measurement cannot take: said before the minutes of training
        B = tg.pass_batch(len(tg.window_plan(n, cfg.eval_seq_len, cfg.eval_stride)), cfg.eval_batch_seqs, WORLD)
        ttt_slice_chunks(cfg, B, rt.world_size, n)
    report = dict(device=str(rt.device), device_type=rt.device.type, world_size=rt.world_size,
                  gpu=torch.cuda.get_device_name(rt.device) if rt.cuda else None,
                  device_memory_mb=torch.cuda.get_device_properties(rt.device).total_memory / 2 ** 20 if rt.cuda
                  else None, torch=torch.__version__, amp=rt.amp, compile=rt.compile, val_tokens=n,
                  config={f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, errors=[],
                  attention=dict(flash_loaded=tg._flash[0][0] if tg._flash and rt.cuda else None,
                                 flash_notes=list(tg.FLASH_NOTES)))
    model = tg.GPT(cfg).to(rt.device)
    report["params"] = tg.count_params(model)
    with Compiles() as compiles:
        progress(rt, f"training: {args.warmup} warmup steps (compiles), then {args.steps} timed steps on "
                     f"{rt.world_size} x {rt.device.type}")
        try:
            report["train"] = measure_training(cfg, rt, model, val, compiles, args)
        except tg.UserError:
            raise
        except Exception as e:
            report["errors"].append(f"training failed: {one_line(e)}")
        try:
            report["eval"] = measure_eval(cfg, rt, model, val, compiles, args)
        except (tg.UserError, ToolError):
            raise
        except Exception as e:
            report["errors"].append(f"evaluation failed: {one_line(e)}")
    proj = {}
    if "train" in report:
        ms8 = report["train"]["ms_per_step_8gpu"]
        proj["steps"] = min(cfg.iterations, int(1000 * cfg.max_wallclock_seconds / ms8)) \
            if cfg.max_wallclock_seconds > 0 else cfg.iterations
    if "eval" in report:
        proj["eval"] = project_eval(cfg, n, report["eval"])
    report["projection"] = proj
    report["peak_memory_mb"] = max([report[p]["peak_memory_mb"] for p in ("train", "eval") if p in report] or
                                   [slowest(rt, tg.peak_memory_mb(rt))])
    report["reasons"] = verdict(report, args.slack)
    report["verdict"] = "fix this first" if report["reasons"] else "go"
    return report, rt.is_main


def fmt_calls(calls: dict) -> str:
    used = {k: v for k, v in calls.items() if v}
    return ", ".join(f"{k} x{v:,}" for k, v in used.items()) or "none"


def render(r: dict) -> str:
    c, W = r["config"], r["world_size"]
    dev = f"{r['device']} {r['gpu']}" if r["gpu"] else r["device"]
    out = [f"# preflight: {W} x {dev}, torch {r['torch']}, PRESET={c['preset']}, {r.get('params', 0):,} params, "
           f"amp {int(r['amp'])} compile {int(r['compile'])}; projected to {WORLD} GPUs",
           "| check | measured | projection / note |", "|---|---|---|"]
    att = r["attention"]
    tr, ev = r.get("train"), r.get("eval")
    note = f"flash-attn loaded: {att['flash_loaded'] or 'none'}; counted per call in attend (ATTN_CALLS)"
    for label, part in (("training", tr), ("eval", ev)):
        if part:
            out.append(f"| attention backend ({label}) | {fmt_calls(part['attention_calls'])} | {note} |")
            note = ""
    if tr:
        out.append(f"| warmup: compile + {tr['warmup_steps']} steps | {tr['warmup_seconds']:.1f} s | compile "
                   f"~{tr['compile_seconds']:.1f} s ({sum(tr['warmup_compiles'].values())} graphs) |")
        qat = f"late QAT from step {tr['late_qat_step']:.0f}" if tr["late_qat_step"] is not None else "late QAT off"
        out.append(f"| graphs compiled in the timed loop | {sum(tr['recompiles'].values())} | {tr['steps']} steps, "
                   f"{qat}; must be 0 |")
        procs = f"{W} GPU" + "s" * (W > 1) if r["gpu"] else f"{W} process" + "es" * (W > 1)
        out.append(f"| ms/step ({procs}, {c['train_batch_tokens']:,} tokens/step) | "
                   f"{tr['ms_per_step']:.1f} | {tr['ms_per_step_8gpu']:.1f} ms on {WORLD} GPUs"
                   f"{f' (x{W}/{WORLD}, ideal: without collectives)' if W < WORLD else ''}; seed {SEED_STEP_MS} |")
        out.append(f"| steps in MAX_WALLCLOCK_SECONDS={c['max_wallclock_seconds']:g} | | "
                   f"{r['projection']['steps']:,} (seed {SEED_STEPS:,}; ITERATIONS={c['iterations']}) |")
    total = f"max allocated, of {r['device_memory_mb']:,.0f} MiB" if r["device_memory_mb"] else "peak RSS (CPU)"
    out.append(f"| peak memory (training / eval) | {tr['peak_memory_mb'] if tr else 0:,.0f} / "
               f"{ev['peak_memory_mb'] if ev else 0:,.0f} MiB | {total} |")
    if ev:
        out += ["", "| eval stage (per rank, 8 GPUs) | one call | compile s | ms per call | calls per rank | "
                    "projected s |", "|---|---|---|---|---|---|"]
        pe = r["projection"]["eval"]
        for name, st in ev["stages"].items():
            steps = f" ({st['slot_steps']} steps)" if st.get("slot_steps") else ""
            k = pe["ttt_chunks"] if name == "TTT chunk" else pe["sliding_batches"]
            out.append(f"| {name}{steps} | {st['batch']} | {st['first_seconds']:.1f} | {st['ms']:.1f} | {k:,} | "
                       f"{k * st['ms'] / 1000:.1f} |")
        limit = c["eval_time_limit_seconds"]
        mode = configured_mode(c)
        out += ["", f"| evaluation on {WORLD} GPUs | roundtrip s | sliding s | TTT s | compile s | total s | "
                    f"limit {limit:g} s |", "|---|---|---|---|---|---|---|"]
        for m, p in pe["modes"].items():
            name = ("SLOT off" if m == "off" else f"SLOT {m}") + (" (configured)" if m == mode else "")
            out.append(f"| {name} | {p['roundtrip']:.1f} | {p['sliding']:.1f} | {p['ttt']:.1f} | {p['compile']:.1f} | "
                       f"{p['total']:.1f} | {'ok' if p['total'] <= limit else 'OVER'} |")
        out.append(f"(TTT: {pe['ttt_chunks']:,} chunks, each scored then trained; SLOT adds its per-batch cost to "
                   f"{pe['ttt_batches']:,} TTT batches. The seed's TTT+SLOT eval took {SEED_EVAL_S:.0f} s.)")
    if att["flash_loaded"] is None and r["device_type"] == "cuda" and not att["flash_notes"]:
        out.append("note: no flash-attn installed: attention ran on torch's SDPA (the seed used flash-attn 3)")
    out.append("verdict: go" if not r["reasons"] else "verdict: fix this first: " + "; ".join(r["reasons"]))
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="preflight.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny competition-shaped config on the CPU (seconds; env vars still override it)")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="DEVICE for this run (default: DEVICE, else cuda "
                                                              "when available)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps (default 20, at least 8 so that "
                                                          "late QAT switches on inside them)")
    ap.add_argument("--warmup", type=int, default=3, help="warmup steps that compile every graph (default 3; >= 2: "
                                                          "the late-QAT graph is primed on the last one)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per eval stage, after the first (default 5)")
    ap.add_argument("--slack", type=float, default=0.05,
                    help="ms/step allowed over the seed's 84.0 before the verdict says fix (default 0.05)")
    ap.add_argument("--json", default="", help="also write the report here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when the verdict is not go (for scripts)")
    ap.add_argument("--verbose", action="store_true", help="also print train_gpt's own log lines")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ)
    try:
        if args.steps < 8 or args.warmup < 2 or args.reps < 1 or args.slack < 0:
            raise ToolError("--steps must be >= 8, --warmup >= 2, --reps >= 1 and --slack >= 0")
        if args.tiny:
            cpu = tg.PRESET_VALUES["cpu"]
            env = {**TINY_ENV, "DATA_PATH": cpu["data_path"], "TOKENIZER_PATH": cpu["tokenizer_path"], **env}
            env.setdefault("DEVICE", "cpu")
        if args.device:
            env["DEVICE"] = args.device
        report, is_main = run_preflight(args, env)
    except (tg.UserError, ToolError) as e:
        if env.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if is_main:
        print(render(report))
        if args.json:
            tg.write_json(Path(args.json), report)
    return 1 if args.strict and report["verdict"] != "go" else 0


if __name__ == "__main__":
    sys.exit(main())
