"""Audit a records folder against the competition's rules, the way the organisers check a submission.

Works on our folders (made by tools/make_record.py) and on the competition's own (README.md, submission.json,
train_gpt.py and train*.log stdout captures, e.g. records/track_10min_16mb/<date>_<name>/ of the public
repository). Every number comes from the train logs themselves; submission.json is checked against them. Prints
one line per rule: PASS, FAIL or n/a (not applicable or not decidable from the folder), and the number behind it.

    python3 tools/check_record.py records/cpu_demo/2026-12-02_CPU_Demo_CausalSLOT
    python3 tools/check_record.py path/to/record --baseline-bpb 1.1194        # the significance rule too
    python3 tools/check_record.py path/to/new_record --against path/to/current_record --json audit.json

Rules: files present; artifact (code + model) <= 16,000,000 bytes on every seed; the shipped train_gpt.py is the
code that ran (its size is every log's `Code size`, and its sha256 the `code:` line of ours); a packed wrapper
ships its readable source and executes exactly that source, minified; training <= 600 s on every seed (the wall
clock may overrun by the one step in flight when it stopped); evaluation <= 600 s on every seed (the sum of every
evaluation after the artifact is written, or our `eval_seconds`); the score stage scores every token once,
score-first (our `causal` label; a competition record's declared compliance flags); at least 3 seeds; runs on
CUDA (ours); submission.json agrees with the logs; and, given a baseline, the significance rule (>= 0.005 nats
better at p < 0.01, one-sided Welch or one-sample t-test on the per-seed val_loss).
Record-track rules (3 seeds, causal score, CUDA, significance) are n/a on other tracks when they miss, the time
limits on track_non_record_16mb. Exit status: 0 every rule
passes (or is n/a), 1 a rule fails, 2 bad input.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from _cli import Parser

LIMIT_BYTES = 16_000_000
TRAIN_LIMIT_S = 600.0
TRAIN_GRACE_S = 1.0  # the cap is checked between steps: the step in flight ends after it (#549 logged 600.128 s)
EVAL_LIMIT_S = 600.0
MIN_SEEDS = 3
THRESHOLD_NATS = 0.005
ALPHA = 0.01
RECORD_TRACKS = ("track_10min_16mb", "10min_16mb")

NUM = r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|nan|inf)"
RUN_START_RE = re.compile(r"^logs/run_id:(\S+)", re.M)
CODE_LINE_RE = re.compile(r"^code:(\S+) bytes:(\d+) sha256:([0-9a-f]{64}) packed:([01])", re.M)
CODE_SIZE_RE = re.compile(r"^Code size( \([^)]*\))?: (\d+) bytes", re.M)  # some records log "(compressed)"
TOTAL_RE = re.compile(r"^Total submission size[^:]*: (\d+) bytes", re.M)
TRAIN_TIME_RE = re.compile(r"train_time:\s*(\d+(?:\.\d+)?)(ms|m|s)\b")
SEED_RE = re.compile(r"^\s*seed:\s*(\d+)\s*$", re.M)
RUNTIME_RE = re.compile(r"^python:(\S+) torch:(\S+) device:(\S+) world_size:(\d+).*?(?: cuda:(\S+))?$", re.M)
STAGE_RE = re.compile(rf"^stage:(\S+) val_loss:{NUM} val_bpb:{NUM} eval_time:(\d+)ms compliance:(\S+)", re.M)
EXACT_RE = re.compile(rf"^(\w+)_exact val_loss:{NUM} val_bpb:{NUM}", re.M)
FINAL_RE = re.compile(r"^final stage:(\S+) val_bpb:\S+ compliance:(\S+) eval_seconds:(\d+(?:\.\d+)?)", re.M)
# A competition log's evaluation lines: `<name> val_loss:X val_bpb:Y [...] eval_time:Nms` (the `_exact` twins
# carry no time), e.g. final_int6_sliding_window, legal_ttt, quantized_ttt.
COMP_EVAL_RE = re.compile(rf"^([A-Za-z][\w.-]*) val_loss:\s*{NUM} val_bpb:\s*{NUM}.*?eval_time:\s*(\d+(?:\.\d+)?)ms",
                          re.M)
COMP_SCORE_RE = re.compile(rf"^([A-Za-z][\w.-]*) val_loss:\s*{NUM} val_bpb:\s*{NUM}", re.M)


class AuditError(Exception):
    """Bad input (no such folder): one line, exit status 2."""


def split_runs(text: str) -> list[str]:
    """The runs in one log file. train_gpt.py used to append a rerun with the same RUN_ID to the same log; each
    run starts with its `logs/run_id:` line. Logs without that line (stdout captures) are one run."""
    starts = [m.start() for m in RUN_START_RE.finditer(text)]
    if len(starts) <= 1:
        return [text]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def embedded_source(run_text: str) -> str | None:
    """The source a run of ours logs right after its first line, up to the `python:X torch:Y` line (for a packed
    wrapper: the minified source it executed). None for logs without it (stdout captures)."""
    first, _, rest = run_text.partition("\n")
    m = re.search(r"\npython:\d", rest)
    if not first.startswith("logs/run_id:") or not m:
        return None
    return rest[: m.start()]


def _ms(value: str, unit: str) -> float:
    return float(value) * {"ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


@dataclass
class LogFacts:
    """What one train log says about its run (the last run of a file that holds several)."""
    path: Path
    ours: bool
    runs_in_file: int = 1
    seed: int | None = None
    code_bytes: int | None = None
    code_label: str = ""
    code_sha: str | None = None
    code_file_bytes: int | None = None  # the `code:` line's size of the file that ran
    packed: bool | None = None
    source: str | None = None
    total_bytes: int | None = None
    train_s: float | None = None
    eval_s: float | None = None
    eval_parts: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)  # name -> {val_loss, val_bpb, compliance}
    final_stage: str | None = None
    device: str | None = None
    world_size: int | None = None
    python: str | None = None
    torch: str | None = None
    cuda: str | None = None

    def score(self, stage: str | None) -> tuple[str, dict] | None:
        """(stage, {val_loss, val_bpb, compliance}) of the given stage, or of the log's last scored stage."""
        if stage is not None:
            return (stage, self.stages[stage]) if stage in self.stages else None
        if self.ours and self.final_stage in self.stages:
            return self.final_stage, self.stages[self.final_stage]
        return (list(self.stages)[-1], self.stages[list(self.stages)[-1]]) if self.stages else None


def parse_train_log(path: Path, text: str | None = None) -> LogFacts:
    text = path.read_text(encoding="utf-8", errors="replace") if text is None else text
    runs = split_runs(text)
    t = runs[-1]
    ours = bool(RUN_START_RE.match(t))
    f = LogFacts(path=Path(path), ours=ours, runs_in_file=len(runs))
    if ours:
        f.source = embedded_source(t)
        body = t[len(t.partition("\n")[0]) + 1 + len(f.source or ""):]  # never match a line of the source
    else:
        body = t
    if m := SEED_RE.search(body):
        f.seed = int(m[1])
    elif m := re.search(r"seed[_-]?(\d+)", path.name):
        f.seed = int(m[1])
    if m := CODE_LINE_RE.search(body):
        f.code_file_bytes, f.code_sha, f.packed = int(m[2]), m[3], m[4] == "1"
    if ms := CODE_SIZE_RE.findall(body):
        f.code_label, f.code_bytes = ms[-1][0], int(ms[-1][1])
    totals = list(TOTAL_RE.finditer(body))
    if totals:
        f.total_bytes = int(totals[-1][1])
    times = [_ms(v, u) for v, u in TRAIN_TIME_RE.findall(body)]
    if times:
        f.train_s = max(times) / 1000
    if m := RUNTIME_RE.search(body):
        f.python, f.torch, f.device, f.world_size = m[1], m[2], m[3], int(m[4])
        f.cuda = None if m[5] in (None, "None") else m[5]
    elif m := re.search(r"^pytorch[_ ]version:\s*(\S+)", body, re.M | re.I):
        f.torch = m[1]
    if ours:
        for m in STAGE_RE.finditer(body):
            f.stages[m[1]] = {"val_loss": float(m[2]), "val_bpb": float(m[3]), "compliance": m[5],
                              "eval_ms": int(m[4])}
        for m in EXACT_RE.finditer(body):  # 8 decimals where the stage has them
            if m[1] in f.stages:
                f.stages[m[1]].update(val_loss=float(m[2]), val_bpb=float(m[3]))
        if m := FINAL_RE.search(body):
            f.final_stage, f.eval_s = m[1], float(m[3])
    else:
        after = body[totals[-1].end():] if totals else body
        for m in COMP_EVAL_RE.finditer(after):
            f.eval_parts[m[1]] = f.eval_parts.get(m[1], 0.0) + float(m[4]) / 1000
        if f.eval_parts:
            f.eval_s = sum(f.eval_parts.values())
        for m in COMP_SCORE_RE.finditer(after):
            name = m[1][: -len("_exact")] if m[1].endswith("_exact") else m[1]
            if m[1] == "final_int8_zlib_roundtrip_exact" and "final_int6_sliding_window" in f.stages:
                continue  # the baseline-compatible twin of the sliding score, not an evaluation of its own
            f.stages.pop(name, None)  # re-insert: the order of the last line of each name decides the score
            f.stages[name] = {"val_loss": float(m[2]), "val_bpb": float(m[3]), "compliance": None}
    return f


# ---- the folder
@dataclass
class Rule:
    name: str
    ok: bool | None  # None: n/a
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'n/a ' if self.ok is None else 'FAIL'}  {self.name:<23} {self.detail}"


@dataclass
class Record:
    folder: Path
    track: str
    submission: dict
    logs: list[LogFacts]
    code: bytes | None
    source: bytes | None  # train_gpt_source.py, when shipped

    @property
    def record_track(self) -> bool:
        return self.track in RECORD_TRACKS

    @property
    def time_limited(self) -> bool:
        return "non_record" not in self.track

    @property
    def score_stage(self) -> str | None:
        s = self.submission.get("score_stage")
        return s if isinstance(s, str) else None


def train_logs(folder: Path) -> list[Path]:
    """Train logs: train*.log (the competition's names; ours are train_seed<S>.log); eval*.log are other
    evaluations of the same artifacts, never the score."""
    return sorted(p for p in folder.glob("*.log") if p.name.startswith("train"))


def load_record(folder: Path) -> Record:
    folder = Path(folder)
    if not folder.is_dir():
        raise AuditError(f"{folder}: no such folder (give a records/<track>/<date>_<name>/ folder)")
    sub = {}
    sp = folder / "submission.json"
    if sp.is_file():
        try:
            sub = json.loads(sp.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            sub = {"_unreadable": True}
        if not isinstance(sub, dict):
            sub = {"_unreadable": True}
    track = str(sub.get("track") or folder.parent.name)
    code = (folder / "train_gpt.py").read_bytes() if (folder / "train_gpt.py").is_file() else None
    src = (folder / "train_gpt_source.py").read_bytes() if (folder / "train_gpt_source.py").is_file() else None
    return Record(folder, track, sub, [parse_train_log(p) for p in train_logs(folder)], code, src)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _seeds(rec: Record) -> list:
    return [f.seed if f.seed is not None else f.path.name for f in rec.logs]


def _per_seed(rec: Record, fn) -> str:
    return ", ".join(f"{s}: {fn(f)}" for s, f in zip(_seeds(rec), rec.logs))


def _tol(x) -> float:
    """Half a unit of the last decimal written (a score rounded to 4 decimals agrees to 5e-5)."""
    s = repr(float(x))
    d = len(s.split(".")[1]) if "." in s and "e" not in s else 12
    return max(0.5 * 10 ** -d, 1e-9)


def rule_files(rec: Record) -> Rule:
    missing = [n for n in ("README.md", "submission.json", "train_gpt.py") if not (rec.folder / n).is_file()]
    if rec.submission.get("_unreadable"):
        missing.append("a readable submission.json")
    if not rec.logs:
        missing.append("train logs (train*.log)")
    appended = [f.path.name for f in rec.logs if f.runs_in_file > 1]
    have = f"README.md, submission.json, train_gpt.py ({len(rec.code or b''):,} bytes), {len(rec.logs)} train log(s)"
    if missing:
        return Rule("files", False, "missing: " + ", ".join(missing))
    extra = f"; {', '.join(appended)} hold(s) several runs (an older train_gpt.py appended reruns): the last is " \
            "audited" if appended else ""
    return Rule("files", True, have + extra)


def rule_artifact(rec: Record) -> Rule:
    if not rec.logs or any(f.total_bytes is None for f in rec.logs):
        return Rule("artifact_under_16mb", False if rec.logs else None,
                    "a log has no `Total submission size ...: N bytes` line" if rec.logs else "no logs")
    worst = max(rec.logs, key=lambda f: f.total_bytes)
    return Rule("artifact_under_16mb", worst.total_bytes <= LIMIT_BYTES,
                f"max {worst.total_bytes:,} bytes (seed {worst.seed}), limit {LIMIT_BYTES:,}; "
                + _per_seed(rec, lambda f: f"{f.total_bytes:,}"))


def rule_code(rec: Record) -> Rule:
    """The shipped train_gpt.py is the file that ran: its size is each log's `Code size`, its hash our `code:`
    line; for our older logs without that line, the source each log embeds is the file."""
    if rec.code is None or not rec.logs:
        return Rule("code_is_what_ran", None, "no train_gpt.py or no logs")
    n, sha = len(rec.code), _sha(rec.code)
    for f in rec.logs:
        if f.code_bytes is None:
            return Rule("code_is_what_ran", False, f"{f.path.name} has no `Code size: N bytes` line")
        if f.code_bytes != n:
            shipped = f" (with the shipped file the artifact is {f.total_bytes - f.code_bytes + n:,} bytes)" \
                if f.total_bytes else ""
            return Rule("code_is_what_ran", False, f"train_gpt.py is {n:,} bytes but {f.path.name} counted "
                        f"{f.code_bytes:,} bytes of code (`Code size{f.code_label}`){shipped}")
        if f.code_sha is not None and (f.code_sha != sha or f.code_file_bytes != f.code_bytes):
            return Rule("code_is_what_ran", False, f"train_gpt.py (sha256 {sha[:12]}) is not the file that made "
                        f"{f.path.name} (sha256 {f.code_sha[:12]})")
        if f.code_sha is None and f.ours and f.source is not None and f.source.encode("utf-8") != rec.code:
            return Rule("code_is_what_ran", False, f"{f.path.name} embeds another source than train_gpt.py")
    how = "sha256 = every log's `code:` line" if all(f.code_sha for f in rec.logs) else \
        "= the source every log embeds" if all(f.ours and f.source is not None for f in rec.logs) else \
        "size only (the logs hold no hash)"
    return Rule("code_is_what_ran", True, f"{n:,} bytes = every log's `Code size`; {how}")


def rule_source(rec: Record) -> Rule:
    """A packed wrapper (tools/pack_code.py) ships its readable source, which it executes minified."""
    try:
        import pack_code
    except ImportError:
        return Rule("readable_source", None, "tools/pack_code.py not importable")
    got = pack_code.unpack(rec.code) if rec.code else None
    if got is None:
        other = rec.code is not None and b"exec(" in rec.code[:400] and b"decompress" in rec.code[:400]
        return Rule("readable_source", None, "a compressed wrapper of another packer: its source is not checked"
                    if other else "train_gpt.py is the readable source itself (not packed)")
    _, executed = got
    for f in rec.logs:
        if f.ours and f.source is not None and f.source.encode("utf-8") != executed:
            return Rule("readable_source", False, f"the wrapper does not execute the source {f.path.name} logs")
    if rec.source is None:
        return Rule("readable_source", False, "train_gpt.py is a packed wrapper but train_gpt_source.py is missing")
    try:
        mini = pack_code.minify(rec.source.decode("utf-8")).encode("utf-8")
    except (pack_code.PackError, UnicodeDecodeError) as e:
        return Rule("readable_source", None, f"cannot minify train_gpt_source.py here ({e})")
    if mini != executed:
        return Rule("readable_source", False, "train_gpt_source.py minifies to another source than the wrapper "
                    "executes (another python-minifier version, or another source)")
    return Rule("readable_source", True, f"train_gpt_source.py ({len(rec.source):,} bytes) minifies to exactly the "
                f"{len(executed):,} bytes the wrapper executes")


def rule_train(rec: Record) -> Rule:
    if not rec.logs or any(f.train_s is None for f in rec.logs):
        return Rule("train_under_600s", False if rec.logs else None, "a log has no train_time" if rec.logs else "")
    bad = [f for f in rec.logs if f.train_s > TRAIN_LIMIT_S + TRAIN_GRACE_S]
    worst = max(rec.logs, key=lambda f: f.train_s)
    return Rule("train_under_600s", not bad if (rec.time_limited or not bad) else None, f"max {worst.train_s:.1f} s (seed {worst.seed}), limit "
                f"{TRAIN_LIMIT_S:.0f} s (+{TRAIN_GRACE_S:g} s: the step in flight at the cap); " + _per_seed(rec, lambda f: f"{f.train_s:.1f}"))


def rule_eval(rec: Record) -> Rule:
    if not rec.logs or any(f.eval_s is None for f in rec.logs):
        return Rule("eval_under_600s", False if rec.logs else None,
                    "a log has no evaluation time after the artifact" if rec.logs else "")
    worst = max(rec.logs, key=lambda f: f.eval_s)
    what = "our eval_seconds: every pass after the artifact" if worst.ours else \
        "sum of " + " + ".join(f"{k} {v:.1f}" for k, v in worst.eval_parts.items())
    ok = all(f.eval_s <= EVAL_LIMIT_S for f in rec.logs)
    return Rule("eval_under_600s", ok if (rec.time_limited or ok) else None,
                f"max {worst.eval_s:.1f} s (seed {worst.seed}: {what}), limit {EVAL_LIMIT_S:.0f} s; "
                + _per_seed(rec, lambda f: f"{f.eval_s:.1f}"))


def rule_causal(rec: Record) -> Rule:
    """Every scored token once, scored before any update that uses it: our stage label `causal` (C1-C4), or
    the flags a competition record declares."""
    stage = rec.score_stage
    if rec.logs and all(f.ours for f in rec.logs):
        labels = {}
        for f in rec.logs:
            sc = f.score(stage)
            if sc is None:
                return Rule("score_first_once", False, f"{f.path.name} has no stage {stage!r}")
            labels[f.seed] = (sc[0], sc[1]["compliance"])
        names = {v for v in labels.values()}
        ok = all(c == "causal" for _, c in names)
        detail = "score stage " + ", ".join(f"`{s}` labelled {c}" for s, c in sorted(names))
        if ok:
            return Rule("score_first_once", True, detail + " (causal: C1-C4, every token scored once, score-first)")
        return Rule("score_first_once", False if rec.record_track else None,
                    detail + ("" if rec.record_track else " (allowed off the record track, with a warning)"))
    comp = rec.submission.get("compliance")
    if not isinstance(comp, dict):
        return Rule("score_first_once", None, "not decidable from the logs; submission.json declares no compliance")
    flags = {k: v for k, v in comp.items() if isinstance(v, bool)}
    bad = [k for k, v in flags.items() if not v]
    return Rule("score_first_once", not bad if flags else None,
                "declared in submission.json: " + (", ".join(f"{k}={v}" for k, v in flags.items()) or "nothing"))


def rule_seeds(rec: Record) -> Rule:
    seeds = [f.seed for f in rec.logs]
    distinct = sorted({s for s in seeds if s is not None})
    detail = f"{len(distinct)} distinct seed(s): {', '.join(map(str, distinct)) or 'none'}" + \
        (f" (repeated: {len(seeds) - len(distinct)} log(s))" if len(distinct) != len(seeds) else "")
    ok = len(distinct) >= MIN_SEEDS
    return Rule("three_seeds", ok if (rec.record_track or ok) else None, detail)


def rule_hardware(rec: Record) -> Rule:
    ours = [f for f in rec.logs if f.ours and f.device]
    if not ours:
        return Rule("cuda", None, "the logs do not say (competition format)")
    devs = sorted({f"{f.device} x{f.world_size}" for f in ours})
    ok = all(str(f.device).startswith("cuda") for f in ours)
    return Rule("cuda", ok if (rec.record_track or ok) else None, ", ".join(devs) + ("" if ok or rec.record_track
                else " (a CPU demonstration: allowed off the record track)"))


def rule_submission(rec: Record) -> Rule:
    """submission.json agrees with the logs: val_bpb is the mean of the logged scores, bytes_total their max,
    bytes_code the logged code size, and every per-seed result its log's."""
    sub = rec.submission
    if not sub or sub.get("_unreadable") or not rec.logs:
        return Rule("submission_matches_logs", False if rec.logs else None, "no readable submission.json")
    scores = []
    for f in rec.logs:
        sc = f.score(rec.score_stage)
        if sc is None:
            return Rule("submission_matches_logs", False, f"{f.path.name} has no score")
        scores.append(sc[1])
    probs = []
    mean_bpb = sum(s["val_bpb"] for s in scores) / len(scores)
    if not isinstance(sub.get("val_bpb"), (int, float)):
        probs.append("no val_bpb")
    elif abs(sub["val_bpb"] - mean_bpb) > _tol(sub["val_bpb"]) + 1e-8:
        probs.append(f"val_bpb {sub['val_bpb']} but the logs' mean is {mean_bpb:.8f}")
    if isinstance(sub.get("val_loss"), (int, float)):
        mean_loss = sum(s["val_loss"] for s in scores) / len(scores)
        if abs(sub["val_loss"] - mean_loss) > _tol(sub["val_loss"]) + 1e-8:
            probs.append(f"val_loss {sub['val_loss']} but the logs' mean is {mean_loss:.8f}")
    totals = [f.total_bytes for f in rec.logs if f.total_bytes is not None]
    if isinstance(sub.get("bytes_total"), int) and totals and sub["bytes_total"] != max(totals):
        probs.append(f"bytes_total {sub['bytes_total']:,} but the largest logged artifact is {max(totals):,}")
    codes = {f.code_bytes for f in rec.logs}
    if isinstance(sub.get("bytes_code"), int) and codes != {sub["bytes_code"]}:
        probs.append(f"bytes_code {sub['bytes_code']:,} but the logs count {', '.join(map(str, sorted(codes, key=str)))}")
    per = sub.get("seed_results") if isinstance(sub.get("seed_results"), dict) else {}
    by_seed = {str(f.seed): (f, sc) for f, sc in zip(rec.logs, scores)}
    for seed, res in per.items():
        if seed not in by_seed:
            probs.append(f"seed_results has seed {seed}, which no log ran")
            continue
        f, sc = by_seed[seed]
        if isinstance(res, dict) and isinstance(res.get("val_bpb"), (int, float)) and \
                abs(res["val_bpb"] - sc["val_bpb"]) > _tol(res["val_bpb"]) + 1e-8:
            probs.append(f"seed {seed}: val_bpb {res['val_bpb']} but its log scores {sc['val_bpb']:.8f}")
        if isinstance(res, dict) and isinstance(res.get("artifact_bytes"), int) and f.total_bytes is not None and \
                res["artifact_bytes"] != f.total_bytes:
            probs.append(f"seed {seed}: artifact_bytes {res['artifact_bytes']:,} but its log says {f.total_bytes:,}")
    if probs:
        return Rule("submission_matches_logs", False, "; ".join(probs))
    return Rule("submission_matches_logs", True, f"val_bpb {sub['val_bpb']} = mean of {len(scores)} logged scores "
                f"({mean_bpb:.8f}); bytes_total, bytes_code and {len(per)} per-seed result(s) agree")


def seed_losses(rec: Record) -> list[float]:
    return [f.score(rec.score_stage)[1]["val_loss"] for f in rec.logs if f.score(rec.score_stage)]


def rule_significance(rec: Record, baseline_bpb: float | None, against: Record | None) -> Rule:
    if baseline_bpb is None and against is None:
        return Rule("significance", None, "no baseline given (--baseline-bpb or --against)")
    import stats  # noqa: E402  (imports train_gpt's tools; only needed here)
    new = seed_losses(rec)
    if len(new) < 2:
        return Rule("significance", False, "needs >= 2 seeds")
    if against is not None:
        old = seed_losses(against)
        r = stats.welch_improvement(old, new, THRESHOLD_NATS)
        base = f"{against.folder.name} ({len(old)} seeds, mean {sum(old) / len(old):.5f} nats)"
    else:
        ratio = sum(f.score(rec.score_stage)[1]["val_loss"] / f.score(rec.score_stage)[1]["val_bpb"]
                    for f in rec.logs) / len(rec.logs)
        r = stats.one_sample_improvement(baseline_bpb * ratio, new, THRESHOLD_NATS)
        base = f"val_bpb {baseline_bpb} (= {baseline_bpb * ratio:.5f} nats at this record's nats/bpb)"
    ok = not math.isnan(r["p"]) and r["p"] < ALPHA
    return Rule("significance", ok if rec.record_track or ok else None,
                f"{r['diff']:+.5f} nats better than {base}; {r['test']} t-test of > {THRESHOLD_NATS} nats: "
                f"p = {stats.fmt_p(r['p'])} (need < {ALPHA})")


def audit(rec: Record, baseline_bpb: float | None = None, against: Record | None = None) -> list[Rule]:
    return [rule_files(rec), rule_artifact(rec), rule_code(rec), rule_source(rec), rule_train(rec), rule_eval(rec),
            rule_causal(rec), rule_seeds(rec), rule_hardware(rec), rule_submission(rec),
            rule_significance(rec, baseline_bpb, against)]


def main(argv=None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a records/<track>/<date>_<name>/ folder")
    ap.add_argument("--baseline-bpb", type=float, help="the current record's val_bpb, for the significance rule")
    ap.add_argument("--against", help="the current record's folder, for the significance rule (Welch test)")
    ap.add_argument("--json", help="also write the rules to this JSON file")
    args = ap.parse_args(argv)
    try:
        rec = load_record(Path(args.folder))
        against = load_record(Path(args.against)) if args.against else None
    except AuditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rules = audit(rec, args.baseline_bpb, against)
    fmt = "ours" if rec.logs and all(f.ours for f in rec.logs) else "competition"
    print(f"{rec.folder} (track {rec.track}{', a record track' if rec.record_track else ''}; {fmt} log format)")
    for r in rules:
        print(r.line())
    failed = [r.name for r in rules if r.ok is False]
    print("verdict: " + (f"FAIL ({', '.join(failed)})" if failed else "every rule passes or is n/a"))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rules], indent=1) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
