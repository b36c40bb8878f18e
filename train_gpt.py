"""Parameter Golf trainer: the PR #549 stack (11L LeakyReLU^2, BigramHash, XSA, partial RoPE, VE, Parallel
Muon, EMA, int6 export) with score-first TTT and SLOT (seed-faithful `batch` and per-window `causal`).

    torchrun --standalone --nproc_per_node=8 train_gpt.py      # 8xH100, PRESET=competition
    python train_gpt.py                                         # CPU, PRESET=cpu, offline dataset

Every knob is an UPPERCASE env var mapped to one `Config` field; see README.md for the glossary and log API.
"""
# ---- imports ----
from __future__ import annotations

import copy
import dataclasses
import difflib
import glob
import io
import json
import lzma
import math
import os
import signal
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

try:  # optional compressors: the artifact uses whichever is smallest among those present
    import zstandard
except ImportError:
    zstandard = None
try:
    import brotli
except ImportError:
    brotli = None
try:  # flash-attn 3 (Hopper), else flash-attn 2, else SDPA
    from flash_attn_interface import flash_attn_func as _fa3
except ImportError:
    _fa3 = None
try:
    from flash_attn import flash_attn_func as _fa2
except ImportError:
    _fa2 = None


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback (DEBUG=1 shows it)."""


# ---- config ----
SLOT_MODES = ("batch", "causal")
PRESETS = ("competition", "cpu")


@dataclass(frozen=True)
class Config:
    # run and paths
    preset: str = "competition"  # PRESET: competition (CUDA default) | cpu (CPU default); explicit vars override
    data_path: str = "./data/datasets/fineweb10B_sp1024"  # DATA_PATH: folder of fineweb_{train,val}_*.bin
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"  # TOKENIZER_PATH
    run_id: str = ""  # RUN_ID: log/artifact name under OUT_DIR (empty: a fresh uuid4)
    out_dir: str = "logs"  # OUT_DIR: where <RUN_ID>.txt/.json/.ptz go
    seed: int = 1337  # SEED
    device: str = ""  # DEVICE: cuda | cpu (empty: cuda when available)
    compile: bool = True  # COMPILE: torch.compile the trunk (CUDA preset default on, CPU off)
    amp: bool = True  # AMP: bf16 autocast for the trunk (fast on CUDA and on avx512_bf16 CPUs)
    eval_only: bool = False  # EVAL_ONLY: skip training, evaluate LOAD_ARTIFACT
    load_artifact: str = ""  # LOAD_ARTIFACT: path of a saved .ptz artifact (EVAL_ONLY=1)
    val_max_tokens: int = 0  # VAL_MAX_TOKENS: cap on val targets (0: all; for quick experiments only)
    eval_time_limit_seconds: float = 600.0  # EVAL_TIME_LIMIT_SECONDS: warn before eval if the estimate exceeds it
    # eval and logging
    val_batch_size: int = 524288  # VAL_BATCH_SIZE: tokens per plain-eval batch (global)
    val_loss_every: int = 4000  # VAL_LOSS_EVERY: plain val eval every N steps (0: only at the end)
    train_log_every: int = 500  # TRAIN_LOG_EVERY
    eval_seq_len: int = 2048  # EVAL_SEQ_LEN: sliding window length
    eval_stride: int = 64  # EVAL_STRIDE: scored tokens per window (window 0 scores all)
    eval_batch_seqs: int = 32  # EVAL_BATCH_SEQS: windows per scoring batch
    # length and time
    iterations: int = 9000  # ITERATIONS: hard cap on steps
    warmdown_iters: int = 3500  # WARMDOWN_ITERS: warmdown length in (estimated) steps, applied on wall clock
    warmup_steps: int = 20  # WARMUP_STEPS: priming steps that are run, then undone
    train_batch_tokens: int = 786432  # TRAIN_BATCH_TOKENS: global batch, independent of world size
    train_seq_len: int = 2048  # TRAIN_SEQ_LEN
    max_wallclock_seconds: float = 600.0  # MAX_WALLCLOCK_SECONDS: training budget (0: step-based warmdown)
    # shape
    vocab_size: int = 1024  # VOCAB_SIZE
    num_layers: int = 11  # NUM_LAYERS
    model_dim: int = 512  # MODEL_DIM
    num_heads: int = 8  # NUM_HEADS
    num_kv_heads: int = 4  # NUM_KV_HEADS
    mlp_mult: float = 3.0  # MLP_MULT
    tie_embeddings: bool = True  # TIE_EMBEDDINGS
    rope_base: float = 10000.0  # ROPE_BASE
    logit_softcap: float = 30.0  # LOGIT_SOFTCAP
    qk_gain_init: float = 1.5  # QK_GAIN_INIT
    # features
    bigram_vocab_size: int = 1536  # BIGRAM_VOCAB_SIZE: hash buckets (0: no BigramHash)
    bigram_dim: int = 128  # BIGRAM_DIM
    xsa_last_n: int = 4  # XSA_LAST_N: exclusive self-attention on the last N layers
    rope_dims: int = 16  # ROPE_DIMS: rotated dims per head (partial RoPE)
    ln_scale: bool = True  # LN_SCALE: scale block inputs by 1/sqrt(layer+1)
    ve_enabled: bool = True  # VE_ENABLED: shared value embeddings
    ve_dim: int = 128  # VE_DIM
    ve_layers: tuple = (9, 10)  # VE_LAYERS: comma-separated layer indices
    # optimizer
    embed_lr: float = 0.6  # EMBED_LR: untied embedding lr
    head_lr: float = 0.008  # HEAD_LR: untied head lr
    tied_embed_lr: float = 0.035  # TIED_EMBED_LR
    tied_embed_init_std: float = 0.005  # TIED_EMBED_INIT_STD
    matrix_lr: float = 0.025  # MATRIX_LR: Muon lr for the banks
    scalar_lr: float = 0.025  # SCALAR_LR
    muon_momentum: float = 0.99  # MUON_MOMENTUM
    muon_backend_steps: int = 5  # MUON_BACKEND_STEPS: Newton-Schulz iterations
    muon_momentum_warmup_start: float = 0.92  # MUON_MOMENTUM_WARMUP_START
    muon_momentum_warmup_steps: int = 1500  # MUON_MOMENTUM_WARMUP_STEPS
    muon_wd: float = 0.04  # MUON_WD
    beta1: float = 0.9  # BETA1
    beta2: float = 0.95  # BETA2
    adam_eps: float = 1e-8  # ADAM_EPS
    adam_wd: float = 0.04  # ADAM_WD
    grad_clip_norm: float = 0.3  # GRAD_CLIP_NORM: on the world-averaged gradient (0: off)
    # averaging and QAT
    ema_enabled: bool = True  # EMA_ENABLED
    ema_decay: float = 0.997  # EMA_DECAY
    late_qat: bool = True  # LATE_QAT: fake-quantize the exported banks once lr_mul < LATE_QAT_THRESHOLD
    late_qat_threshold: float = 0.15  # LATE_QAT_THRESHOLD
    qat_enabled: bool = False  # QAT_ENABLED: fake-quantize from step 0
    # score-first TTT
    ttt_enabled: bool = True  # TTT_ENABLED
    ttt_lr: float = 0.002  # TTT_LR: SGD lr, cosine over chunk index
    ttt_epochs: int = 3  # TTT_EPOCHS
    ttt_chunk_tokens: int = 32768  # TTT_CHUNK_TOKENS: multiple of EVAL_STRIDE
    ttt_freeze_blocks: int = 0  # TTT_FREEZE_BLOCKS: first N blocks frozen, bank slices included
    ttt_momentum: float = 0.9  # TTT_MOMENTUM
    ttt_batch_seqs: int = 32  # TTT_BATCH_SEQS
    ttt_grad_clip: float = 1.0  # TTT_GRAD_CLIP
    # SLOT
    slot_enabled: bool = True  # SLOT_ENABLED: fit a hidden-state delta inside every scoring pass
    slot_mode: str = "batch"  # SLOT_MODE: batch (seed, NOT causal) | causal (per-window, context-only)
    slot_lr: float = 0.001  # SLOT_LR
    slot_steps: int = 3  # SLOT_STEPS
    slot_wd: float = 1e-8  # SLOT_WD: AdamW weight decay
    slot_eps: float = 1e-5  # SLOT_EPS: AdamW eps
    slot_beta1: float = 0.9  # SLOT_BETA1
    slot_beta2: float = 0.999  # SLOT_BETA2
    slot_context: int = 0  # SLOT_CONTEXT: causal mode fits on the last N scored context targets (0: all)
    # CTW mixing at evaluation
    ctw_weight: float = 0.0  # CTW_WEIGHT: mixture weight of the context-tree model (0: off, bit-identical)
    ctw_depth: int = 4  # CTW_DEPTH
    control_tensor_name_patterns: str = (  # CONTROL_TENSOR_NAME_PATTERNS: fp32-kept scalars, no decay group
        "attn_scale,mlp_scale,resid_mix,q_gain,skip_weights,smear,ve_layer_scales,ve_shared.scale,bigram.scale")

    # -- derived --
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @classmethod
    def from_env(cls, env, cuda: bool | None = None) -> "Config":
        """Build from a mapping of env vars: preset defaults, then explicit values. Raises UserError."""
        preset = env.get("PRESET") or ("competition" if (torch.cuda.is_available() if cuda is None else cuda) else "cpu")
        if preset not in PRESETS:
            raise UserError(f"PRESET={preset!r} is not valid: use one of {', '.join(PRESETS)}")
        values = dict(PRESET_VALUES[preset], preset=preset)
        for f in fields(cls):
            name = f.name.upper()
            if name in env and name != "PRESET":
                values[f.name] = _parse_value(name, env[name], _TYPES[f.type])
        for name, (allowed, why) in RETIRED_VARS.items():
            if name in env and allowed is not None and env[name].strip() not in allowed:
                raise UserError(f"{name}={env[name]!r} is not supported ({why}); allowed: {', '.join(allowed)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def need(ok, name, allowed):
            if not ok:
                raise UserError(f"{name}={getattr(self, name.lower())!r} is out of range: {allowed}")
        for name in ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "TRAIN_SEQ_LEN",
                     "TRAIN_BATCH_TOKENS", "EVAL_SEQ_LEN", "EVAL_STRIDE", "EVAL_BATCH_SEQS", "VAL_BATCH_SIZE",
                     "TTT_CHUNK_TOKENS", "TTT_BATCH_SEQS", "MUON_BACKEND_STEPS", "CTW_DEPTH"):
            need(getattr(self, name.lower()) > 0, name, "must be a positive integer")
        for name in ("ITERATIONS", "WARMDOWN_ITERS", "WARMUP_STEPS", "VAL_LOSS_EVERY", "TRAIN_LOG_EVERY",
                     "TTT_EPOCHS", "TTT_FREEZE_BLOCKS", "SLOT_STEPS", "SLOT_CONTEXT", "XSA_LAST_N", "ROPE_DIMS",
                     "BIGRAM_VOCAB_SIZE", "VAL_MAX_TOKENS", "MUON_MOMENTUM_WARMUP_STEPS"):
            need(getattr(self, name.lower()) >= 0, name, "must be >= 0")
        for name in ("EMBED_LR", "HEAD_LR", "TIED_EMBED_LR", "MATRIX_LR", "SCALAR_LR", "TTT_LR", "SLOT_LR",
                     "MUON_WD", "ADAM_WD", "SLOT_WD", "GRAD_CLIP_NORM", "TTT_GRAD_CLIP", "TIED_EMBED_INIT_STD",
                     "MAX_WALLCLOCK_SECONDS", "EVAL_TIME_LIMIT_SECONDS", "ADAM_EPS", "LATE_QAT_THRESHOLD"):
            need(getattr(self, name.lower()) >= 0, name, "must be >= 0")
        for name in ("MUON_MOMENTUM", "MUON_MOMENTUM_WARMUP_START", "BETA1", "BETA2", "EMA_DECAY", "TTT_MOMENTUM",
                     "SLOT_BETA1", "SLOT_BETA2"):
            need(0 <= getattr(self, name.lower()) < 1, name, "must be in [0, 1)")
        need(0 <= self.ctw_weight < 1, "CTW_WEIGHT", "must be in [0, 1)")
        need(self.slot_eps > 0, "SLOT_EPS", "must be > 0")
        need(self.slot_mode in SLOT_MODES, "SLOT_MODE", f"one of {', '.join(SLOT_MODES)}")
        need(self.device in ("", "cpu", "cuda"), "DEVICE", "one of cpu, cuda (or empty for auto)")
        need(self.model_dim % self.num_heads == 0, "MODEL_DIM", "must be a multiple of NUM_HEADS")
        need(self.num_heads % self.num_kv_heads == 0, "NUM_KV_HEADS", "must divide NUM_HEADS")
        need(self.rope_dims % 2 == 0 and self.rope_dims <= self.head_dim, "ROPE_DIMS",
             f"an even number <= head dim {self.head_dim}")
        need(self.xsa_last_n <= self.num_layers, "XSA_LAST_N", f"<= NUM_LAYERS={self.num_layers}")
        need(self.ttt_freeze_blocks <= self.num_layers, "TTT_FREEZE_BLOCKS", f"<= NUM_LAYERS={self.num_layers}")
        need(all(0 <= i < self.num_layers for i in self.ve_layers), "VE_LAYERS",
             f"comma-separated layer indices in [0, {self.num_layers})")
        need(self.bigram_vocab_size == 0 or self.bigram_vocab_size >= 2, "BIGRAM_VOCAB_SIZE", "0 (off) or >= 2")
        need(self.mlp_mult > 0, "MLP_MULT", "must be > 0")
        need(self.logit_softcap > 0, "LOGIT_SOFTCAP", "must be > 0")
        need(self.vocab_size <= 65536, "VOCAB_SIZE", "<= 65536 (uint16 shards)")
        need(self.eval_stride <= self.eval_seq_len, "EVAL_STRIDE", f"<= EVAL_SEQ_LEN={self.eval_seq_len}")
        need(self.eval_seq_len % self.eval_stride == 0, "EVAL_SEQ_LEN", f"a multiple of EVAL_STRIDE={self.eval_stride}")
        need(self.ttt_chunk_tokens % self.eval_stride == 0, "TTT_CHUNK_TOKENS",
             f"a multiple of EVAL_STRIDE={self.eval_stride}")
        need(self.train_batch_tokens % self.train_seq_len == 0, "TRAIN_BATCH_TOKENS",
             f"a multiple of TRAIN_SEQ_LEN={self.train_seq_len}")
        need(not self.eval_only or self.load_artifact, "LOAD_ARTIFACT", "a path is required with EVAL_ONLY=1")

    def diff_from_defaults(self) -> dict:
        """Fields that differ from the competition preset: the env vars of an exact run command."""
        base = Config()
        return {f.name.upper(): _format_value(getattr(self, f.name)) for f in fields(self)
                if f.name not in ("preset", "run_id") and getattr(self, f.name) != getattr(base, f.name)}


PRESET_VALUES = {
    "competition": {},  # the field defaults are the seed's SLOT run command
    "cpu": dict(  # sized so the whole main job fits in 10 minutes on a 2-core CPU with the offline dataset
        data_path="./data/datasets/offline_sp1024", tokenizer_path="./data/tokenizers/offline_1024_bpe.model",
        compile=False, num_layers=6, model_dim=384, num_heads=6, num_kv_heads=3, bigram_vocab_size=1536,
        xsa_last_n=2, ve_layers=(4, 5), train_seq_len=256, train_batch_tokens=16384, iterations=10000,
        max_wallclock_seconds=240.0, warmdown_iters=60, warmup_steps=2, muon_momentum_warmup_steps=50,
        val_loss_every=0, train_log_every=10, val_batch_size=16384, eval_seq_len=256, eval_stride=64,
        eval_batch_seqs=16, ttt_chunk_tokens=8192, ttt_batch_seqs=16, eval_time_limit_seconds=300.0),
}

# Names the reference reads (or its README sets) that this program does not implement. None = any value is
# accepted and ignored with a note; otherwise only the listed values are accepted.
RETIRED_VARS = {
    "SWA_ENABLED": (None, "SWA is never applied in #549 (dead code); EMA is what is exported"),
    "SWA_EVERY": (None, "SWA is never applied in #549 (dead code)"),
    "LAWA_ENABLED": (("0",), "LAWA was removed: off in #549"),
    "LAWA_K": (None, "LAWA was removed"),
    "LAWA_FREQ": (None, "LAWA was removed"),
    "MUON_BETA2": (None, "read but unused by #549's Muon"),
    "DTG_ENABLED": (("0",), "the DTG gate was removed: off in #549"),
    "GATED_ATTENTION": (("0",), "gated attention was removed: off in #549"),
    "VALUE_RESIDUAL": (("0",), "value residual was removed: off in #549"),
    "MTP_NUM_HEADS": (("0",), "MTP heads were removed: off in #549"),
    "MTP_LOSS_WEIGHT": (None, "MTP heads were removed"),
    "INT8_KEEP_FLOAT_FP32_NAME_PATTERNS": (None, "no large control tensor exists; CONTROL_TENSOR_NAME_PATTERNS rules"),
}
# Env vars of the environment that are not ours even though they share a prefix.
FOREIGN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DEBUG",
                "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE"}
_OUR_PREFIXES = ("SLOT_", "TTT_", "EVAL_", "VAL_", "TRAIN_", "MUON_", "ADAM_", "EMA_", "QAT_", "LATE_QAT", "CTW_",
                 "BIGRAM_", "VE_", "ROPE_", "XSA_", "WARMUP_", "WARMDOWN_", "TIED_", "MATRIX_", "SCALAR_", "NUM_",
                 "MODEL_", "MLP_", "LOGIT_", "QK_", "LN_", "GRAD_", "HEAD_", "EMBED_", "MAX_", "LOAD_")


_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}


def _parse_value(name: str, raw: str, typ):
    s = raw.strip()
    try:
        if typ is bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if typ is int:
            try:
                return int(s)
            except ValueError:
                v = float(s)  # accept 1e5 or 8.0, not 8.5
                if not v.is_integer():
                    raise
                return int(v)
        if typ is float:
            v = float(s)
            if not math.isfinite(v):
                raise ValueError
            return v
        if typ is tuple:
            return tuple(int(p) for p in s.split(",") if p.strip())
        return s
    except ValueError:
        kind = {bool: "0 or 1", int: "an integer", float: "a number", tuple: "comma-separated integers"}[typ]
        raise UserError(f"{name}={raw!r} is malformed: expected {kind}") from None


def _format_value(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, tuple):
        return ",".join(str(i) for i in v)
    return str(v)


def env_warnings(env) -> list[str]:
    """Notes for env vars that look like ours but are unknown (typos), and for retired names."""
    known = {f.name.upper() for f in fields(Config)}
    out = []
    for name in sorted(env):
        if name in known or name in FOREIGN_VARS:
            continue
        if name in RETIRED_VARS:
            out.append(f"config:ignored {name}={env[name]} ({RETIRED_VARS[name][1]})")
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        if close or name.startswith(_OUR_PREFIXES):
            hint = f"; did you mean {close[0]}?" if close else ""
            out.append(f"WARNING: unknown variable {name}={env[name]} is ignored{hint}")
    return out


# ---- runtime ----
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp: bool = True
    compile: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def setup_runtime(cfg: Config, env) -> Runtime:
    """The only place that reads torchrun's variables and picks the device and process group."""
    want = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("DEVICE=cuda but no CUDA device is available: unset DEVICE or use DEVICE=cpu")
    world = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if want == "cuda" else torch.device("cpu")
    if want == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        if want == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Runtime(device=device, rank=rank, world_size=world, local_rank=local_rank, amp=cfg.amp,
                   compile=cfg.compile and want == "cuda")


def amp_ctx(rt: Runtime):
    return torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.amp)


def sync(rt: Runtime) -> None:
    if rt.cuda:
        torch.cuda.synchronize()


def all_reduce_(t: Tensor, op=None) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def maybe_compile(fn, rt: Runtime):
    return torch.compile(fn, dynamic=False) if rt.compile else fn


def peak_memory_mb(rt: Runtime) -> float:
    if rt.cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous split of n items over world ranks: rank r gets [n*r//w, n*(r+1)//w)."""
    return n * rank // world, n * (rank + 1) // world


# ---- data ----
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


class DataError(UserError):
    pass


def write_shard(path, tokens) -> None:
    """Write tokens in the competition's shard format, atomically (temp name, then rename)."""
    toks = np.asarray(tokens)
    if toks.size and (toks.min() < 0 or toks.max() >= 65536):
        raise DataError(f"{path}: token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, toks.size)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype("<u2").tobytes())
    os.replace(tmp, path)


def read_shard_header(path) -> int:
    """Validate a shard's header and size; return its token count. Raises DataError naming the defect."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = np.frombuffer(f.read(HEADER_INTS * 4), dtype="<i4")
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if head.size < HEADER_INTS:
        raise DataError(f"{path}: truncated header ({size} bytes, need {HEADER_INTS * 4})")
    if head[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {int(head[0])} (expected {SHARD_MAGIC}); not a shard file")
    if head[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {int(head[1])} (expected {SHARD_VERSION})")
    n = int(head[2])
    expected = HEADER_INTS * 4 + 2 * n
    if size != expected:
        kind = "truncated body" if size < expected else "trailing bytes"
        raise DataError(f"{path}: {kind}: {size} bytes but the header says {n} tokens ({expected} bytes)")
    return n


def load_shard(path, vocab_size: int | None = None) -> np.ndarray:
    """Read and validate one shard; returns uint16 tokens. Token ids >= vocab_size are an error."""
    n = read_shard_header(path)
    toks = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_INTS * 4)
    if vocab_size is not None and n and int(toks.max()) >= vocab_size:
        bad = int(np.argmax(toks >= vocab_size))
        raise DataError(f"{path}: token id {int(toks[bad])} at index {bad} is >= VOCAB_SIZE={vocab_size}")
    return toks


def shard_files(data_path: str, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))


def check_data_path(data_path: str) -> None:
    hint = ("get the data with `python data/cached_challenge_fineweb.py` (FineWeb) or "
            "`python data/prepare_offline.py` (offline), or set DATA_PATH")
    if not os.path.isdir(data_path):
        raise DataError(f"DATA_PATH {data_path} does not exist: {hint}")
    if not shard_files(data_path, "val"):
        raise DataError(f"DATA_PATH {data_path} has no fineweb_val_*.bin shards: {hint}")


def load_val_tokens(cfg: Config) -> Tensor:
    """All val shards concatenated; targets capped by VAL_MAX_TOKENS. Returns int64 tokens (targets = n-1)."""
    check_data_path(cfg.data_path)
    toks = np.concatenate([load_shard(p, cfg.vocab_size) for p in shard_files(cfg.data_path, "val")])
    if cfg.val_max_tokens:
        toks = toks[: cfg.val_max_tokens + 1]
    if toks.size < 2:
        raise DataError(f"DATA_PATH {cfg.data_path}: val shards hold {toks.size} tokens; need at least 2")
    return torch.from_numpy(toks.astype(np.int64))


class TokenStream:
    """Reads the train shards in order, wrapping forever (every rank reads the same stream)."""

    def __init__(self, files: list[str], vocab_size: int):
        if not files:
            raise DataError("no fineweb_train_*.bin shards found: get the data or set DATA_PATH")
        self.files, self.vocab_size = files, vocab_size
        self.idx, self.pos = 0, 0
        self.tokens = load_shard(files[0], vocab_size)

    def take(self, n: int) -> np.ndarray:
        out, need = [], n
        while need:
            if self.pos >= self.tokens.size:
                self.idx = (self.idx + 1) % len(self.files)
                self.tokens, self.pos = load_shard(self.files[self.idx], self.vocab_size), 0
                continue
            k = min(need, self.tokens.size - self.pos)
            out.append(self.tokens[self.pos: self.pos + k])
            self.pos, need = self.pos + k, need - k
        return np.concatenate(out)


class DistributedLoader:
    """Each step takes world*(local+1) contiguous tokens; rank r gets its own slice of local+1 (x and y)."""

    def __init__(self, cfg: Config, rt: Runtime):
        self.stream = TokenStream(shard_files(cfg.data_path, "train"), cfg.vocab_size)
        self.rt = rt

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        span = local_tokens + 1
        chunk = self.stream.take(span * self.rt.world_size)
        t = torch.from_numpy(chunk[self.rt.rank * span: (self.rt.rank + 1) * span].astype(np.int64))
        x, y = t[:-1].view(-1, seq_len), t[1:].view(-1, seq_len)
        return x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True)


@dataclass
class ByteLuts:
    """Per-token byte accounting (parameter_golf.md section 3). Tensors of size max(sp vocab, VOCAB_SIZE)."""
    base_bytes: Tensor  # int16: UTF-8 bytes of the piece without one leading U+2581; 1 for <0xNN>; 0 for boundaries
    has_space: Tensor  # bool: piece starts with U+2581 (counts 1 byte unless the previous token is a boundary)
    is_boundary: Tensor  # bool: control, unknown, unused, or past the sp vocab

    def target_bytes(self, prev: Tensor, tgt: Tensor) -> Tensor:
        """Bytes of each target given the token before it (same shapes); int64."""
        b = self.base_bytes[tgt].long()
        return b + (self.has_space[tgt] & ~self.is_boundary[prev]).long()

    def to(self, device) -> "ByteLuts":
        return ByteLuts(*(t.to(device) for t in (self.base_bytes, self.has_space, self.is_boundary)))


def build_byte_luts(sp, vocab_size: int) -> ByteLuts:
    n = max(sp.vocab_size(), vocab_size)
    base = np.zeros(n, dtype=np.int16)
    space = np.zeros(n, dtype=bool)
    boundary = np.ones(n, dtype=bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLuts(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary))


def load_tokenizer_luts(cfg: Config) -> ByteLuts:
    import sentencepiece as spm
    if not os.path.isfile(cfg.tokenizer_path):
        raise DataError(f"TOKENIZER_PATH {cfg.tokenizer_path} does not exist: get the data (see README) "
                        f"or set TOKENIZER_PATH (VOCAB_SIZE={cfg.vocab_size})")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(cfg.tokenizer_path)
    except (OSError, RuntimeError) as e:
        raise DataError(f"TOKENIZER_PATH {cfg.tokenizer_path}: not a SentencePiece model ({e})") from None
    if sp.vocab_size() != cfg.vocab_size:
        raise DataError(f"TOKENIZER_PATH {cfg.tokenizer_path} has vocab size {sp.vocab_size()} but "
                        f"VOCAB_SIZE={cfg.vocab_size}: make them agree")
    return build_byte_luts(sp, cfg.vocab_size)
