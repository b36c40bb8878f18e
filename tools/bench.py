"""Benchmarks of train_gpt.py on this machine (CPU preset unless PRESET says otherwise).

    python tools/bench.py eval                                   # random-init model, offline val set (or synthetic)
    python tools/bench.py eval --artifact logs/run.ptz --val-tokens 0 --repeat 3
    python tools/bench.py train                                  # training steps/s, eager vs compiled, MFU
    PRESET=competition python tools/bench.py size                # artifact bytes of a config before training
    python tools/bench.py quant                                  # int6 RTN vs GPTQ on one trained model

eval: times the sliding pass and the score-first TTT pass of `train_gpt.eval_pass` with SLOT off, with
SLOT_MODE=batch (the seed: 3 steps) and with SLOT_MODE=causal (8 steps; once per --contexts value, 0 = every context
row), and prints seconds, scored tokens/s, the overhead of each SLOT run over the same pass with SLOT off, and peak
memory. Every configuration runs in a fresh interpreter after a small warm-up pass (one-time costs such as lazy
imports and the optimizer's first step stay out of the timing); its first full pass gives its peak RSS (ru_maxrss),
then that process times --inner pairs of back-to-back (SLOT off, SLOT on) passes, the order flipped every other pair
(off-on, on-off, ...: a machine speeding up or slowing down hits both sides alike). The overhead column is the median,
over all pairs of all --repeat processes, of each pair's on/off ratio: this shared VM's speed drifts by +-15%
within seconds, which would swamp a 10% effect measured across processes or by minima taken minutes apart. The
single-batch estimate is built the same way: the median over --batch-reps adjacent (off, on) timings of one
scoring batch of their difference, times the pass's batches, over the pass without SLOT. A SLOT run also scores the plain variant (eval_pass always
does); "off" is the same pass with slot=False, so the overhead is everything SLOT adds. Other env vars (EVAL_*,
TTT_*, ...) apply as train_gpt.py reads them; each row sets SLOT_ENABLED/MODE/STEPS/LR/CONTEXT and TTT_ENABLED.

train: runs `train_gpt.train` itself (ITERATIONS=--steps after --warmup undone warm-up steps, no wall-clock cap) in a
fresh process per mode, eager and torch.compile'd, and prints s/step, tokens/s, model FLOPs per token (6 x matmul
weights + causal attention), achieved GFLOP/s, MFU against this machine's measured fp32 and bf16 matmul peaks, and
peak RSS. A compile failure is a row of the table, not a crash.

--ctw W[,W...] (default 0.1) adds rows with CTW_WEIGHT=W on the sliding pass (SLOT off), paired the same way with
the pass without CTW.

size: builds the configured model (env vars as train_gpt.py reads them; PRESET=competition for the record config),
exports it exactly as a run does (int6/int8/fp16 quantization, every compressor) and prints the parameter count,
each compressor's bytes, the code bytes and whether code + model fits in 16,000,000 bytes. --init trainer (the
trainer's initialisation: output projections start at zero and compress to almost nothing, so this is a lower
bound) or gaussian (every weight i.i.d. normal, scaled per tensor like the init: close to the entropy of trained
weights, the realistic estimate).

quant: round-to-nearest against GPTQ int6 on the same trained weights, at the run's grid and coarser forced
steps, at equal artifact bytes; --competition times calibration and GPTQ of the competition-shaped model and
estimates 8xH100 (tools/bench_quant.py has the details).

Floors: SLOT adds at most 20% time to its pass (the one-code-path issue, which replaced the SLOT issue's 10% of the
C kernels) and at most 10% peak memory, in both modes; CTW adds at most 25% time to the sliding pass (the CTW issue)
and at most 10% peak memory.
Exit status: 0 (also when a floor is missed: the table says so), 2 on bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _cli import Parser

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FLOOR_TIME, FLOOR_MEM, FLOOR_CTW = 0.20, 0.10, 0.25


class BenchError(Exception):
    """Bad input: one line, exit status 2."""


# ---- train ----
def matmul_gflops(dtype_name: str, n: int = 1024, reps: int = 12) -> float:
    """This machine's measured (n x n) @ (n x n) throughput in this dtype, fastest of `reps` (the MFU peak)."""
    import torch
    dt = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    a @ b
    best = float("inf")
    for i in range(reps):  # the fastest rep: a busy neighbour only ever slows a rep down
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
        if i == 1 and best > 0.5:  # bf16 on AVX2-only CPUs is ~100x slower: two slow reps are enough
            break
    return 2 * n ** 3 / best / 1e9


def model_flops_per_token(model, cfg) -> float:
    """Training FLOPs per token: 6 x (weights used in matmuls, the tied head included) + 6 L T D for causal attention
    (QK^T and AV, forward 2 T D per layer on average, backward twice that). Embedding lookups and elementwise work
    are not counted, as in the usual MFU convention."""
    mm = sum(p.numel() for n, p in model.named_parameters()
             if n.endswith("_bank") or n.endswith("proj.weight") or n == "lm_head.weight")
    mm += cfg.vocab_size * cfg.model_dim if cfg.tie_embeddings else 0
    return 6.0 * mm + 6.0 * cfg.num_layers * cfg.train_seq_len * cfg.model_dim


def train_worker(args) -> int:
    """One mode in this (fresh) process: real `train_gpt.train` steps (optimizer included), one JSON line."""
    import torch
    import train_gpt as tg
    torch.set_num_threads(args.threads)
    env = dict(os.environ)
    env.setdefault("PRESET", "cpu")
    env.update(ITERATIONS=str(args.steps), WARMUP_STEPS=str(args.warmup), MAX_WALLCLOCK_SECONDS="0",
               VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1000000", WARMDOWN_ITERS="0")  # the main phase: no warmdown,
    # so late QAT (the last ~15% of a real run) never switches on mid-benchmark (it would recompile the graph)
    env["COMPILE"] = "1" if args.one == "compiled" else "0"  # eager: the trunk; the head follows COMPILE_HEAD
    cfg = tg.Config.from_env(env)
    rt = tg.setup_runtime(cfg, env)
    if not tg.shard_files(cfg.data_path, "train"):
        raise BenchError(f"DATA_PATH {cfg.data_path} has no train shards: run `bash setup.sh` (offline dataset)")
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg).to(rt.device)
    val_cfg = dataclasses.replace(cfg, val_max_tokens=cfg.train_seq_len * 4)
    val = tg.ValData(tg.load_val_tokens(val_cfg), tg.load_tokenizer_luts(cfg))
    log = tg.Logger(None, False)
    t = time.perf_counter()
    out = tg.train(val_cfg, rt, model, val, log)
    wall = time.perf_counter() - t
    tokens = out["steps"] * cfg.train_batch_tokens
    print(json.dumps(dict(mode=args.one, steps=out["steps"], warmup=args.warmup, train_seconds=out["train_seconds"],
                          wall_seconds=wall, tokens=tokens, batch_tokens=cfg.train_batch_tokens,
                          seq_len=cfg.train_seq_len, params=tg.count_params(model), amp=rt.amp,
                          flops_per_token=model_flops_per_token(model, cfg), peak_mb=max_rss_mb(),
                          threads=torch.get_num_threads(), device=str(rt.device))))
    return 0


# The reference #549's work per step at the competition shape, from parameter_golf.md: its tensors (5.1) and dtypes
# (5.4: the three embedding tables are bf16 parameters, everything else fp32) and its Parallel Muon (6.3: the banks
# padded to a multiple of the world size in bf16 buffers, reduce-scattered and all-gathered; every other grad
# all-reduced in its parameter's dtype; 7: the stop flag every step). Ring collectives: a reduce-scatter or all-gather sends (W-1)/W of the full
# buffer per rank, an all-reduce twice that.
REF_BANKS = ((22, 512 * 512), (22, 256 * 512), (11, 1536 * 512), (11, 512 * 1536))  # (matrices, elements each)
REF_BF16_REPLICATED = 1024 * 512 + 1536 * 128 + 1024 * 128  # tok_emb, bigram.embed, ve_shared.embed
REF_PARAMS = 26_928_220


def ref_work_per_step(world: int = 8) -> dict:
    banks = sum(-(-n // world) * world * e for n, e in REF_BANKS)
    replicated = REF_PARAMS - sum(n * e for n, e in REF_BANKS)
    ring = (world - 1) / world
    sent = 2 * ring * 2 * banks + 2 * ring * (2 * REF_BF16_REPLICATED + 4 * (replicated - REF_BF16_REPLICATED))
    return dict(collective_bytes=sent + 2 * ring * 8)  # + the stop flag (7: an int64 all-reduced MAX every step)


def our_work_per_step(world: int = 8) -> dict:
    """Bytes each rank sends per training step at the competition shape and world size `world`, counted by running
    train_gpt's own Optimizers.step with the collectives replaced by recorders (no process group, no GPU)."""
    import torch
    import torch.distributed as dist
    import train_gpt as tg
    cfg = tg.Config.from_env({"PRESET": "competition", "DEVICE": "cpu"})
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    rt = tg.Runtime(device=torch.device("cpu"), world_size=world, amp=True)
    opt = tg.Optimizers(model, cfg, rt)
    ring, sent = (world - 1) / world, []

    class Done:
        def wait(self):
            pass

    def rs(out, inp, async_op=False, **kw):
        sent.append(ring * inp.numel() * inp.element_size())
        return Done()

    def ag(out, inp, async_op=False, **kw):
        sent.append(ring * out.numel() * out.element_size())
        return Done()

    def ar(t, op=None):
        sent.append(2 * ring * t.numel() * t.element_size())
        return t
    saved = dist.reduce_scatter_tensor, dist.all_gather_into_tensor, tg.all_reduce_
    dist.reduce_scatter_tensor, dist.all_gather_into_tensor, tg.all_reduce_ = rs, ag, ar
    try:
        opt.set_schedule(1.0, 0)
        opt.step()
    finally:
        dist.reduce_scatter_tensor, dist.all_gather_into_tensor, tg.all_reduce_ = saved
    ar(torch.zeros(()))  # the step's stop decision (one float, all-reduced MAX)
    return dict(collective_bytes=sum(sent), flops_per_token=model_flops_per_token(model, cfg),
                params=tg.count_params(model))


def print_work_per_step() -> None:
    ours, ref = our_work_per_step(), ref_work_per_step()
    ref_flops = ours["flops_per_token"] if ours["params"] == REF_PARAMS else float("nan")  # same shapes, same count
    print("# work per training step at the competition shape, world size 8 (counted from the code; the reference "
          "#549 from parameter_golf.md 5.1, 5.4, 6.3)")
    print("| | model FLOPs per token | collective MB sent per rank per step |")
    print("|---|---|---|")
    print(f"| ours | {ours['flops_per_token'] / 1e6:.1f} M | {ours['collective_bytes'] / 1e6:.1f} |")
    print(f"| reference #549 | {ref_flops / 1e6:.1f} M | {ref['collective_bytes'] / 1e6:.1f} |")
    ok = ours["flops_per_token"] <= ref_flops and ours["collective_bytes"] <= ref["collective_bytes"]
    print(f"work per step vs the reference: {'PASS' if ok else 'FAIL'} (neither may exceed it)")


def bench_train(args) -> int:
    if args.one:
        return train_worker(args)
    rows = []
    load0 = os.getloadavg()
    for mode in args.modes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "train", "--one", mode, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            why = (p.stderr.strip().splitlines() or ["?"])[-1]
            if p.returncode == 2:
                raise BenchError(why.removeprefix("error: "))
            print(f"  {mode}: failed (exit {p.returncode}): {why}", file=sys.stderr)
            rows.append(dict(mode=mode, failed=why))
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["process_seconds"] = time.perf_counter() - t
        rows.append(r)
        print(f"  {mode}: {r['train_seconds']:.1f}s for {r['steps']} steps (process {r['process_seconds']:.0f}s)",
              file=sys.stderr, flush=True)
    import torch
    torch.set_num_threads(args.threads)
    peak32, peak16 = matmul_gflops("float32"), matmul_gflops("bfloat16")
    ok = [r for r in rows if "failed" not in r]
    if ok:
        r0 = ok[0]
        print(f"# bench train: PRESET={os.environ.get('PRESET', 'cpu')} {r0['params']} params, batch "
              f"{r0['batch_tokens']} tokens x seq {r0['seq_len']}, {args.steps} timed steps after {args.warmup} "
              f"warm-up steps, optimizer included; device {r0['device']} amp {int(r0['amp'])}, torch threads "
              f"{r0['threads']}; {platform.machine()} x{os.cpu_count()}; matmul peak fp32 {peak32:.1f} GFLOP/s, "
              f"bf16 {peak16:.1f} GFLOP/s; loadavg {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print("| mode | steps | s/step | tokens/s | MFLOP/token | GFLOP/s | MFU vs fp32 peak | MFU vs bf16 peak "
          "| peak RSS MiB | process s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['mode']} | failed: {r['failed']} | | | | | | | | |")
            continue
        tps = r["tokens"] / r["train_seconds"]
        gf = tps * r["flops_per_token"] / 1e9
        print(f"| {r['mode']} | {r['steps']} | {r['train_seconds'] / r['steps']:.2f} | {tps:.0f} | "
              f"{r['flops_per_token'] / 1e6:.1f} | {gf:.1f} | {100 * gf / peak32:.1f}% | {100 * gf / peak16:.0f}% | "
              f"{r['peak_mb']:.0f} | {r['process_seconds']:.0f} |")
    print_work_per_step()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, peak_fp32=peak32, peak_bf16=peak16), indent=1) + "\n")
    return 0 if ok else 1


# ---- compile ----
COMPILE_ENV = dict(  # a tiny competition-shaped config with every feature on; late QAT switches on at step 6 of 8
    PRESET="competition", DEVICE="cpu", COMPILE="1", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2",
    NUM_KV_HEADS="1", ROPE_DIMS="16", VE_LAYERS="0,1", XSA_LAST_N="1", BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16",
    VE_DIM="16", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS=str(8 * 2 * 64), EVAL_SEQ_LEN="64", EVAL_STRIDE="16",
    EVAL_BATCH_SEQS="8", TTT_CHUNK_TOKENS="256", TTT_BATCH_SEQS="2", VAL_MAX_TOKENS="1000", VAL_BATCH_SIZE="512",
    ITERATIONS="8", WARMUP_STEPS="2", WARMDOWN_ITERS="4", LATE_QAT_THRESHOLD="0.5", MAX_WALLCLOCK_SECONDS="0",
    VAL_LOSS_EVERY="4", TRAIN_LOG_EVERY="1", MUON_MOMENTUM_WARMUP_STEPS="2", EVAL_TIME_LIMIT_SECONDS="600")
COMPILED_FNS = ("forward", "forward_hidden", "head_nll", "softcap_nll", "fit_delta")


def compile_phases(events: list) -> list[tuple[str, dict]]:
    """(phase, {function: compiles}) in order, from a stream of ("log", line) and ("compile", function) events.
    A run's phases: warmup (up to `warmup:done`), the timed training loop (up to `ema:applying`), then every eval
    stage: the compiles before a `stage:NAME` line belong to the pass that produced it (post_ema, export, reload and
    the eval-time estimate are counted with the first stage)."""
    phases, cur, run = [], {}, 0
    name = "warmup"
    for kind, what in events:
        if kind == "compile":
            cur[what] = cur.get(what, 0) + 1
            continue
        if what.startswith("logs/run_id:"):
            run += 1
            name = "warmup" if run == 1 else "eval_only"
        elif what.startswith("warmup:done"):
            phases.append((name, cur))
            cur, name = {}, "train_loop"
        elif what.startswith("ema:applying"):
            phases.append((name, cur))
            cur, name = {}, "eval"
        elif what.startswith("stage:"):
            stage = what.split()[0].removeprefix("stage:")
            phases.append((f"{name}:{stage}" if name != "train_loop" else stage, cur))
            cur = {}
    if cur:
        phases.append((name + ":end", cur))
    return phases


def bench_compile(args) -> int:
    """Runs train_gpt.run twice in this process with COMPILE=1 on the CPU (inductor's C++ backend): a training run
    (warmup, the timed loop across the late-QAT switch and an in-loop validation, export, reload, roundtrip,
    sliding and TTT with SLOT_MODE=batch), then EVAL_ONLY on its artifact with SLOT_MODE=causal (a fresh model from
    the file). Counts dynamo's compiles per function and phase (a bytecode hook: one call per compiled graph) and its
    graph breaks."""
    import logging
    import tempfile
    import torch
    import train_gpt as tg
    torch.set_num_threads(args.threads)
    cpu = tg.Config.from_env({"PRESET": "cpu"})
    if not tg.shard_files(cpu.data_path, "train"):
        raise BenchError(f"DATA_PATH {cpu.data_path} has no train shards: run `bash setup.sh` (offline dataset)")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    events: list = []
    hook = torch._dynamo.convert_frame.register_bytecode_hook(lambda code, new: events.append(("compile", code.co_name)))
    real_log = tg.Logger.__call__

    def log(self, msg, console=True):
        events.append(("log", msg))
        return real_log(self, msg, console and args.verbose)
    tg.Logger.__call__ = log
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # the table says it; no recompile warnings
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as out:
            env = dict(COMPILE_ENV, DATA_PATH=cpu.data_path, TOKENIZER_PATH=cpu.tokenizer_path, OUT_DIR=out,
                       RUN_ID="compile", VOCAB_SIZE=str(cpu.vocab_size))
            tg.run(env)
            tg.run(dict(env, EVAL_ONLY="1", LOAD_ARTIFACT=str(Path(out) / "compile.ptz"), RUN_ID="compile_eval",
                        SLOT_MODE="causal", SLOT_STEPS="4", SLOT_LR="0.005"))
    finally:
        tg.Logger.__call__ = real_log
        hook.remove()
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    phases = compile_phases(events)
    fns = [f for f in COMPILED_FNS if any(f in c for _, c in phases)] + sorted(
        {f for _, c in phases for f in c} - set(COMPILED_FNS))
    print(f"# bench compile: COMPILE=1 on the CPU (inductor C++), tiny competition-shaped config, every feature on; "
          f"graph breaks {breaks}; {time.perf_counter() - t0:.0f}s")
    print("| phase | " + " | ".join(fns) + " |")
    print("|---|" + "---|" * len(fns))
    for name, c in phases:
        print(f"| {name} | " + " | ".join(str(c.get(f, 0)) for f in fns) + " |")
    loop = sum(sum(c.values()) for name, c in phases if name == "train_loop")
    worst = max((max(c.values(), default=0) for name, c in phases if ":" in name), default=0)
    checks = [("graph breaks", breaks, breaks == 0), ("recompiles in the timed training loop", loop, loop == 0),
              ("most graphs of one function in one eval pass", worst, worst <= 1)]
    for what, n, ok in checks:
        print(f"{what}: {n} {'PASS' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(graph_breaks=breaks, phases=phases, train_loop=loop,
                                                   max_per_pass=worst), indent=1) + "\n")
    return 0


# ---- eval ----
def eval_rows(args) -> list[dict]:
    """The configurations, in table order: per pass, SLOT off first (the reference of the overhead column)."""
    rows = []
    for ttt in (False, True):
        p = "ttt" if ttt else "sliding"
        rows.append(dict(name=f"{p}/off", ttt=ttt, slot=False))
        if "batch" in args.modes:
            rows.append(dict(name=f"{p}/batch", ttt=ttt, slot=True, slot_mode="batch", slot_steps=args.batch_steps,
                             slot_lr=args.batch_lr, slot_context=0))
        if "causal" in args.modes:
            for k in args.contexts:
                rows.append(dict(name=f"{p}/causal" + (f" ctx={k}" if k else ""), ttt=ttt, slot=True,
                                 slot_mode="causal", slot_steps=args.causal_steps, slot_lr=args.causal_lr,
                                 slot_context=k))
        if not ttt:  # CTW costs the same on either pass; the sliding pass is the shorter one, the stricter ratio
            rows += [dict(name=f"{p}/ctw w={w:g}", ttt=ttt, slot=False, ctw=w) for w in args.ctw]
    return rows


def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def setup(args):
    """(cfg, model, val, source): the same for every configuration of one benchmark."""
    import torch
    import train_gpt as tg
    env = {k: v for k, v in os.environ.items()}
    env.setdefault("PRESET", "cpu")
    cfg = tg.Config.from_env(env)
    if args.artifact:
        model, cfg = tg.load_artifact(args.artifact, cfg)
    else:
        torch.manual_seed(cfg.seed)
        model = tg.GPT(cfg)
    model.eval()
    files = tg.shard_files(cfg.data_path, "val")
    if files:
        tokens = tg.load_val_tokens(dataclasses.replace(cfg, val_max_tokens=args.val_tokens))
        source = f"{cfg.data_path} (val)"
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        tokens = torch.randint(0, cfg.vocab_size, ((args.val_tokens or 65536) + 1,), generator=g)
        source = "synthetic (uniform random tokens)"
    try:
        luts = tg.load_tokenizer_luts(cfg) if files else None
    except (tg.UserError, ImportError):
        luts = None
    return cfg, model, tg.ValData(tokens, luts), source


def eval_worker(args) -> int:
    """One configuration in this (fresh) process: warm up, run the pass once, print one JSON line."""
    import torch
    import train_gpt as tg
    spec = json.loads(args.worker)
    torch.set_num_threads(args.threads)
    cfg, model, val, source = setup(args)
    over = dict(slot_enabled=spec["slot"], ttt_enabled=spec["ttt"], ctw_weight=spec.get("ctw", 0.0))
    if spec["slot"]:
        over.update(slot_mode=spec["slot_mode"], slot_steps=spec["slot_steps"], slot_lr=spec["slot_lr"],
                    slot_context=spec["slot_context"])
    cfg = dataclasses.replace(cfg, **over)
    cfg.validate()
    rt = tg.setup_runtime(dataclasses.replace(cfg, device="cpu"), {})  # the main job's CPU process settings
    kw = dict(seq_len=cfg.eval_seq_len, stride=cfg.eval_stride, batch_seqs=cfg.eval_batch_seqs, slot=spec["slot"],
              ttt=spec["ttt"])
    warm = tg.ValData(val.tokens[: 2 * cfg.eval_seq_len + 1], None)  # a few batches; TTT trains on tiny chunks
    tg.eval_pass(model, warm, dataclasses.replace(cfg, ttt_chunk_tokens=cfg.eval_stride), rt, **kw)
    rss0, peak0 = rss_mb(), max_rss_mb()

    def timed(c, slot):
        t0, c0 = time.perf_counter(), time.process_time()
        r = tg.eval_pass(model, val, c, rt, **dict(kw, slot=slot))
        return r, time.perf_counter() - t0, time.process_time() - c0

    res, secs, cpu = timed(cfg, spec["slot"])
    peak = max_rss_mb()  # the peak of this configuration alone (fresh process, first full pass)
    pairs = []  # then SLOT and CTW off and this configuration alternately, in this same process
    for i in range(args.inner if spec["slot"] or spec.get("ctw") else 0):
        for first in (i % 2 == 0, i % 2 == 1):  # off-on, then on-off, ...
            if first:
                r_off, off_s, off_c = timed(dataclasses.replace(cfg, slot_enabled=False, ctw_weight=0.0), False)
            else:  # exactly the first pass's configuration (a CTW row: no SLOT)
                r_on, on_s, on_c = timed(cfg, spec["slot"])
        pairs.append(dict(off_seconds=off_s, off_cpu=off_c, seconds=on_s, cpu_seconds=on_c,
                          off_variants=sorted(r_off), variants=sorted(r_on)))
    n = val.tokens.numel() - 1
    plan = tg.window_plan(n, cfg.eval_seq_len, cfg.eval_stride)
    batch = {}
    if spec["slot"] and args.batch_reps:  # one scoring batch of full-context windows, SLOT off/on alternately
        wins = plan[1: 1 + cfg.eval_batch_seqs]
        idx = torch.tensor([ws for ws, _, _ in wins])[:, None] + torch.arange(wins[0][1] + 1)[None, :]
        x, y = val.tokens[idx][:, :-1], val.tokens[idx][:, 1:]
        los = torch.tensor([lo for _, _, lo in wins])
        t_off, t_on = [], []
        for i in range(args.batch_reps):
            for slot in ((False, True) if i % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                tg.score_batch(model, model.forward_hidden, x, y, los, cfg, rt, slot)
                (t_on if slot else t_off).append(time.perf_counter() - t0)
        n_batches = sum(-(-len(list(g)) // cfg.eval_batch_seqs) for g in chunk_windows(tg, plan, cfg, spec["ttt"]))
        batch = dict(batch_off_ms=1e3 * min(t_off), batch_on_ms=1e3 * min(t_on), n_batches=n_batches,
                     batch_diff_ms=[1e3 * (b - a) for a, b in zip(t_off, t_on)])
    print(json.dumps(dict(
        name=spec["name"], seconds=secs, cpu_seconds=cpu, pairs=pairs, **batch, targets=n, windows=len(plan),
        trunk_tokens=sum(length for _, length, _ in plan), rss_before_mb=rss0, peak_before_mb=peak0,
        peak_mb=peak, amp=rt.amp, threads=torch.get_num_threads(), source=source,
        vocab=cfg.vocab_size, model_dim=cfg.model_dim, seq=cfg.eval_seq_len, stride=cfg.eval_stride,
        batch_seqs=cfg.eval_batch_seqs, ttt_epochs=cfg.ttt_epochs, ttt_chunk=cfg.ttt_chunk_tokens,
        params=tg.count_params(model),
        results={v: {k: r[k] for k in ("loss", "bpb", "tokens", "nll")} for v, r in res.items()})))
    return 0


def chunk_windows(tg, plan, cfg, ttt: bool) -> list[list]:
    """The windows of each scoring chunk, as eval_pass groups them (one chunk without TTT)."""
    n = sum(length - lo for _, length, lo in plan)
    C = cfg.ttt_chunk_tokens if ttt else max(n, 1)
    chunks = [[] for _ in range(-(-n // C))]
    for w, ch in zip(plan, tg.window_chunks(plan, C)):
        chunks[min(ch, len(chunks) - 1)].append(w)
    return chunks


def slot_extra_mb(r: dict, spec: dict) -> float:
    """Analytic size of the largest tensors SLOT adds per scoring batch (head_nll, dense over the batch): P =
    exp(-2z/c) and the one-hot mask of the fitted logits, two fp32 temporaries of the same size per step, and the
    shifted logits that are scored."""
    if not spec.get("slot"):
        return 0.0
    B, T, V = r["batch_seqs"], r["seq"], r["vocab"]
    return B * T * V * (4 * 4 + 1) / 2**20


def run_worker(args, spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "eval", "--worker", json.dumps(spec),
           "--val-tokens", str(args.val_tokens), "--threads", str(args.threads), "--inner", str(args.inner),
           "--batch-reps", str(args.batch_reps)]
    if args.artifact:
        cmd += ["--artifact", args.artifact]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads yield: steadier on a shared machine
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise BenchError(f"{spec['name']}: worker failed (exit {p.returncode}): "
                         f"{(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_eval(args) -> int:
    if args.worker:
        return eval_worker(args)
    if args.artifact and not Path(args.artifact).is_file():
        raise BenchError(f"--artifact {args.artifact}: no such file")
    specs = eval_rows(args)
    runs: dict[str, list[dict]] = {s["name"]: [] for s in specs}
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    for rep in range(args.repeat):  # interleaved, so slow phases of a shared machine hit every row alike
        for s in specs:
            r = run_worker(args, s)
            runs[s["name"]].append(r)
            print(f"  [{rep + 1}/{args.repeat}] {s['name']:<22} {r['seconds']:8.2f}s (cpu {r['cpu_seconds']:.2f}s) "
                  f"peak {r['peak_mb']:.0f} MiB", file=sys.stderr, flush=True)
    best = {}
    for k, v in runs.items():  # fastest of every timing of this configuration (first passes and paired ones)
        on = [(r["seconds"], r["cpu_seconds"]) for r in v] + [(p["seconds"], p["cpu_seconds"]) for r in v
                                                              for p in r["pairs"]]
        best[k] = dict(v[0], seconds=min(t for t, _ in on), cpu_seconds=min(c for _, c in on),
                       peak_mb=min(r["peak_mb"] for r in v))
    first = next(iter(best.values()))
    print(f"# bench eval: {first['source']}, {first['targets']} targets, seq {first['seq']} stride {first['stride']} "
          f"batch {first['batch_seqs']} windows {first['windows']}; TTT chunk {first['ttt_chunk']} epochs "
          f"{first['ttt_epochs']}; model {'artifact ' + args.artifact if args.artifact else 'random init'} "
          f"({first['params']} params); torch threads {first['threads']} amp {int(first['amp'])}; "
          f"{platform.machine()} x{os.cpu_count()}; repeat {args.repeat} (fastest kept); "
          f"loadavg {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}; total {time.perf_counter() - t_all:.0f}s")
    hdr = ("| run | steps | seconds | tokens/s | pass vs off | cpu vs off | batch ms off/on | batch vs off "
           "| est. pass vs off | peak MiB | peak vs off | SLOT tensors MiB | loss plain | loss slot/ctw |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    floors, out = [], []
    for s in specs:
        r = best[s["name"]]
        off = best[("ttt" if s["ttt"] else "sliding") + "/off"]
        dt, dc = r["seconds"] / off["seconds"] - 1, r["cpu_seconds"] / off["cpu_seconds"] - 1
        procs = runs[s["name"]]
        pairs = [p for q in procs for p in q["pairs"]]
        if pairs:  # back-to-back pairs of one process: the median of their on/off ratios over all processes
            dt = statistics.median(p["seconds"] / p["off_seconds"] for p in pairs) - 1
            dc = statistics.median(p["cpu_seconds"] / p["off_cpu"] for p in pairs) - 1
        bt = [q for q in procs if "batch_on_ms" in q]
        b_off = min(q["batch_off_ms"] for q in bt) if bt else None
        b_on = min(q["batch_on_ms"] for q in bt) if bt else None
        # SLOT's cost per batch (median of adjacent differences) times the pass's batches, over the pass without
        # SLOT (median of this row's off passes)
        off_pass = statistics.median([p["off_seconds"] for p in pairs] or [off["seconds"]])
        est = statistics.median(d for q in bt for d in q["batch_diff_ms"]) / 1e3 * bt[0]["n_batches"] / off_pass \
            if bt else None
        dm = r["peak_mb"] / off["peak_mb"] - 1
        res = r["results"]
        var = "ctw" if s.get("ctw") else "slot"
        slot_loss = f"{res[var]['loss']:.4f}" if var in res else "-"
        same_plain = res["plain"]["nll"] == off["results"]["plain"]["nll"]

        def rel(x):
            return f"{100 * x:+.1f}%" if (s["slot"] or s.get("ctw")) and x is not None else "-"
        print(f"| {s['name']} | {s.get('slot_steps', '-')} | {r['seconds']:.2f} | {r['targets'] / r['seconds']:.0f} | "
              f"{rel(dt)} | {rel(dc)} | {f'{b_off:.0f}/{b_on:.0f}' if bt else '-'} | "
              f"{rel(b_on / b_off - 1) if bt else '-'} | {rel(est)} | {r['peak_mb']:.0f} | {rel(dm)} | "
              f"{slot_extra_mb(r, s):.1f} | {res['plain']['loss']:.4f}{'' if same_plain else ' (!= off)'} | "
              f"{slot_loss} |")
        if s["slot"] or s.get("ctw"):
            floors.append((s["name"], dt, dc, est, dm, FLOOR_CTW if s.get("ctw") else FLOOR_TIME))
        out.append(dict(spec=s, best=r, runs=procs, time_overhead=dt, cpu_overhead=dc, est_overhead=est,
                        peak_overhead=dm, plain_identical_to_off=same_plain))
    for name, dt, dc, est, dm, floor_t in floors:
        ok = dt <= floor_t and dm <= FLOOR_MEM
        e = f", from the batch timing {100 * est:+.1f}%" if est is not None else ""
        print(f"floor {name}: time {100 * dt:+.1f}% (cpu {100 * dc:+.1f}%{e}; floor {100 * floor_t:.0f}%), "
              f"peak memory {100 * dm:+.1f}% (floor {100 * FLOOR_MEM:.0f}%): {'PASS' if ok else 'MISS'}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


# ---- size ----
def bench_size(args) -> int:
    import torch
    import train_gpt as tg
    env = dict(os.environ)
    env.setdefault("PRESET", "cpu")
    try:
        cfg = tg.Config.from_env(env, cuda=env["PRESET"] == "competition")
    except tg.UserError as e:
        raise BenchError(str(e)) from None
    torch.manual_seed(args.seed)
    model = tg.GPT(cfg)
    if args.init == "gaussian":
        with torch.no_grad():
            for prm in model.parameters():
                if prm.dim() >= 2:  # matrices: i.i.d. normal at the init's scale (1/sqrt(fan_in) where it was 0)
                    std = float(prm.std()) or prm.shape[-1] ** -0.5
                    prm.normal_(0.0, std)
    try:
        code = len(Path(args.code).read_bytes())
    except OSError as e:
        raise BenchError(f"--code {args.code}: cannot read ({e.strerror})") from None
    target = cfg.artifact_target_bytes
    t0 = time.perf_counter()
    blob, method, cands, step = tg.export_model(model, cfg, tg.model_budget(cfg, code))
    secs = time.perf_counter() - t0
    total = code + len(blob)
    print(f"# bench size: PRESET={cfg.preset} init={args.init} seed={args.seed} code={args.code}; "
          f"{cfg.num_layers} layers x {cfg.model_dim}, vocab {cfg.vocab_size}; export {secs:.1f}s")
    print(f"model_params:{tg.count_params(model)}")
    for k, v in sorted(cands.items(), key=lambda kv: kv[1]):
        print(f"compressor {k}: {v} bytes{' (chosen)' if k == method else ''}")
    if step != 1.0:
        print(f"artifact_fit: int6 step x{step:.4f} to fit ARTIFACT_TARGET_BYTES={target} (the run does the same)")
    print(f"bytes_code:{code} bytes_model:{len(blob)} bytes_total:{total} limit:16000000 "
          f"headroom:{16_000_000 - total} fits:{int(total <= 16_000_000)}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(preset=cfg.preset, init=args.init, seed=args.seed,
                                                   model_params=tg.count_params(model), compressors=cands,
                                                   compressor=method, int6_step=step, bytes_code=code,
                                                   bytes_model=len(blob),
                                                   bytes_total=total, fits=total <= 16_000_000), indent=1) + "\n")
    return 0


def parse_weights(s: str) -> list[float]:
    try:
        w = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated numbers in (0, 1), e.g. 0.05,0.1") from None
    if any(not 0 < x < 1 for x in w):
        raise argparse.ArgumentTypeError(f"{s!r}: every CTW weight must be in (0, 1)")
    return w


def parse_contexts(s: str) -> list[int]:
    try:
        vals = [int(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated integers >= 0") from None
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated integers >= 0")
    return vals


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="training throughput (optimizer steps) eager and compiled: tokens/s, MFU, memory")
    tr.add_argument("--steps", type=int, default=6, help="timed training steps per mode (default 6)")
    tr.add_argument("--warmup", type=int, default=2, help="warm-up steps first (run, then undone; default 2)")
    tr.add_argument("--modes", default="eager,compiled", help="eager and/or compiled (torch.compile, inductor)")
    tr.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    tr.add_argument("--json", default="", help="also write the rows here")
    tr.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one mode in this process
    ev = sub.add_parser("eval", help="sliding and TTT passes, SLOT off / batch / causal: time and peak memory")
    ev.add_argument("--artifact", default="", help="a saved .ptz artifact (default: a random-init model)")
    ev.add_argument("--val-tokens", type=int, default=16384,
                    help="cap on val targets (0: the whole val set; default 16384)")
    ev.add_argument("--repeat", type=int, default=1, help="fresh processes per configuration (interleaved)")
    ev.add_argument("--inner", type=int, default=4,
                    help="per SLOT process: extra back-to-back (SLOT off, SLOT on) pass pairs, order flipped every "
                         "other pair (default 4)")
    ev.add_argument("--batch-reps", type=int, default=8,
                    help="per SLOT process: (off, on) timings of one scoring batch, alternately (default 8)")
    ev.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per run")
    ev.add_argument("--modes", default="batch,causal", help="SLOT modes to time besides off (batch, causal)")
    ev.add_argument("--contexts", type=parse_contexts, default=[0, 64],
                    help="SLOT_CONTEXT values for causal rows (0: every context row; default 0,64)")
    ev.add_argument("--batch-steps", type=int, default=3)
    ev.add_argument("--batch-lr", type=float, default=0.001, help="the seed's SLOT_LR")
    ev.add_argument("--causal-steps", type=int, default=8)
    ev.add_argument("--causal-lr", type=float, default=0.005)
    ev.add_argument("--ctw", type=parse_weights, default=[0.1],
                    help="CTW_WEIGHT values timed on the sliding pass, SLOT off ('' for none; default 0.1)")
    ev.add_argument("--json", default="", help="also write every run's numbers here")
    ev.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: one configuration, JSON spec
    co = sub.add_parser("compile", help="torch.compile on the CPU: graph breaks, compiles per function and phase")
    co.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    co.add_argument("--verbose", action="store_true", help="also print the runs' own log lines")
    co.add_argument("--json", default="", help="also write the counts here")
    sz = sub.add_parser("size", help="artifact bytes of the configured model at initialisation (fits in 16 MB?)")
    sz.add_argument("--init", choices=("trainer", "gaussian"), default="gaussian",
                    help="gaussian (default): i.i.d. weights, close to trained entropy; trainer: the real init")
    sz.add_argument("--seed", type=int, default=0)
    sz.add_argument("--code", default=str(ROOT / "train_gpt.py"), help="the train_gpt.py whose bytes count as code "
                    "(default: the repository's raw file; a record's packed wrapper: tools/pack_code.py)")
    sz.add_argument("--json", default="", help="also write the numbers here")
    qu = sub.add_parser("quant", help="int6 round-to-nearest vs GPTQ on the same trained weights (penalty, bytes)")
    qu.add_argument("--checkpoint", default="logs/bench_quant_cpu.pt",
                    help="fp32 weights of the trained model: trained and saved here when missing")
    qu.add_argument("--iterations", type=int, default=172,
                    help="training steps when training (step-based schedule; default 172, the CPU main job's count)")
    qu.add_argument("--steps", type=parse_steps, default=[1.5, 1.75, 2.0],
                    help="forced int6 step factors besides the run's grid (default 1.5,1.75,2.0)")
    qu.add_argument("--seqs", type=int, default=0, help="GPTQ_CALIB_SEQS (default: the config's; 8 with "
                    "--competition)")
    qu.add_argument("--competition", action="store_true",
                    help="time calibration + GPTQ of the competition-shaped model here; estimate 8xH100")
    qu.add_argument("--jitter", type=int, default=0,
                    help="also average each row's penalties over this many steps 1.5%% apart (default 0: off)")
    qu.add_argument("--export", action="store_true", help="with --competition: also time the whole fitted export")
    qu.add_argument("--json", default="", help="also write the numbers here")
    return ap


def parse_steps(s: str) -> list[float]:
    try:
        vals = [float(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated numbers >= 1, e.g. 1.5,2") from None
    if any(not v >= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{s!r}: every step factor must be >= 1")
    return vals


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "train":
            if args.steps < 1 or args.warmup < 0 or args.threads < 1:
                raise BenchError("--steps and --threads must be >= 1, --warmup >= 0")
            args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
            if not args.modes or any(m not in ("eager", "compiled") for m in args.modes):
                raise BenchError(f"--modes {','.join(args.modes)}: use eager and/or compiled")
            return bench_train(args)
        if args.cmd == "size":
            return bench_size(args)
        if args.cmd == "compile":
            return bench_compile(args)
        if args.cmd == "quant":
            import bench_quant
            if args.iterations < 1 or args.seqs < 0 or args.jitter < 0:
                raise BenchError("--iterations must be >= 1, --seqs and --jitter >= 0")
            try:
                return bench_quant.bench_quant(args)
            except bench_quant.QuantBenchError as e:
                raise BenchError(str(e)) from None
        if min(args.val_tokens, args.inner, args.batch_reps) < 0 or min(args.repeat, args.threads) < 1:
            raise BenchError("--val-tokens, --inner and --batch-reps must be >= 0, --repeat and --threads >= 1")
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if any(m not in ("batch", "causal") for m in args.modes):
            raise BenchError(f"--modes {','.join(args.modes)}: use batch and/or causal")
        return bench_eval(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
