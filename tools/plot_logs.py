"""Plot one or more runs to a PNG: training loss against training time, and val bpb per evaluation stage.

Takes run logs (logs/<RUN_ID>.txt) and/or summaries (logs/<RUN_ID>.json); a log's summary next to it (and a
summary's log) is picked up too. Left panel: train loss (the `step:` lines) against train time, with the plain
validation points (`val_loss` at VAL_LOSS_EVERY) as markers. Right panel: val bpb of every stage (the JSON's
stages, or the log's `stage:` lines), one bar per run, non-causal stages hatched.

    python tools/plot_logs.py logs/cpu_main_s*.txt --out runs.png
    python tools/plot_logs.py logs/a.json logs/b.json --labels baseline "causal SLOT" --out cmp.png --title "SLOT"
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from _cli import Parser
from check_record import split_runs

STEP_RE = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:(\d+(?:\.\d+)?)ms")
VAL_RE = re.compile(r"^step:(\d+)/(\d+) val_loss:(\S+) val_bpb:(\S+) train_time:(\d+(?:\.\d+)?)ms")
STAGE_RE = re.compile(r"^stage:(\S+) val_loss:(\S+) val_bpb:(\S+) eval_time:(\d+)ms compliance:(\S+)")
RUN_ID_RE = re.compile(r"^logs/run_id:(\S+)")
POST_EMA_RE = re.compile(r"^DIAGNOSTIC post_ema val_loss:(\S+) val_bpb:(\S+) eval_time:(\d+)ms")


class PlotError(Exception):
    pass


def parse_log(text: str) -> dict:
    """The numbers of a run log. Lines of the source-code preamble never match (they hold `{...}` fields)."""
    run = {"train": [], "val": [], "stages": {}, "run_id": None}
    for line in text.splitlines():
        if m := STEP_RE.match(line):
            run["train"].append((int(m[1]), float(m[4]) / 1000, float(m[3])))
        elif m := VAL_RE.match(line):
            run["val"].append((int(m[1]), float(m[5]) / 1000, float(m[3]), float(m[4])))
        elif m := STAGE_RE.match(line):
            run["stages"][m[1]] = {"val_loss": float(m[2]), "val_bpb": float(m[3]), "seconds": int(m[4]) / 1000,
                                   "compliance": m[5]}
        elif m := POST_EMA_RE.match(line):
            run["stages"]["post_ema"] = {"val_loss": float(m[1]), "val_bpb": float(m[2]), "seconds": int(m[3]) / 1000,
                                         "compliance": "causal"}
        elif (m := RUN_ID_RE.match(line)) and run["run_id"] is None:
            run["run_id"] = m[1]
    return run


def load_run(path: Path) -> dict:
    """Merge a log and its JSON summary (either may be the one given; the other is optional)."""
    path = Path(path)
    if not path.is_file():
        raise PlotError(f"{path}: no such file")
    txt = path if path.suffix != ".json" else path.with_suffix(".txt")
    js = path if path.suffix == ".json" else path.with_suffix(".json")
    run = {"train": [], "val": [], "stages": {}, "run_id": None}
    if txt.is_file():
        runs = split_runs(txt.read_text(encoding="utf-8", errors="replace"))
        if len(runs) > 1:  # the summary next to it is the last run's
            print(f"warning: {txt} holds {len(runs)} runs (an older train_gpt.py appended reruns of the same RUN_ID "
                  "to one log): plotting the last", file=sys.stderr)
        run = parse_log(runs[-1])
    if js.is_file():
        try:
            s = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise PlotError(f"{js}: not a readable JSON summary ({type(e).__name__})") from None
        if not isinstance(s, dict):
            raise PlotError(f"{js}: not a run summary")
        run["stages"] = s.get("stages") or run["stages"]
        run["run_id"] = s.get("run_id") or run["run_id"]
        run["summary"] = s
    run["label"] = run["run_id"] or path.stem
    if not run["train"] and not run["stages"]:
        raise PlotError(f"{path}: no training steps and no stages found (is it a run log or summary?)")
    return run


def plot(runs: list[dict], out: Path, title: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1.15, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(runs):
        c = colors[i % len(colors)]
        if r["train"]:
            t = [p[1] for p in r["train"]]
            y = [p[2] for p in r["train"]]
            steps = max([p[0] for p in r["train"]] + [p[0] for p in r["val"]])  # the stop step has a val line
            ax1.plot(t, y, color=c, lw=1.4, label=f"{r['label']} ({steps} steps)")
        if r["val"]:
            ax1.plot([p[1] for p in r["val"]], [p[2] for p in r["val"]], "o", color=c, ms=6, mec="black",
                     mew=0.6)
    ax1.set_xlabel("training time (s)")
    ax1.set_ylabel("train loss (nats per token)")
    ax1.set_title("Training loss")
    ax1.grid(alpha=0.3)
    if any(r["train"] for r in runs):
        handles, labels = ax1.get_legend_handles_labels()
        if any(r["val"] for r in runs):
            from matplotlib.lines import Line2D
            handles.append(Line2D([], [], ls="", marker="o", ms=6, color="gray", mec="black", mew=0.6))
            labels.append("val_loss (plain eval during training)")
        ax1.legend(handles, labels, fontsize=8, loc="upper right")
    else:
        ax1.text(0.5, 0.5, "no training steps in these runs", ha="center", va="center", transform=ax1.transAxes)

    stages = []
    for r in runs:
        stages += [k for k in r["stages"] if k not in stages]
    if stages:
        n = len(runs)
        off = 0.25 / max(n - 1, 1)
        for i, r in enumerate(runs):
            c = colors[i % len(colors)]
            pts = [(j + (i - (n - 1) / 2) * off, r["stages"][k]) for j, k in enumerate(stages)
                   if k in r["stages"] and math.isfinite(r["stages"][k].get("val_bpb", math.nan))]
            ax2.plot([x for x, _ in pts], [s["val_bpb"] for _, s in pts], "-", color=c, lw=1, alpha=0.6)
            for x, s in pts:
                nc = s.get("compliance") == "non-causal"
                ax2.plot(x, s["val_bpb"], "o", ms=8, color=c, mfc="white" if nc else c, mew=1.8,
                         label=r["label"] if (x, s) == pts[0] else None)
                if n <= 2:  # more runs: values would collide; read them from the JSON or tools/stats.py
                    ax2.annotate(f"{s['val_bpb']:.4f}", (x, s["val_bpb"]), textcoords="offset points",
                                 xytext=(0, (9, -9)[i]), va=("bottom", "top")[i], ha="center",
                                 fontsize=7, color=c)
        vals = [s["val_bpb"] for r in runs for s in r["stages"].values() if math.isfinite(s.get("val_bpb", math.nan))]
        lo, hi = min(vals), max(vals)
        pad = max(hi - lo, 1e-3)
        ax2.set_ylim(lo - 0.1 * pad, hi + 0.25 * pad)
        ax2.set_xlim(-0.5, len(stages) - 0.5)
        ax2.set_xticks(range(len(stages)))
        ax2.set_xticklabels(stages, rotation=20, ha="right")
        from matplotlib.lines import Line2D
        handles, labels = ax2.get_legend_handles_labels()
        if any(s.get("compliance") == "non-causal" for r in runs for s in r["stages"].values()):
            handles.append(Line2D([], [], ls="", marker="o", ms=8, color="gray", mfc="white", mew=1.8))
            labels.append("hollow: non-causal stage (not a valid score)")
        ax2.legend(handles, labels, fontsize=8, loc="upper right")
    else:
        ax2.text(0.5, 0.5, "no evaluation stages in these runs", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("evaluation stage")
    ax2.set_ylabel("val bpb (bits per byte, lower is better)")
    ax2.set_title("Validation bits per byte by stage")
    ax2.grid(axis="y", alpha=0.3)
    names = ", ".join(r["label"] for r in runs)
    fig.suptitle(title or (f"{len(runs)} runs: " if len(runs) > 1 else "Run ") + (names if len(names) < 110 else
                                                                                 names[:107] + "..."), fontsize=13)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


def main(argv=None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run logs (.txt) and/or summaries (.json)")
    ap.add_argument("--out", default="runs.png", help="PNG to write (default runs.png)")
    ap.add_argument("--labels", nargs="+", help="one legend label per run (default: run ids)")
    ap.add_argument("--title", help="figure title")
    args = ap.parse_args(argv)
    try:
        seen, runs = set(), []
        for p in args.runs:
            key = Path(p).with_suffix("").resolve()
            if key in seen:  # x.txt and x.json are one run
                continue
            seen.add(key)
            runs.append(load_run(Path(p)))
        if args.labels:
            if len(args.labels) != len(runs):
                raise PlotError(f"--labels: {len(args.labels)} labels for {len(runs)} runs")
            for r, lab in zip(runs, args.labels):
                r["label"] = lab
        plot(runs, Path(args.out), args.title)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
