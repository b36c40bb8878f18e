"""Package runs (one per seed) into a records folder: records/<track>/<YYYY-MM-DD>_<Name>/.

Writes README.md (method, per-seed table, every stage, the exact run command, timing, compliance labels),
submission.json, train_gpt.py (the file that made the runs: by default the packed wrapper of tools/pack_code.py,
with its readable source beside it as train_gpt_source.py; --raw-code for runs of the raw file) and each run's
log and summary as train_seed<S>.log / train_seed<S>.json. --evals adds EVAL_ONLY runs of the
same artifacts with other eval settings (e.g. the non-causal SLOT_MODE=batch next to a causal score), grouped by
their settings, as eval<K>_seed<S>.log / .json and one table per group; they are never the score. Everything is
written to a temporary folder that is renamed into place, so a refused or interrupted call leaves nothing behind.

It refuses, with a one-line reason and exit status 1: an artifact over 16,000,000 bytes (code + model) on any
seed; training or evaluation over 600 s on any seed, by the logs' own timings (not on track_non_record_16mb);
an incomplete run (missing summary, log, score stage or summary field); runs with different configs (other than
the seed) or a repeated seed; a run command that sets a variable the frozen train_gpt.py does not read (checked by
importing the frozen copy from the new folder) or that does not rebuild the recorded config; a code file that is
not the one that made the runs (the sha256 each log records at start); runs of the raw file without --raw-code
(their logs count the raw bytes), or of a wrapper with it; --evals runs of other artifacts or made by other code;
on track_10min_16mb fewer than 3 seeds, a score stage labelled non-causal or runs that were not on CUDA; and
anything else the audit of tools/check_record.py fails on the finished folder.

    python tools/make_record.py --runs logs/cpu_s1337.json logs/cpu_s42.json logs/cpu_s2025.json \\
        --name CPU_Demo_CausalSLOT --author "Jane Doe" --github-id janedoe --track cpu_demo \\
        --blurb "The PR #549 stack scaled down for a 2-core CPU, with per-window causal SLOT."
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import check_record as audit
import pack_code
from _cli import Parser
from _common import ROOT, ToolError, expand_paths, load_summary

LIMIT_BYTES = 16_000_000
TRACKS = {
    "track_10min_16mb": "Record track: 10 minutes of training on 8xH100, 16,000,000-byte artifact",
    "track_non_record_16mb": "Non-record submission (16,000,000-byte artifact; not a 10-minute leaderboard claim)",
    "cpu_demo": "CPU demonstration, not a leaderboard claim",
}
REQUIRED = ("run_id", "config", "stages", "device", "world_size", "steps", "train_seconds", "bytes_code",
            "bytes_model", "bytes_total", "eval_seconds", "val_bpb", "val_loss")


class Refused(Exception):
    """The record cannot be made; the message is the one-line reason."""


# ---- reading and checking the runs
def summary_and_log(path: Path) -> tuple[Path, Path]:
    p = Path(path)
    js, log = (p, p.with_suffix(".txt")) if p.suffix == ".json" else (p.with_suffix(".json"), p)
    if not js.is_file():
        raise Refused(f"incomplete: {js} (the run's JSON summary) is missing")
    if not log.is_file() or log.stat().st_size == 0:
        raise Refused(f"incomplete: {log} (the run's log) is missing or empty")
    return js, log


embedded_source = audit.embedded_source


def read_run_log(log: Path) -> tuple[str, "audit.LogFacts"]:
    """(the text of the log's last run, its facts). train_gpt.py used to append a rerun with the same RUN_ID to
    the same log; the summary next to it is the last run's."""
    text = log.read_text(encoding="utf-8", errors="replace")
    runs = audit.split_runs(text)
    return runs[-1], audit.parse_train_log(log, text)


def load_runs(paths, stage: str | None, track: str) -> tuple[list[dict], str]:
    runs = []
    for p in paths:
        js, log = summary_and_log(p)
        try:
            s = load_summary(js)
        except ToolError as e:
            raise Refused(f"incomplete: {e}") from None
        missing = [k for k in REQUIRED if k not in s]
        if missing:
            raise Refused(f"incomplete: {js} lacks {', '.join(missing)} (not a finished run's summary)")
        if s.get("mode") == "eval_only":
            raise Refused(f"{js} is an EVAL_ONLY run: a record packages the training runs")
        text, facts = read_run_log(log)
        runs.append({"json": js, "log": log, "summary": s, "text": text, "facts": facts,
                     "seed": s["config"].get("seed")})
    if not runs:
        raise Refused("no runs given (--runs logs/<RUN_ID>.json ...)")
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise Refused(f"seeds repeat ({', '.join(map(str, seeds))}): one run per seed")
    if stage is None:
        finals = {r["summary"].get("final_compliant_stage") for r in runs}
        if len(finals) != 1:
            raise Refused(f"the runs' final_compliant_stage differ ({', '.join(map(str, finals))}): pass --stage")
        stage = finals.pop()
        if stage is None:
            raise Refused("the runs have no stage labelled causal: pass --stage to package a non-causal score")
    for r in runs:
        s = r["summary"]
        st = s["stages"].get(stage)
        if st is None or not all(isinstance(st.get(k), (int, float)) and math.isfinite(st[k])
                                 for k in ("val_bpb", "val_loss")):
            raise Refused(f"incomplete: {r['json']} has no finished stage {stage!r} "
                          f"(it has {', '.join(s['stages']) or 'none'})")
        if not re.search(rf"^stage:{re.escape(stage)} ", r["text"], re.M):
            raise Refused(f"incomplete: {r['log']} has no 'stage:{stage}' line (truncated log?)")
        if s["bytes_total"] > LIMIT_BYTES or s.get("fits") is False:
            raise Refused(f"seed {r['seed']}: artifact is {s['bytes_total']:,} bytes (code {s['bytes_code']:,} + "
                          f"model {s['bytes_model']:,}) > {LIMIT_BYTES:,}")
        f = r["facts"]
        if "non_record" not in track:
            if f.train_s is not None and f.train_s > audit.TRAIN_LIMIT_S + audit.TRAIN_GRACE_S:
                raise Refused(f"seed {r['seed']}: training took {f.train_s:.1f} s by its log (limit "
                              f"{audit.TRAIN_LIMIT_S:.0f} s; use track_non_record_16mb for longer runs)")
            if f.eval_s is not None and f.eval_s > audit.EVAL_LIMIT_S:
                raise Refused(f"seed {r['seed']}: evaluation took {f.eval_s:.1f} s by its log (limit "
                              f"{audit.EVAL_LIMIT_S:.0f} s; use track_non_record_16mb for longer evaluations)")
        if track == "track_10min_16mb":
            if st.get("compliance") != "causal":
                raise Refused(f"stage {stage!r} is labelled {st.get('compliance')}: not a valid score on "
                              "track_10min_16mb (pick a causal stage with --stage)")
            if not str(s["device"]).startswith("cuda"):
                raise Refused(f"seed {r['seed']} ran on {s['device']}: track_10min_16mb is 8xH100 "
                              "(use --track cpu_demo or track_non_record_16mb)")
    base = {k: v for k, v in runs[0]["summary"]["config"].items() if k not in ("seed", "run_id")}
    for r in runs[1:]:
        c = {k: v for k, v in r["summary"]["config"].items() if k not in ("seed", "run_id")}
        diff = sorted(k for k in set(base) | set(c) if base.get(k) != c.get(k))
        if diff:
            raise Refused(f"seed {r['seed']} differs from seed {runs[0]['seed']} in more than the seed: "
                          f"{', '.join(k.upper() for k in diff)}")
        if (r["summary"]["device"], r["summary"]["world_size"]) != (runs[0]["summary"]["device"],
                                                                    runs[0]["summary"]["world_size"]):
            raise Refused(f"seed {r['seed']} ran on different hardware than seed {runs[0]['seed']}")
    if track == "track_10min_16mb" and len(runs) < audit.MIN_SEEDS:
        raise Refused(f"{len(runs)} seed(s): a track_10min_16mb record needs at least {audit.MIN_SEEDS} (the "
                      "significance rule)")
    return runs, stage


EVAL_KEYS_IGNORED = ("seed", "run_id", "eval_only", "load_artifact")


def load_evals(paths, runs: list[dict], source: str, code_sha: str | None) -> list[dict]:
    """EVAL_ONLY runs of the record's own artifacts with other eval settings (e.g. SLOT_MODE=batch next to a
    causal-SLOT score), each matched to its training run by artifact file name and grouped by the settings that
    differ from the training run. They are reported, never scored."""
    by_art = {Path(r["summary"]["artifact"]).name: r for r in runs}
    groups: dict[tuple, dict] = {}
    for p in paths:
        js, log = summary_and_log(p)
        try:
            s = load_summary(js)
        except ToolError as e:
            raise Refused(f"incomplete: {e}") from None
        if s.get("mode") != "eval_only" or not s.get("stages"):
            raise Refused(f"{js} is not a finished EVAL_ONLY run (--evals takes EVAL_ONLY=1 LOAD_ARTIFACT=... runs "
                          "of the record's artifacts)")
        art = Path(str(s.get("artifact") or "")).name
        r = by_art.get(art)
        if r is None:
            raise Refused(f"{js} evaluated {art or 'no artifact'}, not an artifact of the runs "
                          f"({', '.join(sorted(by_art))})")
        text, facts = read_run_log(log)
        if embedded_source(text) != source or (facts.code_sha and code_sha and facts.code_sha != code_sha):
            raise Refused(f"{log} was evaluated by another train_gpt.py than the one that made the runs")
        train_cfg = r["summary"]["config"]
        diff = {k: v for k, v in sorted(s["config"].items())
                if k not in EVAL_KEYS_IGNORED and train_cfg.get(k) != v}
        key = tuple((k, json.dumps(v)) for k, v in diff.items())
        g = groups.setdefault(key, {"env": {k.upper(): _fmt(v) for k, v in diff.items()}, "runs": []})
        if any(e["seed"] == r["seed"] for e in g["runs"]):
            raise Refused(f"{js}: seed {r['seed']} is evaluated twice with the same settings")
        g["runs"].append({"json": js, "log": log, "summary": s, "seed": r["seed"], "artifact": art})
    return list(groups.values())


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


@dataclasses.dataclass
class Code:
    """What a record ships: `file` as train_gpt.py (the bytes that ran), and for a packed wrapper its readable
    source as train_gpt_source.py."""
    file: bytes
    source: bytes | None
    executed: str  # the source the runs executed (the logged one: minified for a wrapper)
    packed: bool
    provenance: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.file).hexdigest()


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise Refused(f"{what} {path}: cannot read ({e.strerror})") from None


def frozen_code(runs: list[dict], script: str | None, source_path: str | None, raw_code: bool) -> Code:
    """The file that ran, checked against every log: its sha256 (the `code:` line a run logs at start; older
    logs: the embedded source and the bytes_code the artifact size was computed with)."""
    sources = [embedded_source(r["text"]) for r in runs]
    for r, src in zip(runs, sources):
        f = r["facts"]
        if f.code_sha is not None and f.code_file_bytes != r["summary"]["bytes_code"]:
            raise Refused(f"seed {r['seed']}: its log ran a {f.code_file_bytes:,}-byte train_gpt.py but its summary "
                          f"counts bytes_code {r['summary']['bytes_code']:,}: not the log and summary of one run")
        if f.code_sha is None and src is not None and len(src.encode("utf-8")) != r["summary"]["bytes_code"]:
            raise Refused(f"seed {r['seed']}: its log embeds a {len(src.encode('utf-8')):,}-byte train_gpt.py but "
                          f"its summary counts bytes_code {r['summary']['bytes_code']:,} (the file changed during the "
                          "run): rerun it with train_gpt.py left alone")
    if all(s is not None for s in sources) and len(set(sources)) != 1:
        raise Refused("the runs' logs embed different train_gpt.py sources: not one configuration")
    shas = {r["facts"].code_sha for r in runs}
    if len(shas) != 1:
        raise Refused("the runs ran different train_gpt.py files (their logs' `code:` sha256 differ)")
    sha = shas.pop()
    packed = any(r["facts"].packed for r in runs)
    n = runs[0]["summary"]["bytes_code"]
    executed = sources[0]
    if raw_code:
        if packed:
            raise Refused(f"the runs ran a packed wrapper ({n:,} bytes): --raw-code would ship a file they did not "
                          "run (drop --raw-code)")
        if script is None and executed is not None:
            file, prov = executed.encode("utf-8"), "the source embedded in the run logs"
        else:
            script = script or str(ROOT / "train_gpt.py")
            file, prov = _read(script, "--script"), script
        for r, src in zip(runs, sources):
            if src is not None and src.encode("utf-8") != file:
                raise Refused(f"{script} is not the code that made seed {r['seed']} (its log embeds a different "
                              "source): omit --script to freeze the logged source")
            if len(file) != r["summary"]["bytes_code"]:
                raise Refused(f"{script} is {len(file):,} bytes but seed {r['seed']} was made by a "
                              f"{r['summary']['bytes_code']:,}-byte train_gpt.py (pass the right --script)")
        if sha is not None and hashlib.sha256(file).hexdigest() != sha:
            raise Refused(f"{prov} is not the file that made the runs (sha256 differs from their `code:` line)")
        return Code(file, None, file.decode("utf-8"), False, prov)
    if not packed:
        raise Refused(f"the runs ran the raw train_gpt.py ({n:,} bytes, counted in their artifact sizes) and a "
                      "record ships the packed wrapper that ran: pack it (python3 tools/pack_code.py) and rerun the "
                      "seeds with python3 packed/train_gpt.py, or pass --raw-code to ship the raw file")
    source_path = source_path or str(ROOT / "train_gpt.py")
    readable = _read(source_path, "--source")
    try:
        mini = pack_code.minify(readable.decode("utf-8"))
    except (pack_code.PackError, UnicodeDecodeError) as e:
        raise Refused(f"--source {source_path}: {e}") from None
    if executed is not None and mini != executed:
        raise Refused(f"--source {source_path} is not the source the runs executed (it minifies to another text): "
                      "pass --source the readable train_gpt.py they were packed from")
    if script is not None:
        file, prov = _read(script, "--script"), script
    else:
        file, prov = pack_code.pack(readable.decode("utf-8"))[0], f"{source_path}, packed by tools/pack_code.py"
    if hashlib.sha256(file).hexdigest() != sha or len(file) != n:
        raise Refused(f"{prov} is not the wrapper that made the runs (sha256 or size differs from their `code:` "
                      "line): pass --script the wrapper that ran")
    return Code(file, readable, executed if executed is not None else mini, True, prov)


def import_frozen(path: Path):
    name = "frozen_train_gpt_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve their module by name
    keep, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ inside the record
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        sys.modules.pop(name, None)
        raise Refused(f"the frozen train_gpt.py does not import ({type(e).__name__}: {e})") from None
    finally:
        sys.dont_write_bytecode = keep
        shutil.rmtree(path.parent / "__pycache__", ignore_errors=True)
    return mod


# ---- the run command
def auto_preset(device: str) -> str:
    return "competition" if str(device).startswith("cuda") else "cpu"


def command_env(mod, config: dict, device: str) -> dict:
    """Env vars (without SEED) that make the frozen script rebuild `config`: the differences from the preset
    the run used (from the competition defaults, i.e. Config.diff_from_defaults, for the competition preset),
    plus PRESET when the machine would not pick that preset by itself."""
    fields = {f.name: f for f in dataclasses.fields(mod.Config)}
    unknown = sorted(k for k in config if k not in fields)
    if unknown:
        raise Refused(f"the run command needs {', '.join(k.upper() for k in unknown)} (in the runs' config), which "
                      "the frozen train_gpt.py does not read")
    vals = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    cfg = mod.Config(**{k: v for k, v in vals.items() if fields[k].init})
    preset = vals.get("preset", "competition")
    if preset == "competition" or not hasattr(mod, "PRESET_VALUES"):
        env = cfg.diff_from_defaults()
    else:
        base = mod.Config(**mod.PRESET_VALUES[preset], preset=preset)
        env = {f.upper(): mod._format_value(getattr(cfg, f)) for f in fields
               if f not in ("preset", "run_id") and getattr(cfg, f) != getattr(base, f)}
    env.pop("SEED", None)
    if preset != "competition" or preset != auto_preset(device):  # explicit unless it is what a GPU box picks
        env = {"PRESET": preset, **env}
    known = {f.upper() for f in fields}
    bad = sorted(k for k in env if k not in known)
    if bad:
        raise Refused(f"the run command sets {', '.join(bad)}, which the frozen train_gpt.py does not read")
    return env


def check_command(mod, env: dict, seed, config: dict, device: str) -> None:
    """The command's env must rebuild the recorded config exactly under the frozen script."""
    full = {**env, "SEED": str(seed)}
    try:
        cfg = mod.Config.from_env(full, cuda=str(device).startswith("cuda"))
    except Exception as e:
        raise Refused(f"the run command is rejected by the frozen train_gpt.py ({e})") from None
    for k, v in config.items():
        if k == "run_id":
            continue
        want = tuple(v) if isinstance(v, list) else v
        if getattr(cfg, k) != want:
            raise Refused(f"the run command does not rebuild the recorded config: {k.upper()} is {want!r} in the "
                          f"run but {getattr(cfg, k)!r} from the command")


def launcher(device: str, world: int) -> str:
    if str(device).startswith("cuda") or world > 1:
        return f"torchrun --standalone --nproc_per_node={world} train_gpt.py"
    return "python train_gpt.py"


def render_command(env: dict, seed, device: str, world: int) -> str:
    parts = [f"{k}={shlex.quote(v)}" for k, v in {"SEED": str(seed), **env}.items()]
    return " ".join(parts + [launcher(device, world)])


# ---- the files
def mean_std(xs) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def versions(facts: "audit.LogFacts") -> dict:
    if facts.torch is None:
        return {}
    return {"python_version": facts.python, "pytorch_version": facts.torch, "cuda_version": facts.cuda}


def hardware(s: dict, override: str | None) -> str:
    if override:
        return override
    if str(s["device"]).startswith("cuda"):
        return f"{s['world_size']}x CUDA GPU"
    return "CPU" + (f", {s['world_size']} processes" if s["world_size"] > 1 else ", 1 process")


def method_lines(c: dict, s: dict) -> list[str]:
    on = lambda k: bool(c.get(k))
    out = [f"- Model: {c['num_layers']} layers x {c['model_dim']} wide, {c['num_heads']} heads / "
           f"{c['num_kv_heads']} KV heads, MLP {c['mlp_mult']:g}x LeakyReLU(0.5)^2, vocabulary {c['vocab_size']}, "
           f"{'tied' if on('tie_embeddings') else 'untied'} embeddings, {s.get('model_params', 0):,} parameters."]
    feats = []
    if c.get("bigram_vocab_size"):
        feats.append(f"BigramHash {c['bigram_vocab_size']}x{c['bigram_dim']}")
    if c.get("xsa_last_n"):
        feats.append(f"XSA on the last {c['xsa_last_n']} layers")
    feats.append(f"partial RoPE ({c['rope_dims']} dims)")
    if on("ve_enabled"):
        feats.append(f"value embeddings on layers {','.join(map(str, c['ve_layers']))}")
    out.append("- Features: " + ", ".join(feats) + ", U-Net skips, SmearGate.")
    out.append(f"- Training: {s['steps']:,} steps of {c['train_batch_tokens']:,} tokens at sequence length "
               f"{c['train_seq_len']} ({s['train_seconds']:.0f} s, wall-clock cap {c['max_wallclock_seconds']:g} s); "
               f"Parallel Muon (matrix lr {c['matrix_lr']:g}), AdamW for embeddings and scalars"
               + (f", EMA {c['ema_decay']:g}" if on("ema_enabled") else "")
               + (", late QAT" if on("late_qat") else "") + ".")
    out.append(f"- Export: int6 per-row (attention/MLP), int8 embeddings, compressed with "
               f"{s.get('compressor', 'the smallest available compressor')}.")
    ev = f"- Evaluation: sliding windows of {c['eval_seq_len']} at stride {c['eval_stride']}"
    if on("ttt_enabled"):
        ev += (f"; score-first TTT (chunks of {c['ttt_chunk_tokens']:,} tokens, {c['ttt_epochs']} epochs, "
               f"SGD lr {c['ttt_lr']:g})")
    if on("slot_enabled"):
        ev += (f"; SLOT {c['slot_mode']} mode ({c['slot_steps']} AdamW steps, lr {c['slot_lr']:g}"
               + (", not causal" if c["slot_mode"] == "batch" else ", one delta per window on scored context only")
               + ")")
    if c.get("ctw_weight"):
        ev += f"; CTW mixture (weight {c['ctw_weight']:g}, depth {c.get('ctw_depth')})"
    out.append(ev + ".")
    return out


def eval_name(g: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in g["env"].items()) or "same settings"


def eval_file(seed, i: int) -> str:
    return f"eval{i + 1}_seed{seed}"


def build(runs, stage, args, code: Code, mod_env, commands, evals=()) -> tuple[str, dict]:
    s0, c0 = runs[0]["summary"], runs[0]["summary"]["config"]
    bpb = [r["summary"]["stages"][stage]["val_bpb"] for r in runs]
    loss = [r["summary"]["stages"][stage]["val_loss"] for r in runs]
    (mb, sb), (ml, sl) = mean_std(bpb), mean_std(loss)
    comp = s0["stages"][stage].get("compliance", "unknown")
    label = TRACKS[args.track]
    hw = hardware(s0, args.hardware)
    ver = versions(runs[0]["facts"])
    seeds = [r["seed"] for r in runs]
    max_total = max(r["summary"]["bytes_total"] for r in runs)
    train_max = max(r["facts"].train_s if r["facts"].train_s is not None else r["summary"]["train_seconds"]
                    for r in runs)
    eval_max = max(r["facts"].eval_s if r["facts"].eval_s is not None else r["summary"]["eval_seconds"] for r in runs)
    train_ok = train_max <= audit.TRAIN_LIMIT_S + audit.TRAIN_GRACE_S
    eval_ok = eval_max <= audit.EVAL_LIMIT_S
    nc = [k for k, v in s0["stages"].items() if v.get("compliance") == "non-causal"]
    seed_results = {}
    for r in runs:
        s = r["summary"]
        st = s["stages"][stage]
        seed_results[str(r["seed"])] = {
            "val_bpb": st["val_bpb"], "val_loss": st["val_loss"], "artifact_bytes": s["bytes_total"],
            "bytes_model": s["bytes_model"], "steps": s["steps"], "train_seconds": s["train_seconds"],
            "step_avg_ms": 1000 * s["train_seconds"] / max(s["steps"], 1), "eval_seconds": s["eval_seconds"],
            "stages": {k: {"val_bpb": v["val_bpb"], "val_loss": v["val_loss"], "compliance": v.get("compliance")}
                       for k, v in s["stages"].items()},
            "run_id": s["run_id"]}
    sub = {
        "name": args.name, "author": args.author, "github_id": args.github_id, "date": args.date,
        "track": args.track, "track_label": label, "blurb": args.blurb,
        "val_bpb": mb, "val_loss": ml, "val_bpb_std": sb, "val_loss_std": sl, "score_stage": stage,
        "bytes_total": max_total, "bytes_code": s0["bytes_code"], "seeds": seeds, "seed_results": seed_results,
        "compliance": {"score_stage_label": comp, "artifact_under_16mb": max_total <= LIMIT_BYTES,
                       "artifact_bytes_max": max_total, "train_under_600s": train_ok,
                       "train_seconds_max": round(train_max, 3), "eval_under_600s": eval_ok,
                       "eval_seconds_max": round(eval_max, 3),
                       "every_token_scored_once_score_first": comp == "causal",
                       "score_first_ttt": bool(c0.get("ttt_enabled")) and stage.startswith("ttt"),
                       "three_seeds": len(runs) >= 3, "code_is_what_ran": True,
                       "causal_labels": {k: v.get("compliance") for k, v in s0["stages"].items()},
                       "non_causal_stages_reported": nc, "leaderboard_claim": args.track == "track_10min_16mb"},
        "hardware": hw, **ver, "run_command": commands, "train_gpt_sha256": code.sha256,
        "code": {"file": "train_gpt.py", "bytes": len(code.file), "sha256": code.sha256, "packed": code.packed,
                 **({"packer": "tools/pack_code.py (python-minifier, compressed, base85, exec)",
                     "source_file": "train_gpt_source.py", "source_bytes": len(code.source),
                     "source_sha256": hashlib.sha256(code.source).hexdigest()} if code.packed else {})},
    }
    if evals:
        sub["extra_evaluations"] = [{
            "settings": g["env"],
            "stages": {k: {"val_bpb": mean_std([e["summary"]["stages"][k]["val_bpb"] for e in g["runs"]])[0],
                           "val_loss": mean_std([e["summary"]["stages"][k]["val_loss"] for e in g["runs"]])[0],
                           "compliance": v.get("compliance")}
                       for k, v in g["runs"][0]["summary"]["stages"].items()
                       if all(k in e["summary"]["stages"] for e in g["runs"])},
            "seeds": {str(e["seed"]): {"files": eval_file(e["seed"], i), "eval_seconds": e["summary"]["eval_seconds"],
                                       "stages": {k: {"val_bpb": v["val_bpb"], "val_loss": v["val_loss"],
                                                      "compliance": v.get("compliance")}
                                                  for k, v in e["summary"]["stages"].items()}}
                      for e in g["runs"]}} for i, g in enumerate(evals)]
    L = [f"# {args.name.replace('_', ' ')}", "", f"**{label}.**", ""]
    if args.blurb:
        L += [args.blurb, ""]
    L += ["## Result", "",
          f"**val_bpb {mb:.8f}** (std {sb:.8f}), val_loss {ml:.8f} nats (std {sl:.8f}): the mean over {len(runs)} "
          f"seed(s) ({', '.join(map(str, seeds))}) of stage `{stage}`, labelled **{comp}**. Largest artifact: "
          f"{max_total:,} bytes (limit {LIMIT_BYTES:,}). Hardware: {hw}"
          + (f"; PyTorch {ver['pytorch_version']}" if ver else "")
          + (f", CUDA {ver['cuda_version']}" if ver.get("cuda_version") else "") + ".", "",
          "## Per-seed results", "",
          "| seed | val_bpb | val_loss | artifact bytes | steps | step avg (ms) | train (s) | eval (s) |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for seed in seeds:
        x = seed_results[str(seed)]
        L.append(f"| {seed} | {x['val_bpb']:.8f} | {x['val_loss']:.8f} | {x['artifact_bytes']:,} | {x['steps']:,} | "
                 f"{x['step_avg_ms']:.1f} | {x['train_seconds']:.1f} | {x['eval_seconds']:.1f} |")
    L += [f"| **mean** | **{mb:.8f}** | **{ml:.8f}** | | | | | |", "", "## Every stage (mean over seeds)", "",
          "| stage | val_bpb | std | val_loss | seconds | compliance |", "|---|---:|---:|---:|---:|---|"]
    for k, v in s0["stages"].items():
        b, bs = mean_std([r["summary"]["stages"][k]["val_bpb"] for r in runs if k in r["summary"]["stages"]])
        lo, _ = mean_std([r["summary"]["stages"][k]["val_loss"] for r in runs if k in r["summary"]["stages"]])
        secs, _ = mean_std([r["summary"]["stages"][k].get("seconds", 0.0) for r in runs if k in r["summary"]["stages"]])
        mark = " (score)" if k == stage else ""
        L.append(f"| `{k}`{mark} | {b:.6f} | {bs:.6f} | {lo:.6f} | {secs:.1f} | {v.get('compliance', '?')} |")
    for i, g in enumerate(evals):
        ex = sub["extra_evaluations"][i]
        L += ["", f"## Other evaluation {i + 1} of the same artifacts: `{eval_name(g)}`", "",
              f"EVAL_ONLY runs of the artifacts above ({len(g['runs'])} seed(s): "
              f"{', '.join(str(e['seed']) for e in g['runs'])}), reported for comparison, not the score.", "",
              "| stage | val_bpb | val_loss | compliance |", "|---|---:|---:|---|"]
        L += [f"| `{k}` | {v['val_bpb']:.6f} | {v['val_loss']:.6f} | {v['compliance']} |"
              for k, v in ex["stages"].items()]
        launch = launcher(s0["device"], s0["world_size"])
        L += ["", "```bash"] + [" ".join(["EVAL_ONLY=1", f"LOAD_ARTIFACT=logs/{e['artifact']}"]
                                          + [f"{k}={shlex.quote(v)}" for k, v in g["env"].items()] + [launch])
                                 for e in g["runs"]] + ["```"]
    L += ["", "## Method", ""] + method_lines(c0, s0) + ["", "## Run command", "",
          ("From the repository root, with this folder's `train_gpt.py` in place of the root one (the packed "
           "wrapper that made the runs: it executes `train_gpt_source.py`, minified; the data paths are relative "
           "to the root):" if code.packed else
           "From the repository root, with this folder's `train_gpt.py` in place of the root one (it is the exact "
           "source the logs embed; the data paths are relative to the root):"), "", "```bash"]
    L += [commands[str(seed)] for seed in seeds]
    preset = c0.get("preset", "competition")
    L += ["```", "", "The variables are every config value that differs from "
          + ("the competition defaults (`Config.diff_from_defaults()`)" if preset == "competition" else
             f"the `PRESET={preset}` defaults (the same rule as `Config.diff_from_defaults()`, against that preset)")
          + "; the packager checked that they rebuild each run's recorded config exactly under the frozen script.",
          "", "## Timing", ""]
    tr = ", ".join(f"{seed_results[str(x)]['train_seconds']:.1f}" for x in seeds)
    ev = ", ".join(f"{seed_results[str(x)]['eval_seconds']:.1f}" for x in seeds)
    L.append(f"Training: {tr} s ({'within' if train_ok else 'NOT within'} 600 s). Evaluation (all passes): {ev} s "
             f"({'within' if eval_ok else 'NOT within'} 600 s). Hardware: {hw}. The limits are checked on each "
             "log's own timings (`train_time`, `eval_seconds`); `tools/check_record.py` repeats the audit.")
    L += ["", "## Compliance", "",
          f"- Score stage `{stage}` is labelled **{comp}** by train_gpt.py: `causal` means every scored distribution "
          "depends only on the artifact and the strict prefix, is a full normalised distribution, is scored before "
          "any update that uses its token, and each token is scored once (conditions C1-C4).",
          f"- Artifact (code + compressed model) at most {max_total:,} bytes on every seed (limit {LIMIT_BYTES:,}); "
          f"the code is the {len(code.file):,}-byte `train_gpt.py` that ran (sha256 `{code.sha256[:16]}...`, logged "
          "by every run at start)" + (f", a packed wrapper of the {len(code.source):,}-byte readable source"
                                      if code.packed else "") + ".",
          f"- Score-first TTT: {'yes' if sub['compliance']['score_first_ttt'] else 'not used by the score stage'}. "
          f"Seeds: {len(runs)}{'' if len(runs) >= 3 else ' (fewer than the usual 3)'}."]
    if comp != "causal":
        L.append(f"- **Warning: the score stage `{stage}` is labelled {comp}**: a later token can change an earlier "
                 "prediction (condition C1), so this number is not a valid competition score.")
    others = [k for k in nc if k != stage]
    if others:
        L.append("- Stages labelled non-causal in these runs (reported, not the score): "
                 + ", ".join(f"`{k}`" for k in others) + ".")
    if args.track != "track_10min_16mb":
        L.append(f"- {label}.")
    L += ["", "## Files", "", "- `README.md`: this file",
          ("- `train_gpt.py`: the packed wrapper that made the runs (from "
           + code.provenance.replace(str(ROOT) + "/", "") + "); `python3 tools/pack_code.py --check` shows what "
           "it executes" if code.packed else
           "- `train_gpt.py`: the frozen source (from " + code.provenance.replace(str(ROOT) + "/", "") + ")")]
    if code.packed:
        L += ["- `train_gpt_source.py`: its readable source (not counted: the wrapper executes it minified)"]
    L += ["- `submission.json`: the summary above, machine-readable"]
    L += [f"- `train_seed{seed}.log`, `train_seed{seed}.json`: the run's log and summary" for seed in seeds]
    L += [f"- `{eval_file(e['seed'], i)}.log`, `{eval_file(e['seed'], i)}.json`: other evaluation {i + 1}, seed "
          f"{e['seed']}" for i, g in enumerate(evals) for e in g["runs"]]
    return "\n".join(L) + "\n", sub


def make_record(args) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", args.name or ""):
        raise Refused(f"--name {args.name!r}: use letters, digits, _ . + - (no spaces)")
    try:
        _dt.date.fromisoformat(args.date)
    except ValueError:
        raise Refused(f"--date {args.date!r}: use YYYY-MM-DD") from None
    try:
        paths = expand_paths(args.runs)
    except ToolError as e:
        raise Refused(str(e)) from None
    runs, stage = load_runs(paths, args.stage, args.track)
    code = frozen_code(runs, args.script, args.source, args.raw_code)
    try:
        evals = load_evals(expand_paths(args.evals), runs, code.executed, runs[0]["facts"].code_sha) \
            if args.evals else []
    except ToolError as e:
        raise Refused(str(e)) from None
    s0 = runs[0]["summary"]
    parent = Path(args.records_dir) / args.track
    final = parent / f"{args.date}_{args.name}"
    if final.exists() and not args.overwrite:
        raise Refused(f"{final} exists (pass --overwrite to replace it)")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "train_gpt.py").write_bytes(code.file)
        if code.packed:
            (tmp / "train_gpt_source.py").write_bytes(code.source)
        mod = import_frozen(tmp / "train_gpt.py")
        env = command_env(mod, s0["config"], s0["device"])
        commands = {}
        for r in runs:
            check_command(mod, env, r["seed"], r["summary"]["config"], s0["device"])
            commands[str(r["seed"])] = render_command(env, r["seed"], s0["device"], s0["world_size"])
        readme, sub = build(runs, stage, args, code, env, commands, evals)
        for r in runs:
            shutil.copyfile(r["log"], tmp / f"train_seed{r['seed']}.log")
            shutil.copyfile(r["json"], tmp / f"train_seed{r['seed']}.json")
        for i, g in enumerate(evals):
            for e in g["runs"]:
                shutil.copyfile(e["log"], tmp / f"{eval_file(e['seed'], i)}.log")
                shutil.copyfile(e["json"], tmp / f"{eval_file(e['seed'], i)}.json")
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
        for rule in audit.audit(audit.load_record(tmp)):  # the organisers' checks on the finished folder
            if rule.ok is False:
                raise Refused(f"{rule.name}: {rule.detail}")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if final.exists():
            old = parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv=None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="the runs' summaries logs/<RUN_ID>.json (one per seed)")
    ap.add_argument("--evals", nargs="+", default=[],
                    help="EVAL_ONLY runs of these runs' artifacts with other eval settings (reported, not scored)")
    ap.add_argument("--name", required=True, help="short name for the folder, e.g. CausalSLOT_LegalTTT")
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id", required=True)
    ap.add_argument("--track", required=True, choices=sorted(TRACKS))
    ap.add_argument("--stage", help="the scored stage (default: the runs' final_compliant_stage)")
    ap.add_argument("--blurb", default="", help="one paragraph: what is new")
    ap.add_argument("--date", default=_dt.date.today().isoformat(), help="YYYY-MM-DD (default today)")
    ap.add_argument("--script", help="the train_gpt.py that made the runs, to ship (default: the wrapper packed from "
                    "--source, or with --raw-code the source embedded in the logs); checked against the logs")
    ap.add_argument("--source", help="the readable source of a packed wrapper (default: the repository's "
                    "train_gpt.py); it must minify to the source the runs executed")
    ap.add_argument("--raw-code", action="store_true", help="ship the raw train_gpt.py (runs made by the raw file)")
    ap.add_argument("--hardware", help="hardware description (default: from the summaries)")
    ap.add_argument("--records-dir", default=str(ROOT / "records"), help="records folder (default records/)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing folder of the same name")
    args = ap.parse_args(argv)
    try:
        final = make_record(args)
    except Refused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    print(f"wrote {final}")
    for f in sorted(final.iterdir()):
        print(f"  {f.name} ({f.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
