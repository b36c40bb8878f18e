"""Ours against the PR #549 record's own script (its CPU copy), side by side: same shapes, data, budget and seeds.

    python tools/vs_reference.py --seeds 1337,1338,1339 --out runs/vs_ref            # CPU preset, 3 seeds a side
    python tools/vs_reference.py --seeds 1,2 --out runs/short --env MAX_WALLCLOCK_SECONDS=120
    python tools/vs_reference.py --out runs/vs_ref --table                            # the table of finished runs

The configuration is ours (PRESET, cpu by default, then every --env KEY=VALUE, read by `Config.from_env`); the
reference gets every variable it reads with the same value (its names are ours), so both train the same model on
the same data for the same wall-clock budget. TTT is off on both sides (the reference's TTT pass fails uncompiled)
and SLOT on ours (the reference has none): the stages compared are post_ema, roundtrip and sliding. Runs alternate
(ours, reference, ours, ...), one seed at a time, each a fresh process; the reference's copy is written by
../shared/anchors/cpu_patch.py into OUT/ref and runs there. Logs and summaries: OUT/{ours,ref}_s<SEED>.{log,json}
(the reference's summary is parsed from its log, in the format of ours, so tools/stats.py reads both). A run
whose summary exists is not run again.

The table: per seed, steps and each stage's bpb; then per stage (and per run's quantization penalty, roundtrip -
post_ema) the means, ours - reference (bpb and nats) and two
one-sided Welch tests on val_bpb (tools/stats.py): p(better), H1 ours < reference, and p(worse), H1 ours >
reference (bpb, not nats: ours scores every val target once, the reference its rows of whole sequences and the
sliding tail twice, so their token sets differ slightly). "not worse" means p(worse) >= --alpha. Exit status 0, 1 if a run failed, 2 on bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from _cli import Parser
from _common import ROOT, ToolError, tg
from stats import fmt_p, mean_std, welch_improvement

ANCHORS = ROOT.parent / "shared" / "anchors"
STAGES = ("post_ema", "roundtrip", "sliding")
PENALTY = "roundtrip - post_ema"  # the quantization penalty of each run, compared like a stage
# the reference's log lines of each stage (its *_exact lines, 8 decimals)
REF_LINES = {"post_ema": "DIAGNOSTIC post_ema", "roundtrip": "final_int6_roundtrip_exact",
             "sliding": "final_int6_sliding_window_exact"}
NOT_PASSED = ("CONTROL_TENSOR_NAME_PATTERNS", "RUN_ID")  # the reference's own default list stays (ours: "")
FIXED = {"TTT_ENABLED": "0", "SLOT_ENABLED": "0"}  # ours; the reference gets TTT_ENABLED=0 too


def parse_env(items) -> dict:
    env = {}
    for it in items or []:
        if "=" not in it:
            raise ToolError(f"--env {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        env[k.strip()] = v
    return env


def reference_names(src: str) -> list[str]:
    """The environment variables the reference script reads."""
    return sorted(set(re.findall(r'os\.environ\.get\(\s*"([A-Z0-9_]+)"', src)))


def run_envs(over: dict, ref_names, seed: int, data_root: Path = ROOT) -> tuple[dict, dict]:
    """(ours, reference): the variables each side is run with (added to the inherited environment)."""
    ours = {"PRESET": "cpu", **over, **FIXED, "SEED": str(seed)}
    cfg = tg.Config.from_env(ours)
    vals = {f.name.upper(): tg._format_value(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    for k in ("DATA_PATH", "TOKENIZER_PATH"):  # the reference runs in another folder
        p = Path(vals[k])
        vals[k] = str(p if p.is_absolute() else (data_root / p).resolve())
    ours.update(DATA_PATH=vals["DATA_PATH"], TOKENIZER_PATH=vals["TOKENIZER_PATH"])
    ref = {k: vals[k] for k in ref_names if k in vals and k not in NOT_PASSED}
    ref.update(TTT_ENABLED="0", EMA_DECAY=vals["EMA_DECAY"], VAL_LOSS_EVERY=vals["VAL_LOSS_EVERY"])
    if not cfg.late_qat:
        ref["LATE_QAT_THRESHOLD"] = "0"
    if cfg.compile or cfg.gptq or cfg.qat_enabled or not cfg.ema_enabled:
        raise ToolError("COMPILE, GPTQ, QAT_ENABLED=1 or EMA_ENABLED=0 have no counterpart in the reference's CPU copy")
    return ours, ref


def parse_reference_log(text: str, seed) -> dict:
    """A summary in the format of ours from the reference's log: steps, train time and the three stages."""
    stages = {}
    for name, key in REF_LINES.items():
        m = re.findall(re.escape(key) + r" val_loss:([0-9.]+) val_bpb:([0-9.]+)", text)
        if m:
            stages[name] = {"val_loss": float(m[-1][0]), "val_bpb": float(m[-1][1]), "compliance": "causal"}
    steps = re.findall(r"^step:(\d+)/\d+ (?:train_loss|val_loss)", text, re.M)
    tt = re.findall(r"train_time:(\d+)ms", text)
    params = re.findall(r"^model_params:(\d+)", text, re.M)
    s = {"stages": stages, "steps": int(steps[-1]) if steps else None,
         "train_seconds": int(tt[-1]) / 1000 if tt else None, "model_params": int(params[0]) if params else None,
         "config": {"seed": seed}}
    if stages:
        last = list(stages)[-1]
        s.update(final_stage=last, final_compliant_stage=last, val_bpb=stages[last]["val_bpb"],
                 val_loss=stages[last]["val_loss"])
    return s


def run_one(side: str, seed: int, env_add: dict, out: Path, ref_dir: Path) -> bool:
    log, js = out / f"{side}_s{seed}.log", out / f"{side}_s{seed}.json"
    if js.exists():
        print(f"{side} seed {seed}: done before ({js})", flush=True)
        return True
    run_id = f"vsref_{side}_s{seed}_{int(time.time())}"
    env = {**os.environ, **env_add, "RUN_ID": run_id}
    if side == "ours":
        env["OUT_DIR"] = str(out / "logs")
        cmd, cwd = [sys.executable, str(ROOT / "train_gpt.py")], ROOT
    else:
        cmd, cwd = [sys.executable, "train_gpt.py"], ref_dir
    print(f"{side} seed {seed}: running ({log})", flush=True)
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    print(f"{side} seed {seed}: exit {rc} after {time.perf_counter() - t:.0f}s", flush=True)
    if rc:
        return False
    if side == "ours":
        s = json.loads((out / "logs" / f"{run_id}.json").read_text())
    else:
        s = parse_reference_log(log.read_text(), seed)
        if set(s["stages"]) != set(STAGES):
            print(f"ref seed {seed}: stages missing from its log ({', '.join(s['stages']) or 'none'})", flush=True)
            return False
    js.write_text(json.dumps(s, indent=1, default=str))
    return True


def load_runs(out: Path) -> dict:
    """{side: {seed: summary}} of the summaries under out."""
    runs = {"ours": {}, "ref": {}}
    for p in sorted(out.glob("*_s*.json")):
        m = re.fullmatch(r"(ours|ref)_s(-?\d+)\.json", p.name)
        if m:
            runs[m[1]][int(m[2])] = json.loads(p.read_text())
    return runs


def table(runs: dict, alpha: float = 0.05) -> list[str]:
    """The side-by-side table: per-seed rows, then per stage means, differences and the two one-sided tests."""
    seeds = sorted(set(runs["ours"]) | set(runs["ref"]))
    if not seeds:
        raise ToolError("no finished runs")
    head = f"| seed | side | steps | " + " | ".join(STAGES) + " |"
    lines = [head, "|" + "---|" * (3 + len(STAGES))]
    for sd in seeds:
        for side in ("ours", "ref"):
            s = runs[side].get(sd)
            if s is None:
                continue
            vals = [f"{s['stages'][k]['val_bpb']:.4f}" if k in s["stages"] else "-" for k in STAGES]
            lines.append(f"| {sd} | {side} | {s.get('steps')} | " + " | ".join(vals) + " |")
    lines += ["", "| stage | ours mean (std) | reference mean (std) | ours - ref bpb | ours - ref nats | "
              "p(better) | p(worse) | verdict |", "|---|---|---|---|---|---|---|---|"]
    for k in ("steps",) + STAGES + (PENALTY,):
        if k == "steps":
            get = lambda s, m="val_bpb": s.get("steps")
        elif k == PENALTY:  # what quantization cost each run: roundtrip - post_ema
            get = lambda s, m="val_bpb": (s["stages"]["roundtrip"][m] - s["stages"]["post_ema"][m]
                                          if {"roundtrip", "post_ema"} <= set(s["stages"]) else None)
        else:
            get = lambda s, m="val_bpb", k=k: s["stages"].get(k, {}).get(m)
        a = [v for v in (get(s) for s in runs["ours"].values()) if v is not None]
        b = [v for v in (get(s) for s in runs["ref"].values()) if v is not None]
        if not a or not b:
            continue
        (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
        fmt = "{:.1f}" if k == "steps" else "{:.4f}"
        row = f"| {k} | {fmt.format(ma)} ({fmt.format(sa)}) | {fmt.format(mb)} ({fmt.format(sb)}) | "
        if k == "steps":
            lines.append(row + f"{ma - mb:+.1f} | | | | |")
            continue
        la = [v for v in (get(s, "val_loss") for s in runs["ours"].values()) if v is not None]
        lb = [v for v in (get(s, "val_loss") for s in runs["ref"].values()) if v is not None]
        better = welch_improvement(b, a, 0.0)["p"]  # H1: mean(ref) - mean(ours) > 0, in bpb
        worse = welch_improvement(a, b, 0.0)["p"]  # H1: mean(ours) - mean(ref) > 0
        verdict = ("n/a" if math.isnan(worse) else
                   ("better" if better < alpha else "not worse") if worse >= alpha else "WORSE")
        lines.append(row + f"{ma - mb:+.4f} | {mean_std(la)[0] - mean_std(lb)[0]:+.5f} | {fmt_p(better)} | "
                     f"{fmt_p(worse)} | {verdict} |")
    lines.append(f"(Welch t-tests on val_bpb, one-sided, alpha {alpha:g}: the two score slightly different token sets, "
                 "so nats are not comparable to the last digit; the reference's post_ema has 4 decimals)")
    return lines


def main(argv=None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1337,1338,1339", help="comma-separated seeds (default 1337,1338,1339)")
    ap.add_argument("--out", required=True, help="folder for the logs, summaries and the reference's copy")
    ap.add_argument("--env", action="append", metavar="KEY=VALUE", help="a setting for both sides (repeatable)")
    ap.add_argument("--anchors", default=str(ANCHORS), help="folder with cpu_patch.py (default ../shared/anchors)")
    ap.add_argument("--alpha", type=float, default=0.05, help="significance level of the verdicts (0.05)")
    ap.add_argument("--table", action="store_true", help="only print the table of the finished runs")
    ap.add_argument("--dry-run", action="store_true", help="print each side's variables, run nothing")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if not seeds:
            raise ToolError("--seeds: give at least one seed")
        if args.table:
            print("\n".join(table(load_runs(out), args.alpha)))
            return 0
        patch = Path(args.anchors) / "cpu_patch.py"
        if not patch.is_file():
            raise ToolError(f"{patch}: not found (the reference anchors live in ../shared/anchors)")
        over = parse_env(args.env)
        ref_src = (Path(args.anchors) / "pr549_train_gpt.py").read_text()
        envs = {sd: run_envs(over, reference_names(ref_src), sd) for sd in seeds}
    except (ToolError, tg.UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for sd, (o, r) in envs.items():
            print(f"seed {sd} ours: " + " ".join(f"{k}={v}" for k, v in sorted(o.items())))
            print(f"seed {sd} ref:  " + " ".join(f"{k}={v}" for k, v in sorted(r.items())))
        return 0
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ref_dir = out / "ref"
    subprocess.run([sys.executable, str(patch), str(ref_dir)], check=True, stdout=subprocess.DEVNULL)
    ok = True
    for sd in seeds:
        for side, env in zip(("ours", "ref"), envs[sd]):
            ok &= run_one(side, sd, env, out, ref_dir)
    print("\n".join(table(load_runs(out), args.alpha)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
