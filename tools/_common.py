"""Helpers shared by the tools: import train_gpt, a random tiny model, reading run summaries and logs."""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_gpt as tg  # noqa: E402  (after the path fix; importing it has no side effects)

# A model small enough for exact float64 checks in seconds; every feature of the real stack stays switched on.
TINY = dict(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0, bigram_vocab_size=64,
            bigram_dim=16, xsa_last_n=1, rope_dims=8, ve_enabled=True, ve_dim=16, ve_layers=(1,))


class ToolError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def tiny_config(cfg: "tg.Config | None" = None, **over) -> "tg.Config":
    base = cfg or tg.Config(preset="cpu", compile=False, compile_head=False, amp=False)
    return dataclasses.replace(base, **{**TINY, **over})


def random_tiny_model(cfg: "tg.Config", seed: int = 0) -> "tg.GPT":
    """tg.GPT(cfg) with every weight random. The trainer zero-initialises the output projections (so a fresh
    model ignores attention and MLP entirely), which would make a causality test vacuous."""
    import torch
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.size(-1)))
            elif name.endswith(("q_gain", "scale", "smear")) or p.dim() == 0:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def expand_paths(patterns) -> list[Path]:
    """Paths or glob patterns (the shell usually expands them; quoted patterns are expanded here), in order."""
    out = []
    for pat in patterns or []:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        if not hits:
            raise ToolError(f"{pat}: no file matches")
        out.extend(Path(h) for h in hits)
    seen, uniq = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            uniq.append(p)
    return uniq


def load_summary(path: Path) -> dict:
    """A run's JSON summary (logs/<RUN_ID>.json). Raises ToolError naming the defect."""
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"{path}: no such file")
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolError(f"{path}: not a readable JSON summary ({type(e).__name__})") from None
    if not isinstance(s, dict) or not isinstance(s.get("stages"), dict):
        raise ToolError(f"{path}: not a run summary (no 'stages'); pass the logs/<RUN_ID>.json a run writes")
    return s


def run_seed(s: dict):
    return (s.get("config") or {}).get("seed")


def stage_value(s: dict, stage: str, key: str, path="run") -> float:
    """val_loss/val_bpb of a stage; stage 'val_bpb' means the summary's headline (its last stage)."""
    if stage == "val_bpb":
        v = s.get("val_loss" if key == "val_loss" else "val_bpb")
    else:
        st = s["stages"].get(stage)
        if st is None:
            raise ToolError(f"{path}: has no stage {stage!r} (it has {', '.join(s['stages']) or 'none'})")
        v = st.get(key)
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ToolError(f"{path}: stage {stage!r} has no finite {key}")
    return float(v)
