"""Seed statistics and the competition's significance test for run summaries (logs/<RUN_ID>.json).

Prints mean and std over seeds of every stage, then the difference between the configurations in nats and bpb
and the one-sided p-value that the new configuration (--b) beats the baseline (--a runs, or a fixed
--baseline-score) by at least --threshold nats (the rule: >= 0.005 nats at p < 0.01). Two groups: Welch's t-test
(unequal variances, Welch-Satterthwaite degrees of freedom). A fixed score: one-sample t-test. Lower is better.

    python tools/stats.py --a logs/base_s*.json --b logs/new_s*.json
    python tools/stats.py --b logs/new_s*.json --baseline-score 1.1194            # a leaderboard bpb
    python tools/stats.py --b logs/new_s*.json --baseline-score 1.89002 --baseline-metric nats --stage ttt

The score stage defaults to each run's final_compliant_stage (the last stage labelled causal), else its headline
val_bpb; --stage NAME picks one (`val_bpb` means the headline). Exit status 0, or 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from _cli import Parser
from _common import ToolError, expand_paths, load_summary, run_seed, stage_value

THRESHOLD_NATS = 0.005
ALPHA = 0.01


# ---- the t distribution, from the regularized incomplete beta function (Numerical Recipes' continued fraction)
def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        de = d * c
        h *= de
        if abs(de - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (df may be fractional)."""
    if math.isnan(t) or not df > 0:
        return float("nan")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t > 0 else 1.0 - tail


def mean_std(xs) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, sd


def welch_improvement(old, new, threshold: float = THRESHOLD_NATS) -> dict:
    """One-sided Welch test of H1: mean(old) - mean(new) > threshold (new is lower by more than threshold)."""
    na, nb = len(old), len(new)
    ma, sa = mean_std(old)
    mb, sb = mean_std(new)
    out = {"test": "welch", "diff": ma - mb, "threshold": threshold, "n_old": na, "n_new": nb}
    if na < 2 or nb < 2:
        return {**out, "t": float("nan"), "df": float("nan"), "p": float("nan"), "why": "need >= 2 runs per group"}
    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    if se == 0:
        p = 0.0 if ma - mb > threshold else 1.0
        return {**out, "t": math.copysign(math.inf, ma - mb - threshold), "df": float("nan"), "p": p}
    t = (ma - mb - threshold) / se
    df = (va + vb) ** 2 / ((va * va / (na - 1) if va else 0.0) + (vb * vb / (nb - 1) if vb else 0.0))
    return {**out, "t": t, "df": df, "p": t_sf(t, df)}


def one_sample_improvement(baseline: float, new, threshold: float = THRESHOLD_NATS) -> dict:
    """One-sided one-sample test of H1: baseline - mean(new) > threshold."""
    nb = len(new)
    mb, sb = mean_std(new)
    out = {"test": "one-sample", "diff": baseline - mb, "threshold": threshold, "n_old": 0, "n_new": nb}
    if nb < 2:
        return {**out, "t": float("nan"), "df": float("nan"), "p": float("nan"), "why": "need >= 2 runs"}
    se = sb / math.sqrt(nb)
    if se == 0:
        return {**out, "t": math.copysign(math.inf, baseline - mb - threshold), "df": nb - 1.0,
                "p": 0.0 if baseline - mb > threshold else 1.0}
    t = (baseline - mb - threshold) / se
    return {**out, "t": t, "df": nb - 1.0, "p": t_sf(t, nb - 1.0)}


# ---- reading groups of runs
class Group:
    def __init__(self, label: str, paths, stage: str | None):
        self.label = label
        self.paths = expand_paths(paths)
        if not self.paths:
            raise ToolError(f"--{label.lower()}: no run summaries given")
        self.runs = [load_summary(p) for p in self.paths]
        seeds = [run_seed(s) for s in self.runs]
        dup = sorted({str(s) for s in seeds if seeds.count(s) > 1})
        self.warnings = [f"{label}: seed {d} appears more than once" for d in dup]
        if stage is None:
            finals = {s.get("final_compliant_stage") for s in self.runs}
            if len(finals) == 1 and None not in finals:
                stage = finals.pop()
            else:
                self.warnings.append(f"{label}: runs disagree on (or lack) final_compliant_stage; using the headline "
                                     "val_bpb (pass --stage NAME)")
                stage = "val_bpb"
        self.stage = stage
        self.loss = [stage_value(s, stage, "val_loss", p) for s, p in zip(self.runs, self.paths)]
        self.bpb = [stage_value(s, stage, "val_bpb", p) for s, p in zip(self.runs, self.paths)]
        self.seeds = seeds
        labels = {s["stages"][stage].get("compliance") for s in self.runs} if stage != "val_bpb" else \
            {s["stages"].get(s.get("final_stage", ""), {}).get("compliance") for s in self.runs}
        self.compliance = "/".join(sorted(str(c) for c in labels))

    @property
    def nats_per_bpb(self) -> float:
        return sum(l / b for l, b in zip(self.loss, self.bpb)) / len(self.loss)

    def stage_table(self) -> list[str]:
        names = [k for k in self.runs[0]["stages"] if all(k in s["stages"] for s in self.runs)]
        lines = [f"{self.label}: {len(self.runs)} run(s), seeds {', '.join(map(str, self.seeds))}",
                 f"  {'stage':<16} {'n':>2}  {'val_bpb mean':>12} {'std':>10}  {'val_loss mean':>13} {'std':>10}  "
                 "compliance"]
        for k in names:
            b = [s["stages"][k]["val_bpb"] for s in self.runs]
            lo = [s["stages"][k]["val_loss"] for s in self.runs]
            comp = "/".join(sorted({str(s["stages"][k].get("compliance")) for s in self.runs}))
            (mb, sb), (ml, sl) = mean_std(b), mean_std(lo)
            mark = "  <- score" if k == self.stage else ""
            lines.append(f"  {k:<16} {len(b):>2}  {mb:>12.8f} {sb:>10.8f}  {ml:>13.8f} {sl:>10.8f}  {comp}{mark}")
        if self.stage == "val_bpb":
            (mb, sb), (ml, sl) = mean_std(self.bpb), mean_std(self.loss)
            lines.append(f"  {'(headline)':<16} {len(self.bpb):>2}  {mb:>12.8f} {sb:>10.8f}  {ml:>13.8f} {sl:>10.8f}  "
                         f"{self.compliance}  <- score")
        return lines


def fmt_p(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3g}" if p >= 1e-4 else f"{p:.2e}")


def main(argv=None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", nargs="+", metavar="JSON", help="baseline runs (one per seed)")
    ap.add_argument("--b", nargs="+", metavar="JSON", help="new runs (one per seed)")
    ap.add_argument("--baseline-score", type=float, help="compare --b (or --a if alone) with this fixed score")
    ap.add_argument("--baseline-metric", choices=("bpb", "nats"), default="bpb",
                    help="unit of --baseline-score (default bpb; converted with the runs' own nats/bpb ratio)")
    ap.add_argument("--stage", help="stage to compare (default: final_compliant_stage; 'val_bpb' = headline)")
    ap.add_argument("--threshold", type=float, default=THRESHOLD_NATS, help="required improvement in nats (0.005)")
    ap.add_argument("--alpha", type=float, default=ALPHA, help="significance level (0.01)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = ap.parse_args(argv)
    try:
        if args.baseline_score is not None:
            if args.a and args.b:
                raise ToolError("give --a and --b, or one group and --baseline-score, not all three")
            paths = args.b or args.a
            if not paths:
                raise ToolError("--baseline-score needs the runs to test (--b JSON...)")
            old, new = None, Group("B" if args.b else "A", paths, args.stage)
        else:
            if not (args.a and args.b):
                raise ToolError("give --a JSON... and --b JSON..., or --b JSON... --baseline-score SCORE")
            old, new = Group("A", args.a, args.stage), Group("B", args.b, args.stage)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    ratio = new.nats_per_bpb
    if old is not None:
        res = welch_improvement(old.loss, new.loss, args.threshold)
        diff_bpb = mean_std(new.bpb)[0] - mean_std(old.bpb)[0]
        base_desc = f"A ({old.stage})"
    else:
        base_nats = args.baseline_score * ratio if args.baseline_metric == "bpb" else args.baseline_score
        res = one_sample_improvement(base_nats, new.loss, args.threshold)
        diff_bpb = mean_std(new.bpb)[0] - (args.baseline_score if args.baseline_metric == "bpb" else base_nats / ratio)
        base_desc = f"score {args.baseline_score} {args.baseline_metric}" + \
            (f" (= {base_nats:.8f} nats at {ratio:.6f} nats/bpb)" if args.baseline_metric == "bpb" else "")
    diff_nats = -res["diff"]
    significant = not math.isnan(res["p"]) and res["p"] < args.alpha
    summary = {"stage_new": new.stage, "stage_old": old.stage if old else None, "baseline": base_desc,
               "n_new": len(new.loss), "n_old": len(old.loss) if old else 0,
               "new_mean_nats": mean_std(new.loss)[0], "new_std_nats": mean_std(new.loss)[1],
               "new_mean_bpb": mean_std(new.bpb)[0], "new_std_bpb": mean_std(new.bpb)[1],
               "diff_nats": diff_nats, "diff_bpb": diff_bpb, "threshold_nats": args.threshold,
               "test": res["test"], "t": res["t"], "df": res["df"], "p": res["p"], "alpha": args.alpha,
               "significant": significant}
    if old is not None:
        summary.update(old_mean_nats=mean_std(old.loss)[0], old_std_nats=mean_std(old.loss)[1],
                       old_mean_bpb=mean_std(old.bpb)[0], old_std_bpb=mean_std(old.bpb)[1])
    if args.json:
        print(json.dumps(summary, indent=1, default=lambda x: None))
        return 0
    for g in ([old] if old else []) + [new]:
        for w in g.warnings:
            print(f"warning: {w}")
        print("\n".join(g.stage_table()))
        print()
    print(f"new = {new.label} ({new.stage}, {new.compliance}) vs baseline = {base_desc}")
    print(f"  difference new - baseline: {diff_nats:+.6f} nats, {diff_bpb:+.6f} bpb (negative: new is better)")
    h1 = "mean(A) - mean(B)" if old else "baseline - mean(new)"
    print(f"  {res['test']} t-test, one-sided, H1: {h1} > {args.threshold:g} nats: t = {res['t']:.4f}, "
          f"df = {res['df']:.2f}, p = {fmt_p(res['p'])}" + (f"  ({res['why']})" if res.get("why") else ""))
    if math.isnan(res["p"]):
        print("  verdict: cannot test (too few runs)")
    elif significant:
        print(f"  verdict: beats the baseline by >= {args.threshold:g} nats at p < {args.alpha:g}")
    else:
        print(f"  verdict: NOT shown to beat the baseline by >= {args.threshold:g} nats at p < {args.alpha:g}")
    if "non-causal" in new.compliance:
        print("  warning: the new configuration's score stage is labelled non-causal (not a valid submission score)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
