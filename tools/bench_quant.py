"""`python tools/bench.py quant`: int6 round-to-nearest (RTN) against GPTQ on the same trained weights.

    python tools/bench.py quant                         # CPU preset: trains once (--checkpoint), then the table
    python tools/bench.py quant --steps 1.5,1.75,2.0 --json logs/quant.json
    python tools/bench.py quant --competition           # time calibration + GPTQ of the competition-shaped model

Weights: the bench trains the configured model (PRESET=cpu unless PRESET says otherwise) exactly as a run does
(`train_gpt.train`, same seed, EMA applied), but for a fixed --iterations with the step-based schedule
(MAX_WALLCLOCK_SECONDS=0), so the weights do not depend on how busy the machine is, and saves their fp32 state
to --checkpoint; later invocations load it. Every row below quantizes these same weights.

Rows: the grid the run would choose (RTN export at ARTIFACT_TARGET_BYTES, as `train_gpt.export_model`), then every
--steps factor: RTN with every int6 row scale multiplied by that factor (the fit rule's coarsening, packed with
the run's compressor). GPTQ is then exported at the RTN row's artifact bytes as its budget, by the run's own fit
rule (`export_model(..., budget, hessians)`: the common step bisected on GPTQ's codes), so both sides are compared
at equal bytes. Calibration: `train_gpt.calibrate` with the config's GPTQ_CALIB_SEQS (--seqs).
penalty = roundtrip bpb - post_ema bpb, both by `train_gpt.evaluate_plain` on the whole val set.

Floor (the GPTQ issue): at every factor >= 1.5, GPTQ's penalty <= half of RTN's, at equal bytes (within 1%).
A penalty of ~1e-4 bpb at one step is mostly the luck of that rounding (the first-order term of the val loss
in the weight error): --jitter K adds, for every row, the mean penalty over K steps 1.5% apart around it (GPTQ at
the same step ratio its fit found), a less noisy reading of the same comparison.

--competition: the competition preset's model (every matrix i.i.d. normal at its init scale, as `bench size
--init gaussian`) on this CPU, --seqs sequences (default 8: one rank's share of 64 on 8 GPUs): times the Hessian
pass (`calibrate`), GPTQ's factorization and one GPTQ pass (and with --export the whole fitted
export); counts FLOPs and torch calls (~ kernel launches) of each phase, and estimates the
8xH100 time as FLOPs / sustained rate + calls x launch cost (the assumptions are printed with
the numbers).
Exit status: 0 (also when a floor is missed: the table says so), 2 on bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FLOOR_RATIO, FLOOR_BYTES, FLOOR_MIN_STEP = 0.5, 0.01, 1.5
JITTER = 0.015  # --jitter: relative spacing of the steps around each reported one
# 8xH100 estimate: sustained rates (about half of the H100 SXM datasheet's dense peaks: TF32 tensor 495, FP64
# tensor 67 TFLOP/s) and the cost of one small kernel launched from Python (eager PyTorch, no CUDA graphs)
H100_TF32, H100_FP64, LAUNCH_S = 250e12, 30e12, 10e-6


class QuantBenchError(Exception):
    """Bad input: one line, exit status 2."""


def _cfg(tg, env: dict, args):
    over = {}
    if args.seqs:
        over["gptq_calib_seqs"] = args.seqs
    try:
        cfg = dataclasses.replace(tg.Config.from_env(env, cuda=env.get("PRESET") == "competition"), **over)
        cfg.validate()
    except tg.UserError as e:
        raise QuantBenchError(str(e)) from None
    return cfg


def trained_model(tg, cfg, rt, val, args):
    """(model, info): the weights of --checkpoint, trained and saved first when the file does not exist."""
    import numpy as np
    import torch
    path = Path(args.checkpoint)
    arch = {k: getattr(cfg, k) for k in tg.ARCH_FIELDS}
    if path.is_file():
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ck["arch"].items()}
        except Exception as e:
            raise QuantBenchError(f"{path}: not a checkpoint of this bench ({type(e).__name__}); delete it") from None
        if saved != arch:
            raise QuantBenchError(f"{path}: trained with another model shape ({saved}); delete it or pass another "
                                  "--checkpoint")
        model = tg.GPT(cfg)
        model.load_state_dict(ck["state_dict"])
        return model.to(rt.device), ck["info"]
    tcfg = dataclasses.replace(cfg, iterations=args.iterations, max_wallclock_seconds=0.0)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = tg.GPT(tcfg).to(rt.device)
    print(f"# training {args.iterations} steps (PRESET={cfg.preset}, step-based schedule) for {path}", flush=True)
    t = time.perf_counter()
    out = tg.train(tcfg, rt, model, val, tg.Logger(None, True))
    info = dict(steps=out["steps"], train_seconds=out["train_seconds"], wall_seconds=time.perf_counter() - t,
                iterations=args.iterations, preset=cfg.preset, seed=cfg.seed)
    buf = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "arch": arch,
                "info": info}, buf)
    tg.atomic_write(path, buf.getvalue())
    return model, info


def roundtrip_bpb(tg, blob: bytes, cfg, rt, val) -> float:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "a.ptz"
        p.write_bytes(blob)
        model, _ = tg.load_artifact(str(p), cfg)
    return tg.evaluate_plain(model.to(rt.device), val, cfg, rt)[1]


class Blobs:
    """Artifacts of one model at a forced int6 step (the fit rule's move: every int6 row scale times `step`),
    rounded to nearest or by GPTQ (gptq_kinds of the Hessians), packed with one compressor."""

    def __init__(self, tg, model, cfg, hessians):
        import torch
        self.tg, self.cfg = tg, cfg
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        self.arrays, self.meta = tg.quantize_state(sd, cfg)
        self.mats = {k: (w, torch.from_numpy(self.arrays[k + ".scale"].copy()))
                     for k, w in tg.unbank(sd, cfg.num_layers).items() if self.meta[k]["kind"] == "int6"}
        self.gptq = tg.gptq_kinds(self.mats, hessians)

    def at(self, step: float, method: str, gptq: bool) -> bytes:
        arrays = dict(self.arrays)
        for k, (q, s) in self.tg.int6_codes(self.mats, step, self.gptq if gptq else ()).items():
            arrays[k + ".q"], arrays[k + ".scale"] = q.numpy(), s.numpy()
        arch = {k: getattr(self.cfg, k) for k in self.tg.ARCH_FIELDS}
        return self.tg.pack_artifact(arrays, self.meta, arch, only=method)[0]


def bench_quant(args) -> int:
    import torch
    import train_gpt as tg
    if args.competition:
        return bench_competition(args)
    env = dict(os.environ)
    env.setdefault("PRESET", "cpu")
    cfg = _cfg(tg, env, args)
    if not tg.shard_files(cfg.data_path, "train"):
        raise QuantBenchError(f"DATA_PATH {cfg.data_path} has no train shards: run `bash setup.sh` (offline dataset)")
    rt = tg.setup_runtime(cfg, {})
    val = tg.ValData(tg.load_val_tokens(cfg), tg.load_tokenizer_luts(cfg))
    model, info = trained_model(tg, cfg, rt, val, args)
    _, post = tg.evaluate_plain(model, val, cfg, rt)
    t = time.perf_counter()
    hessians = tg.calibrate(model, cfg, rt)
    calib_s = time.perf_counter() - t
    model = model.cpu()
    code = len((ROOT / "train_gpt.py").read_bytes())
    t = time.perf_counter()
    blob, method, _, run_step = tg.export_model(model, cfg, tg.model_budget(cfg, code))
    rtn_s = time.perf_counter() - t
    print(f"# bench quant: PRESET={cfg.preset} {cfg.num_layers}x{cfg.model_dim}, {tg.count_params(model):,} params; "
          f"checkpoint {args.checkpoint} ({info['steps']} steps); post_ema val_bpb {post:.6f}; calibration "
          f"{cfg.gptq_calib_seqs} seqs of {cfg.train_seq_len} in {calib_s:.1f}s; RTN export "
          f"{rtn_s:.1f}s ({method}); torch threads {torch.get_num_threads()}, loadavg {os.getloadavg()[0]:.1f}",
          flush=True)
    blobs = Blobs(tg, model, cfg, hessians)
    rows = []
    for f in [run_step] + [x for x in args.steps if x != run_step]:
        r_blob = blob if f == run_step else blobs.at(f, method, gptq=False)
        r_bpb = roundtrip_bpb(tg, r_blob, cfg, rt, val)
        t = time.perf_counter()
        g_blob, g_method, _, g_step = tg.export_model(model, cfg, len(r_blob), hessians)
        g_s = time.perf_counter() - t
        g_bpb = roundtrip_bpb(tg, g_blob, cfg, rt, val)
        row = dict(step=f, run_grid=f == run_step, rtn_bytes=len(r_blob), rtn_bpb=r_bpb, rtn_penalty=r_bpb - post,
                   gptq_step=g_step, gptq_bytes=len(g_blob), gptq_method=g_method, gptq_bpb=g_bpb,
                   gptq_penalty=g_bpb - post, gptq_export_seconds=g_s)
        row["bytes_ratio"] = row["gptq_bytes"] / row["rtn_bytes"]
        row["penalty_ratio"] = row["gptq_penalty"] / row["rtn_penalty"] if row["rtn_penalty"] > 0 else float("nan")
        row["floor"] = f >= FLOOR_MIN_STEP
        row["pass"] = (row["gptq_penalty"] <= FLOOR_RATIO * row["rtn_penalty"] and
                       abs(row["bytes_ratio"] - 1) <= FLOOR_BYTES)
        if args.jitter:  # the same comparison at steps around f: GPTQ at the same ratio of steps (~ equal bytes)
            rj, gj = [], []
            for i in range(args.jitter):
                x = f * (1 + JITTER * (i - (args.jitter - 1) / 2))
                rj.append(roundtrip_bpb(tg, blobs.at(x, method, False), cfg, rt, val) - post)
                gj.append(roundtrip_bpb(tg, blobs.at(x * g_step / f, g_method, True), cfg, rt, val) - post)
            row.update(jitter_steps=args.jitter, rtn_penalties=rj, gptq_penalties=gj,
                       rtn_penalty_mean=statistics.mean(rj), gptq_penalty_mean=statistics.mean(gj))
            row["mean_ratio"] = row["gptq_penalty_mean"] / row["rtn_penalty_mean"]
        rows.append(row)
        print(f"  x{f:.4g}: RTN {row['rtn_bytes']} bytes penalty {row['rtn_penalty']:+.5f}; GPTQ x{g_step:.4f} "
              f"{row['gptq_bytes']} bytes penalty {row['gptq_penalty']:+.5f} ({g_s:.0f}s)", file=sys.stderr,
              flush=True)
    print("| step | RTN bytes | RTN roundtrip bpb | RTN penalty | GPTQ step (fit to RTN bytes) | GPTQ bytes | bytes "
          "GPTQ/RTN | GPTQ roundtrip bpb | GPTQ penalty | penalty GPTQ/RTN | floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = f"x{r['step']:.4g}" + (" (run's grid)" if r["run_grid"] else "")
        verdict = ("PASS" if r["pass"] else "MISS") if r["floor"] else "-"
        print(f"| {name} | {r['rtn_bytes']:,} | {r['rtn_bpb']:.6f} | {r['rtn_penalty']:+.6f} | x{r['gptq_step']:.4f} | "
              f"{r['gptq_bytes']:,} | {r['bytes_ratio']:.4f} | {r['gptq_bpb']:.6f} | {r['gptq_penalty']:+.6f} | "
              f"{r['penalty_ratio']:.3f} | {verdict} |")
    if args.jitter:
        print(f"\nAround each step ({args.jitter} steps {100 * JITTER:g}% apart; GPTQ at the same step ratio as its "
              "fit above): mean penalty, and each one")
        print("| step | RTN mean penalty | GPTQ mean penalty | ratio of means | RTN penalties | GPTQ penalties |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| x{r['step']:.4g} | {r['rtn_penalty_mean']:+.6f} | {r['gptq_penalty_mean']:+.6f} | "
                  f"{r['mean_ratio']:.3f} | {' '.join(f'{v:+.5f}' for v in r['rtn_penalties'])} | "
                  f"{' '.join(f'{v:+.5f}' for v in r['gptq_penalties'])} |")
    floors = [r for r in rows if r["floor"]]
    ok = all(r["pass"] for r in floors)
    print(f"floor: GPTQ penalty <= {FLOOR_RATIO:g} x RTN's at every step >= x{FLOOR_MIN_STEP:g}, bytes within "
          f"{100 * FLOOR_BYTES:.0f}%: {'PASS' if ok and floors else 'MISS'}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(preset=cfg.preset, checkpoint=str(args.checkpoint), info=info,
                                                   post_ema_bpb=post, calib_seqs=cfg.gptq_calib_seqs, calib_seconds=calib_s,
                                                   method=method, rows=rows), indent=1) + "\n")
    return 0


# ---- the competition-shaped model: time on this CPU, FLOPs, estimate on 8xH100 ----
class CountCalls:
    """Counts torch function calls (each is about one kernel launch on a GPU) inside `with`."""

    def __init__(self):
        from torch.overrides import TorchFunctionMode

        class Mode(TorchFunctionMode):
            def __torch_function__(mode, func, types, args=(), kwargs=None):
                self.n += 1
                return func(*args, **(kwargs or {}))
        self.n, self.mode = 0, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def bench_competition(args) -> int:
    import torch
    import train_gpt as tg
    env = dict(os.environ, PRESET="competition", DEVICE="cpu", COMPILE="0")
    cfg = _cfg(tg, env, argparse.Namespace(**{**vars(args), "seqs": args.seqs or 8}))
    if not tg.shard_files(cfg.data_path, "train"):  # the Hessian pass reads train tokens: any dataset will do
        cfg = dataclasses.replace(cfg, data_path=tg.Config.from_env({"PRESET": "cpu"}).data_path)
    rt = tg.setup_runtime(cfg, {})
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg)
    with torch.no_grad():  # i.i.d. normal matrices at their init scale (bench size --init gaussian)
        for prm in model.parameters():
            if prm.dim() >= 2:
                prm.normal_(0.0, float(prm.std()) or prm.shape[-1] ** -0.5)
    model.eval()
    L, D, T, S = cfg.num_layers, cfg.model_dim, cfg.train_seq_len, cfg.gptq_calib_seqs
    H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    mm = sum(b.numel() for b in model.banks()) + cfg.vocab_size * D
    kinds = {"attn.c_q": (D, D), "attn.c_k": (Hkv * hd, D), "attn.c_v": (Hkv * hd, D), "attn.proj": (D, D),
             "mlp.fc": (cfg.mlp_dim, D), "mlp.proj": (D, cfg.mlp_dim)}
    out = dict(params=tg.count_params(model), seqs=S, seq_len=T)
    # 1. the Hessian pass, one rank's S sequences
    t = time.perf_counter()
    hessians = tg.calibrate(model, cfg, rt)
    out["hessian_pass_seconds"] = time.perf_counter() - t
    tokens = S * T
    out["hessian_pass_flops"] = (2 * tokens * mm + 2 * L * S * T * T * D  # forward (causal attention: half of 4 T^2 D)
                                 + 2 * tokens * L * (3 * D * D + cfg.mlp_dim ** 2))  # X^T X: 4 inputs per layer
    with torch.no_grad(), CountCalls() as c:
        model.forward_hidden(torch.zeros(1, 8, dtype=torch.long))
    out["hessian_pass_calls"] = c.n + 6 * L * 3  # + the recorder's cast, product and sum per matrix
    # 2. GPTQ: the factors once, then one pass per step (1 at step 1, 21 per fit try)
    mats = tg.unbank({n: getattr(model, n).detach() for n in tg.BANK_NAMES}, L)
    t = time.perf_counter()
    gptq = tg.gptq_kinds(mats, hessians)
    out["factor_seconds"] = time.perf_counter() - t
    pairs = {k: (w, tg.quantize_rows(w, 31, tg.INT6_PERCENTILES)[1]) for k, w in mats.items()}
    t = time.perf_counter()
    with CountCalls() as c:
        tg.int6_codes(pairs, 1.0, gptq)
    out["pass_seconds"], out["pass_calls"] = time.perf_counter() - t, c.n
    out["factor_flops"] = sum(L * 5 * c ** 3 // 3 for _, c in kinds.values())  # cholesky, inverse, cholesky (fp64)
    out["pass_flops"] = sum(L * r * c * c for r, c in kinds.values())  # the block updates: R x C x C/2 mul-adds
    if args.export:
        code = len((ROOT / "train_gpt.py").read_bytes())
        t = time.perf_counter()
        blob, method, sizes, step = tg.export_model(model.cpu(), cfg, tg.model_budget(cfg, code), hessians)
        out.update(export_seconds=time.perf_counter() - t, export_bytes=len(blob), export_step=step,
                   export_method=method, export_step1_bytes=sizes[method])
    # 8xH100: every rank calibrates its 8 of the 64 sequences at once; rank 0 then quantizes
    est = {"hessian_pass": out["hessian_pass_flops"] / H100_TF32 + out["hessian_pass_calls"] * LAUNCH_S}
    est["gptq_factors"] = out["factor_flops"] / H100_FP64
    est["gptq_pass"] = out["pass_flops"] / H100_TF32 + out["pass_calls"] * LAUNCH_S
    est["gptq_no_fit"] = est["gptq_factors"] + est["gptq_pass"]
    est["gptq_fit_1_try"] = est["gptq_factors"] + 23 * est["gptq_pass"]  # step 1, base, 20 bisection, the result
    out["h100_estimate_seconds"] = est
    print(f"# bench quant --competition: {out['params']:,} params (i.i.d. normal matrices), {S} seqs x {T} tokens "
          f"(one rank's share of 64 on 8 GPUs); this CPU: torch threads {torch.get_num_threads()}, loadavg "
          f"{os.getloadavg()[0]:.1f}")
    print(f"CPU measured: Hessian pass {out['hessian_pass_seconds']:.1f}s; GPTQ factors {out['factor_seconds']:.1f}s, one pass {out['pass_seconds']:.1f}s ({out['pass_calls']:,} torch calls)"
          + (f"; fitted export {out['export_seconds']:.0f}s ({out['export_bytes']:,} bytes at x{out['export_step']:.4f}"
             f", {out['export_method']}; step 1: {out['export_step1_bytes']:,})" if args.export else ""))
    print(f"FLOPs: Hessian pass {out['hessian_pass_flops']:.3g}; GPTQ factors {out['factor_flops']:.3g} (fp64), one GPTQ pass {out['pass_flops']:.3g}")
    print(f"8xH100 estimate (FLOPs / sustained TF32 {H100_TF32 / 1e12:.0f} or FP64 {H100_FP64 / 1e12:.0f} TFLOP/s, "
          f"+ calls x {1e6 * LAUNCH_S:.0f} us for the sequential loops): "
          + ", ".join(f"{k} {v:.2f}s" for k, v in est.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0
