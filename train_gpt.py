"""Parameter Golf: the PR #549 stack with score-first TTT and SLOT (`batch` as the seed, per-window `causal`).
`torchrun --standalone --nproc_per_node=8 train_gpt.py` (8xH100) or `python train_gpt.py` (CPU preset). Every knob
is an env var (one Config field); README.md has the glossary and the log API."""
# ---- imports ----

import copy
import dataclasses
import difflib
import glob
import hashlib
import importlib
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
from torch.overrides import TorchFunctionMode

try:  # optional compressors
    import zstandard
except ImportError:
    zstandard = None
try:
    import brotli
except ImportError:
    brotli = None


class UserError(Exception):
    """Bad input: one line, exit status 2."""


# ---- config ----
SLOT_MODES = ("batch", "causal")
PRESETS = ("competition", "cpu")


@dataclass(frozen=True)
class Config:
    # run and paths
    preset: str = "competition"  # competition (CUDA default) | cpu
    data_path: str = "./data/datasets/fineweb10B_sp1024"  # folder of fineweb_{train,val}_*.bin
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    run_id: str = ""  # empty: a fresh uuid4
    out_dir: str = "logs"  # where <RUN_ID>.txt/.json/.ptz go
    seed: int = 1337
    device: str = ""  # cuda | cpu (empty: cuda when available)
    compile: bool = True  # torch.compile the model
    compile_head: bool = True  # torch.compile the head (CE, SLOT)
    amp: bool = True  # bf16 autocast where bf16 is fast
    eval_only: bool = False  # skip training, evaluate LOAD_ARTIFACT
    load_artifact: str = ""  # path of a saved .ptz artifact (EVAL_ONLY=1)
    val_max_tokens: int = 0  # cap on val targets (0: all)
    eval_time_limit_seconds: float = 600.0  # warn before eval if the estimate exceeds it
    # eval and logging
    val_batch_size: int = 524288  # tokens per plain-eval batch (global)
    val_loss_every: int = 4000  # 0: only at the end
    train_log_every: int = 500
    eval_seq_len: int = 2048  # sliding window length
    eval_stride: int = 64  # scored tokens per window (window 0 scores all)
    eval_batch_seqs: int = 32  # windows per scoring batch
    # length and time
    iterations: int = 9000  # hard cap on steps
    warmdown_iters: int = 3500
    warmup_steps: int = 20  # priming steps that are run, then undone
    train_batch_tokens: int = 786432  # global batch, independent of world size
    train_seq_len: int = 2048
    max_wallclock_seconds: float = 600.0  # training budget (0: step-based warmdown)
    # shape
    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.0
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    # features
    bigram_vocab_size: int = 1536  # hash buckets (0: no BigramHash)
    bigram_dim: int = 128
    xsa_last_n: int = 4  # exclusive self-attention on the last N layers
    rope_dims: int = 16  # rotated dims per head (partial RoPE)
    ln_scale: bool = True  # scale block inputs by 1/sqrt(layer+1)
    ve_enabled: bool = True  # shared value embeddings
    ve_dim: int = 128
    ve_layers: tuple = (9, 10)  # comma-separated layer indices
    # optimizer
    embed_lr: float = 0.6  # untied embedding lr
    head_lr: float = 0.008  # untied head lr
    tied_embed_lr: float = 0.035
    tied_embed_init_std: float = 0.005
    matrix_lr: float = 0.025  # Muon lr for the banks
    scalar_lr: float = 0.025
    muon_momentum: float = 0.99
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_wd: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.04
    grad_clip_norm: float = 0.3  # on the world-averaged gradient (0: off)
    # averaging and QAT
    ema_enabled: bool = True
    ema_decay: float = 0.997
    late_qat: bool = True
    late_qat_threshold: float = 0.15
    qat_enabled: bool = False  # fake-quantize from step 0
    # score-first TTT
    ttt_enabled: bool = True
    ttt_lr: float = 0.002  # SGD lr, cosine over chunk index
    ttt_epochs: int = 3
    ttt_chunk_tokens: int = 32768  # multiple of EVAL_STRIDE
    ttt_freeze_blocks: int = 0  # first N blocks frozen, bank slices included
    ttt_momentum: float = 0.9
    ttt_batch_seqs: int = 32
    ttt_grad_clip: float = 1.0
    # SLOT
    slot_enabled: bool = True
    slot_mode: str = "batch"  # batch (seed, NOT causal) | causal
    slot_lr: float = 0.001
    slot_steps: int = 3
    slot_wd: float = 1e-8  # AdamW weight decay
    slot_eps: float = 1e-5  # AdamW eps
    slot_beta1: float = 0.9
    slot_beta2: float = 0.999
    slot_context: int = 0  # causal: fit on the last N context targets (0: all)
    # CTW mixing at evaluation
    ctw_weight: float = 0.0  # 0: off
    ctw_depth: int = 4  # context-tree depth (previous tokens)
    ctw_alpha: float = 0.0  # 0: 1/VOCAB_SIZE
    control_tensor_name_patterns: str = ""  # comma list: small tensors kept fp32
    artifact_target_bytes: int = 16_000_000
    gptq: bool = False
    gptq_calib_seqs: int = 64  # calibration sequences of TRAIN_SEQ_LEN tokens
    gptq_reserve_seconds: float = 8.0

    # -- derived --
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @classmethod
    def from_env(cls, env, cuda: bool | None = None) -> "Config":
        """Preset defaults, then explicit values. Raises UserError."""
        preset = env.get("PRESET") or ("competition" if (torch.cuda.is_available() if cuda is None else cuda) else "cpu")
        if preset not in PRESETS:
            raise UserError(f"PRESET={preset!r} is not valid: use one of {', '.join(PRESETS)}")
        values = dict(PRESET_VALUES[preset], preset=preset)
        for f in fields(cls):
            name = f.name.upper()
            if name in env and name != "PRESET":
                values[f.name] = _parse_value(name, env[name], f.type)
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
                     "TTT_CHUNK_TOKENS", "TTT_BATCH_SEQS", "MUON_BACKEND_STEPS", "CTW_DEPTH", "GPTQ_CALIB_SEQS"):
            need(getattr(self, name.lower()) > 0, name, "must be a positive integer")
        for name in ("ITERATIONS", "WARMDOWN_ITERS", "WARMUP_STEPS", "VAL_LOSS_EVERY", "TRAIN_LOG_EVERY",
                     "TTT_EPOCHS", "TTT_FREEZE_BLOCKS", "SLOT_STEPS", "SLOT_CONTEXT", "XSA_LAST_N", "ROPE_DIMS",
                     "BIGRAM_VOCAB_SIZE", "VAL_MAX_TOKENS", "MUON_MOMENTUM_WARMUP_STEPS", "ARTIFACT_TARGET_BYTES"):
            need(getattr(self, name.lower()) >= 0, name, "must be >= 0")
        for name in ("EMBED_LR", "HEAD_LR", "TIED_EMBED_LR", "MATRIX_LR", "SCALAR_LR", "TTT_LR", "SLOT_LR",
                     "MUON_WD", "ADAM_WD", "SLOT_WD", "GRAD_CLIP_NORM", "TTT_GRAD_CLIP", "TIED_EMBED_INIT_STD",
                     "MAX_WALLCLOCK_SECONDS", "EVAL_TIME_LIMIT_SECONDS", "ADAM_EPS", "LATE_QAT_THRESHOLD",
                     "GPTQ_RESERVE_SECONDS"):
            need(getattr(self, name.lower()) >= 0, name, "must be >= 0")
        for name in ("MUON_MOMENTUM", "MUON_MOMENTUM_WARMUP_START", "BETA1", "BETA2", "EMA_DECAY", "TTT_MOMENTUM",
                     "SLOT_BETA1", "SLOT_BETA2"):
            need(0 <= getattr(self, name.lower()) < 1, name, "must be in [0, 1)")
        need(0 <= self.ctw_weight < 1, "CTW_WEIGHT", "must be in [0, 1)")
        need(self.ctw_alpha >= 0, "CTW_ALPHA", "must be >= 0 (0: 1/VOCAB_SIZE)")
        need(self.slot_eps > 0, "SLOT_EPS", "must be > 0")
        need(self.slot_mode in SLOT_MODES, "SLOT_MODE", f"one of {', '.join(SLOT_MODES)}")
        need(not (self.gptq and self.max_wallclock_seconds) or self.gptq_reserve_seconds < self.max_wallclock_seconds,
             "GPTQ_RESERVE_SECONDS", f"< MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds:g} with GPTQ=1")
        need(self.device in ("", "cpu", "cuda"), "DEVICE", "one of cpu, cuda (or empty for auto)")
        need(self.model_dim % self.num_heads == 0, "MODEL_DIM", "must be a multiple of NUM_HEADS")
        need(self.num_heads % self.num_kv_heads == 0, "NUM_KV_HEADS", "must divide NUM_HEADS")
        need(self.rope_dims % 2 == 0 and self.rope_dims != 2 and self.rope_dims <= self.head_dim, "ROPE_DIMS",
             f"0 or an even number in [4, {self.head_dim}] (head dim; 2 breaks NTK scaling past 1024)")
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
        """Fields that differ from the competition preset: an exact run command."""
        base = Config()
        return {f.name.upper(): _format_value(getattr(self, f.name)) for f in fields(self)
                if f.name not in ("preset", "run_id") and getattr(self, f.name) != getattr(base, f.name)}


PRESET_VALUES = {
    "competition": {},
    "cpu": dict(  # main job in 10 min on 2 cores
        data_path="./data/datasets/offline_sp1024", tokenizer_path="./data/tokenizers/offline_1024_bpe.model",
        compile=False, num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2, bigram_vocab_size=1536,
        xsa_last_n=2, ve_layers=(2, 3), train_seq_len=256, train_batch_tokens=16384, iterations=10000,
        max_wallclock_seconds=270.0, warmdown_iters=25, warmup_steps=2, muon_momentum_warmup_steps=20,
        val_loss_every=0, train_log_every=10, val_batch_size=16384, eval_seq_len=256, eval_stride=64,
        eval_batch_seqs=16, ttt_chunk_tokens=8192, ttt_batch_seqs=16, eval_time_limit_seconds=300.0, ema_decay=0.9,
        gptq_reserve_seconds=15.0),
}

# Names the reference reads that we do not implement: None = any value is ignored, else only these are accepted.
RETIRED_VARS = {
    "SWA_ENABLED": (None, "dead code in #549: EMA is exported"),
    "SWA_EVERY": (None, "dead code in #549"),
    "LAWA_ENABLED": (("0",), "off in #549"),
    "LAWA_K": (None, "off in #549"),
    "LAWA_FREQ": (None, "off in #549"),
    "MUON_BETA2": (None, "unused in #549"),
    "DTG_ENABLED": (("0",), "off in #549"),
    "GATED_ATTENTION": (("0",), "off in #549"),
    "VALUE_RESIDUAL": (("0",), "off in #549"),
    "MTP_NUM_HEADS": (("0",), "off in #549"),
    "MTP_LOSS_WEIGHT": (None, "off in #549"),
    "GPTQ_CALIB": (("train",), "self-sampling was deleted: no better, slower"),
    "INT8_KEEP_FLOAT_FP32_NAME_PATTERNS": (None, "see CONTROL_TENSOR_NAME_PATTERNS"),
}
FOREIGN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DEBUG",
                "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE"}
_OUR_PREFIXES = ("SLOT_", "GPTQ_", "TTT_", "EVAL_", "VAL_", "TRAIN_", "MUON_", "ADAM_", "EMA_", "QAT_", "LATE_QAT", "CTW_",
                 "BIGRAM_", "VE_", "ROPE_", "XSA_", "WARMUP_", "WARMDOWN_", "TIED_", "MATRIX_", "SCALAR_", "NUM_",
                 "MODEL_", "MLP_", "LOGIT_", "QK_", "LN_", "GRAD_", "HEAD_", "EMBED_", "MAX_", "LOAD_")


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
    """Notes for unknown env vars that look like ours, and for retired names."""
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
    amp: bool = True  # bf16 autocast, and bf16 Newton-Schulz
    compile: bool = False  # the model (maybe_compile)
    compile_head: bool = False  # the head's functions (fn)
    _fns: dict = field(default_factory=dict, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def fn(self, f):
        """f compiled (static, fullgraph) with COMPILE or COMPILE_HEAD, else f."""
        if not self.compile_head:
            return f
        if f not in self._fns:
            self._fns[f] = torch.compile(f, fullgraph=True, dynamic=False)
        return self._fns[f]


def setup_runtime(cfg: Config, env) -> Runtime:
    """The only reader of torchrun's variables: device, attention kernel, process group."""
    if cfg.device == "cuda" or (not cfg.device and torch.version.cuda):
        if not torch.cuda.is_available():
            raise UserError(cuda_problem() + ("" if cfg.device else ": set DEVICE=cpu to run on the CPU on purpose"))
    want = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if want == "cuda" else torch.device("cpu")
    if want == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.enable_math_sdp(False)  # fail, don't crawl
        load_flash_attn(device, cfg.head_dim)
    ATTN_CALLS.clear()
    ATTN_CALLS.update({n: torch.zeros((), dtype=torch.long, device=device) for n in ("flash_attn_3", "flash_attn_2", "sdpa")})
    if world > 1 and not dist.is_initialized():
        if want == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Runtime(device=device, rank=rank, world_size=world, local_rank=local_rank,
                   amp=cfg.amp and (want == "cuda" or cpu_bf16_is_fast()), compile=cfg.compile,
                   compile_head=cfg.compile or cfg.compile_head)


def cuda_problem() -> str:
    """Why CUDA is unusable, in one line."""
    if torch.version.cuda is None:
        return (f"DEVICE=cuda but torch {torch.__version__} is a CPU build: install the CUDA build of torch 2.13.0 "
                "for your driver (README: Your first GPU run)")
    try:
        torch.cuda.init()
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "driver" in why.lower():
            return f"CUDA unusable: the NVIDIA driver is too old for this torch (CUDA {torch.version.cuda}): {why}"
        return f"CUDA unusable: {why}"
    return f"CUDA unusable: no CUDA device visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})"


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal GQA attention on (B,T,H,D): flash-attn (bf16, CUDA) if loaded, else SDPA."""
    if _flash and q.is_cuda and q.dtype == torch.bfloat16:
        name, fn = _flash[0]
        y = fn(q, k, v, causal=True)
        y = y[0] if isinstance(y, tuple) else y
    else:
        name, y = "sdpa", sdpa(q, k, v)
    if name in ATTN_CALLS:
        ATTN_CALLS[name] += 1
    return y


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal SDPA; on CUDA with K/V heads repeated (enable_gqa is flash-kernel only there: fp32 would fall to
    the T x T math kernel, and cuDNN would be ineligible)."""
    if q.is_cuda:
        k, v = (t.repeat_interleave(q.size(2) // k.size(2), dim=2) for t in (k, v))
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


_flash: list = []  # [(name, fn)] of load_flash_attn
FLASH_NOTES: list = []  # why an installed flash-attn is not used
ATTN_CALLS: dict = {}  # 0-dim counts per backend


def load_flash_attn(device, head_dim: int = 64) -> None:
    """flash-attn 3, else 2: the first that imports and matches SDPA once."""
    _flash.clear()
    for name, module in (("flash_attn_3", "flash_attn_interface"), ("flash_attn_2", "flash_attn")):
        try:
            fn = importlib.import_module(module).flash_attn_func
        except ImportError:
            continue
        except Exception as e:
            FLASH_NOTES.append(f"{name} does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        try:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(1, 256, 4, head_dim, device=device, dtype=torch.bfloat16, generator=g)
            k, v = q[:, :, :2].contiguous(), q[:, :, 2:].contiguous()
            out = fn(q, k, v, causal=True)
            out = out[0] if isinstance(out, tuple) else out
            err = (out.float() - sdpa(q, k, v).float()).abs().max().item()
            if not err < 0.05:
                raise RuntimeError(f"differs from SDPA by {err:.3g}")
        except Exception as e:
            FLASH_NOTES.append(f"{name} fails its first call ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        _flash.append((name, fn))
        return


def cpu_bf16_is_fast() -> bool:
    """bf16 matmul beats fp32 only with avx512_bf16/AMX (CPU flags: a timing can flip)."""
    try:
        return not {"avx512_bf16", "amx_bf16"}.isdisjoint(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False


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
    """The model's functions under COMPILE: static shapes, fullgraph."""
    return torch.compile(fn, dynamic=False, fullgraph=True) if rt.compile else fn


def train_loss_fn(model, rt: Runtime):
    """(forward, nll): the compiled model, or the eager model and the compiled CE."""
    return (maybe_compile(model, rt), None) if rt.compile else (model, rt.fn(softcap_nll))


def peak_memory_mb(rt: Runtime) -> float:
    if rt.cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous split of n items over world ranks."""
    return n * rank // world, n * (rank + 1) // world


# ---- data ----
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


class DataError(UserError):
    pass


def write_shard(path, tokens) -> None:
    """Write tokens in the competition's shard format, atomically."""
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
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_INTS * 4)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(raw) < HEADER_INTS * 4:
        raise DataError(f"{path}: truncated header ({size} bytes, need {HEADER_INTS * 4})")
    head = np.frombuffer(raw, dtype="<i4")
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
    """Read and validate one shard (uint16 tokens < vocab_size)."""
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
    """All val shards concatenated (int64), targets capped by VAL_MAX_TOKENS."""
    check_data_path(cfg.data_path)
    toks = np.concatenate([load_shard(p, cfg.vocab_size) for p in shard_files(cfg.data_path, "val")])
    if cfg.val_max_tokens:
        toks = toks[: cfg.val_max_tokens + 1]
    if toks.size < 2:
        raise DataError(f"DATA_PATH {cfg.data_path}: val shards hold {toks.size} tokens; need at least 2")
    return torch.from_numpy(toks.astype(np.int64))


class TokenStream:
    """The train shards in order, wrapping forever."""

    def __init__(self, files: list[str], vocab_size: int):
        if not files:
            raise DataError("no fineweb_train_*.bin shards found: get the data or set DATA_PATH")
        if sum(read_shard_header(f) for f in files) == 0:
            raise DataError(f"the train shards in {os.path.dirname(files[0])} hold no tokens: rebuild the data")
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
    """Each step: world*(local+1) contiguous tokens, rank r takes its slice."""

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
    """Per-token byte accounting (parameter_golf.md section 3)."""
    base_bytes: Tensor  # UTF-8 bytes, no leading U+2581
    has_space: Tensor  # starts with U+2581
    is_boundary: Tensor

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


# ---- model ----
def wide(t: Tensor) -> Tensor:
    """t in fp32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def fake_quant_int6(w: Tensor) -> Tensor:
    """Straight-through per-row int6 fake quantization on the export grid."""
    s = w.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-10) / 31
    return w + ((w / s).round().clamp(-31, 31) * s - w).detach()


class Rotary(nn.Module):
    """Partial RoPE on the first `dims` dims of each head; NTK base keyed on 1024 (quirk kept). The run's
    lengths' tables are buffers: in a compiled graph inductor would redo fp64 cos/sin in every RoPE kernel."""

    NTK_LEN = 1024

    def __init__(self, dims: int, base: float, lengths=()):
        super().__init__()
        self.dims, self.base = dims, base
        for T in set(lengths):
            for n, t in zip("cs", self.tables(T, None)):
                self.register_buffer(f"{n}{T}", t, persistent=False)

    def tables(self, T: int, device) -> tuple[Tensor, Tensor]:
        """(cos, sin), fp32 (T, dims/2) (T sets the NTK base)."""
        if hasattr(self, f"c{T}"):
            return getattr(self, f"c{T}"), getattr(self, f"s{T}")
        base = self.base * (T / self.NTK_LEN) ** (self.dims / (self.dims - 2)) if T > self.NTK_LEN else self.base
        inv = 1.0 / base ** (torch.arange(0, self.dims, 2, dtype=torch.float64, device=device) / self.dims)
        ang = torch.outer(torch.arange(T, dtype=torch.float64, device=device), inv)
        return ang.cos().float(), ang.sin().float()

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # (B,T,H,D), tables (T, dims/2)
        if self.dims == 0:
            return x
        cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
        half = self.dims // 2
        x1, x2, rest = x[..., :half], x[..., half:self.dims], x[..., self.dims:]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


class BigramHash(nn.Module):
    """Hashed (prev, cur) token-pair embedding; position 0 uses the last bucket."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, dim)
        self.proj = nn.Linear(dim, model_dim, bias=False) if dim != model_dim else nn.Identity()
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: Tensor) -> Tensor:
        ids32 = ids.to(torch.int32)
        h = torch.bitwise_xor(36313 * ids32[:, 1:], 27191 * ids32[:, :-1]) % (self.buckets - 1)
        h = torch.cat((torch.full_like(ids32[:, :1], self.buckets - 1), h), dim=1)
        return self.scale * self.proj(self.embed(h.long()))



class ValueEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int, kv_dim: int, n_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, kv_dim, bias=False) if dim != kv_dim else nn.Identity()
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.ve_layer_scales = nn.Parameter(torch.ones(n_layers))

    def forward(self, ids: Tensor) -> Tensor:
        return self.scale * self.proj(self.embed(ids))


class Block(nn.Module):
    """Per-block scalars; the matrices are bank slices passed in."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        D = cfg.model_dim
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.attn_scale = nn.Parameter(torch.ones(D))
        self.mlp_scale = nn.Parameter(torch.ones(D))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(D), torch.zeros(D))))
        self.ln = 1 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        self.xsa = layer >= cfg.num_layers - cfg.xsa_last_n
        self.H, self.Hkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def forward(self, x, x0, wq, wk, wv, wo, wup, wdown, rotary, rope, ve):
        """bf16 under AMP whatever autocast's op lists say (CUDA runs rms_norm in fp32: AT_FORALL_FP32 in
        ATen/autocast_mode.h, torch 2.13): q/k norm, RoPE, attention in the autocast dtype, XSA in fp32."""
        B, T, D = x.shape
        x = self.resid_mix[0] * x + self.resid_mix[1] * x0
        h = rms_norm(x) * self.ln
        q = F.linear(h, wq.to(h.dtype)).view(B, T, self.H, self.hd)
        k = F.linear(h, wk.to(h.dtype)).view(B, T, self.Hkv, self.hd)
        v = F.linear(h, wv.to(h.dtype))
        if ve is not None:
            v = v + ve.to(v.dtype)
        v = v.view(B, T, self.Hkv, self.hd)
        with torch.autocast(x.device.type, enabled=False):
            q, k = (rotary(rms_norm(t), *rope) for t in (q, k))
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = attend(q, k, v)
        if self.xsa:  # minus the component along v
            yg = wide(y).view(B, T, self.Hkv, self.H // self.Hkv, self.hd)
            vn = F.normalize(wide(v), dim=-1).unsqueeze(3)
            y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, self.H, self.hd)
        x = x + self.attn_scale * F.linear(y.reshape(B, T, D), wo.to(y.dtype))
        u = F.leaky_relu(F.linear(rms_norm(x) * self.ln, wup.to(x.dtype)), 0.5)
        u = u * u
        return x + self.mlp_scale * F.linear(u, wdown.to(u.dtype))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        L, D, V = cfg.num_layers, cfg.model_dim, cfg.vocab_size
        kv = cfg.num_kv_heads * cfg.head_dim
        self.tok_emb = nn.Embedding(V, D)
        self.bigram = BigramHash(cfg.bigram_vocab_size, cfg.bigram_dim, D) if cfg.bigram_vocab_size else None
        self.smear = nn.Parameter(torch.zeros(D))  # SmearGate logit per channel
        self.n_enc = L // 2
        self.skip_weights = nn.Parameter(torch.ones(min(self.n_enc, L - self.n_enc), D))
        # banks: [i] = layer i's Q / K / up / down, [L+i] = layer i's out-proj / V
        self.qo_bank = nn.Parameter(torch.empty(2 * L, D, D))
        self.kv_bank = nn.Parameter(torch.empty(2 * L, kv, D))
        self.mlp_up_bank = nn.Parameter(torch.empty(L, cfg.mlp_dim, D))
        self.mlp_down_bank = nn.Parameter(torch.empty(L, D, cfg.mlp_dim))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(L))
        self.ve_layers = tuple(cfg.ve_layers) if cfg.ve_enabled else ()
        self.ve_shared = ValueEmbedding(V, cfg.ve_dim, kv, len(self.ve_layers)) if self.ve_layers else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(D, V, bias=False)
        self.rotary = Rotary(cfg.rope_dims, cfg.rope_base, (cfg.train_seq_len, cfg.eval_seq_len))
        self.qat = False
        self._init_weights()

    def _init_weights(self):
        cfg, L = self.cfg, self.cfg.num_layers
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        with torch.no_grad():
            for i in range(L):
                for bank, j in ((self.qo_bank, i), (self.kv_bank, i), (self.kv_bank, L + i), (self.mlp_up_bank, i)):
                    nn.init.orthogonal_(bank[j])
            self.qo_bank[L:].zero_()
            self.mlp_down_bank.zero_()
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.embed.weight)
        if self.ve_shared is not None:
            nn.init.normal_(self.ve_shared.embed.weight, std=0.01)
        for m in self.modules():  # as the reference: proj orthogonal (not zero), untied head zero
            if isinstance(m, nn.Linear):
                (nn.init.zeros_ if m is self.lm_head else nn.init.orthogonal_)(m.weight)

    def banks(self):
        return (self.qo_bank, self.kv_bank, self.mlp_up_bank, self.mlp_down_bank)

    def forward_hidden(self, ids: Tensor) -> Tensor:
        """(B,T) ids -> (B,T,D) final hidden state. The only walk over the blocks."""
        L = self.cfg.num_layers
        qo, kv, up, down = (fake_quant_int6(b) for b in self.banks()) if self.training and self.qat else self.banks()
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        x = rms_norm(x)
        g = torch.sigmoid(self.smear).to(x.dtype)
        x = (1 - g) * x + g * F.pad(x[:, :-1], (0, 0, 1, 0))
        rope = self.rotary.tables(ids.size(1), ids.device)
        x0, skips = x, []
        ve = self.ve_shared(ids) if self.ve_shared is not None else None
        for i, blk in enumerate(self.blocks):
            if i >= self.n_enc and skips:
                x = x + self.skip_weights[i - self.n_enc].to(x.dtype) * skips.pop()
            ve_i = ve * self.ve_shared.ve_layer_scales[self.ve_layers.index(i)] if i in self.ve_layers else None
            x = blk(x, x0, qo[i], kv[i], kv[L + i], qo[L + i], up[i], down[i], self.rotary, rope, ve_i)
            if i < self.n_enc:
                skips.append(x)
        return rms_norm(x)

    def head_weight(self) -> Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def raw_logits(self, h: Tensor) -> Tensor:
        """(…,D) -> (…,V) fp32 logits before the softcap (linear in h)."""
        return F.linear(h.float(), self.head_weight().float())

    def softcap(self, z: Tensor) -> Tensor:
        c = self.cfg.logit_softcap
        return c * torch.tanh(z / c)

    def compute_logits(self, h: Tensor) -> Tensor:
        """(B,T,D) -> (B,T,V) fp32 softcapped logits: the head."""
        return self.softcap(self.raw_logits(h))

    def forward(self, ids: Tensor, targets: Tensor, nll=None) -> Tensor:
        """Mean training CE: head matmul in the autocast dtype, softcapped CE in fp32."""
        z = F.linear(self.forward_hidden(ids), self.head_weight())
        return (nll or softcap_nll)(z, targets, self.cfg.logit_softcap).mean()


def softcap_nll(z: Tensor, y: Tensor, c: float) -> Tensor:
    """Per-row CE of c*tanh(z/c) in fp32, as 2c*sigmoid(2z/c) (softmax ignores c)."""
    a = torch.sigmoid(wide(z) * (2 / c)) * (2 * c)
    return F.cross_entropy(a.flatten(0, -2), y.flatten(), reduction="none").view(y.shape)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- optim ----
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: Tensor, steps: int, dtype=torch.bfloat16) -> Tensor:
    """Quintic Newton-Schulz orthogonalization of (N, r, c) matrices in `dtype`."""
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


class ParallelMuon:
    """Muon on the banks, sharded over ranks (reduce-scatter, Newton-Schulz, all-gather)."""

    def __init__(self, banks: list[nn.Parameter], cfg: Config, rt: Runtime):
        self.banks, self.cfg, self.rt = banks, cfg, rt
        W = rt.world_size
        self.per = [-(-b.size(0) // W) for b in banks]
        self.bufs = [torch.zeros(p, *b.shape[1:], device=b.device) for p, b in zip(self.per, banks)]
        self.lr, self.momentum = cfg.matrix_lr, cfg.muon_momentum
        self._shards: list = []

    def launch(self) -> None:
        """Start averaging the bank grads; each rank receives its shard."""
        W, self._shards = self.rt.world_size, []
        for b, per in zip(self.banks, self.per):
            g = b.grad
            if W == 1:
                self._shards.append((g, None))
                continue
            dt = torch.bfloat16 if self.rt.amp else torch.float32  # bf16 under AMP, as the reference's collectives
            pad = torch.zeros(per * W, *g.shape[1:], device=g.device, dtype=dt)
            pad[: g.size(0)] = g
            out = torch.empty(per, *g.shape[1:], device=g.device, dtype=dt)
            self._shards.append((out, dist.reduce_scatter_tensor(out, pad, async_op=True)))

    def shard_sq_norm(self) -> Tensor:
        """Sum of squares of this rank's averaged shard grads."""
        total = torch.zeros((), device=self.rt.device, dtype=torch.float64)
        for i, (g, work) in enumerate(self._shards):
            if work is not None:
                work.wait()
                g.div_(self.rt.world_size)
                self._shards[i] = (g, None)
            total += g.double().square().sum()
        return total

    @torch.no_grad()
    def step(self, clip_scale: Tensor | None) -> None:
        W = self.rt.world_size
        gathers = []
        for b, per, buf, (g, _) in zip(self.banks, self.per, self.bufs, self._shards):
            g = g if clip_scale is None else g * clip_scale
            buf.mul_(self.momentum).add_(g)
            upd = newton_schulz(g + self.momentum * buf, self.cfg.muon_backend_steps,
                                torch.bfloat16 if self.rt.amp else torch.float32)
            if W == 1:
                gathers.append((b, upd, None))
                continue
            full = torch.empty(per * W, *upd.shape[1:], device=upd.device, dtype=upd.dtype)
            gathers.append((b, full, dist.all_gather_into_tensor(full, upd.contiguous(), async_op=True)))
        for b, full, work in gathers:
            if work is not None:
                work.wait()
            shape_scale = max(1.0, b.size(-2) / b.size(-1)) ** 0.5
            b.mul_(1 - self.lr * self.cfg.muon_wd).add_(full[: b.size(0)].to(b.dtype), alpha=-self.lr * shape_scale)

    def state_dict(self) -> dict:
        return {"bufs": [t.clone() for t in self.bufs]}

    def load_state_dict(self, sd: dict) -> None:
        for t, s in zip(self.bufs, sd["bufs"]):
            t.copy_(s)


class Optimizers:
    """Muon for the banks, AdamW for the rest; grads averaged, then clipped."""

    def __init__(self, model: GPT, cfg: Config, rt: Runtime):
        self.model, self.cfg, self.rt = model, cfg, rt
        banks = list(model.banks())
        bank_ids = {id(p) for p in banks}
        emb = [model.tok_emb.weight] + [m.embed.weight for m in (model.bigram, model.ve_shared) if m is not None]
        emb_ids = {id(p) for p in emb}
        head = [model.lm_head.weight] if model.lm_head is not None else []
        rest = [p for p in model.parameters() if id(p) not in bank_ids | emb_ids and not any(p is h for h in head)]
        groups = [dict(params=emb, lr=cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr),
                  dict(params=rest, lr=cfg.scalar_lr)] + ([dict(params=head, lr=cfg.head_lr, weight_decay=0.0)] if head else [])
        for g in groups:
            g["base_lr"] = g["lr"]
        self.adam = torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                      weight_decay=cfg.adam_wd, fused=True)  # one kernel, no .item() per step
        self.muon = ParallelMuon(banks, cfg, rt)
        self.replicated = [p for g in groups for p in g["params"]]
        self.comm = [(emb, torch.bfloat16 if rt.amp else torch.float32), (self.replicated[len(emb):], torch.float32)]

    def set_schedule(self, lr_mul: float, step: int) -> None:
        for g in self.adam.param_groups:
            g["lr"] = g["base_lr"] * lr_mul
        self.muon.lr = self.cfg.matrix_lr * lr_mul
        self.muon.momentum = muon_momentum_at(step, self.cfg)

    def step(self) -> Tensor:
        """Average, clip, step: no host sync. Returns the grad norm (0-dim tensor)."""
        self.muon.launch()
        grads = [p.grad for p in self.replicated if p.grad is not None]
        for params, dt in self.comm if self.rt.world_size > 1 else ():
            part = [p.grad for p in params if p.grad is not None]
            flat = torch.cat([g.reshape(-1).to(dt) for g in part]) if part else None
            if flat is not None:
                all_reduce_(flat).div_(self.rt.world_size)
                off = 0
                for g in part:
                    g.copy_(flat[off: off + g.numel()].view_as(g))
                    off += g.numel()
        sq = sum((g.double().square().sum() for g in grads), torch.zeros((), dtype=torch.float64, device=self.rt.device))
        bank_sq = self.muon.shard_sq_norm()
        total = (sq + all_reduce_(bank_sq.float()).double()).sqrt()  # fp32 on the wire
        clip = self.cfg.grad_clip_norm
        scale = (clip / (total + 1e-6)).clamp(max=1.0).float() if clip > 0 else None
        if scale is not None:
            torch._foreach_mul_(grads, scale)
        self.adam.step()
        self.muon.step(scale)
        return total

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"adam": copy.deepcopy(self.adam.state_dict()), "muon": self.muon.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.adam.load_state_dict(sd["adam"])
        self.muon.load_state_dict(sd["muon"])


def muon_momentum_at(step: int, cfg: Config) -> float:
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def lr_mul(step: int, elapsed_ms: float, cfg: Config) -> float:
    """Linear warmdown over the last WARMDOWN_ITERS (estimated on the wall clock)."""
    if cfg.warmdown_iters <= 0:
        return 1.0
    if cfg.max_wallclock_seconds <= 0:
        start = max(cfg.iterations - cfg.warmdown_iters, 0)
        return 1.0 if step < start else max(cfg.iterations - step, 0) / max(cfg.warmdown_iters, 1)
    warmdown_ms = cfg.warmdown_iters * elapsed_ms / max(step, 1)
    remaining = max(cfg.max_wallclock_seconds * 1000 - elapsed_ms, 0.0)
    return remaining / max(warmdown_ms, 1e-9) if remaining <= warmdown_ms else 1.0


# ---- train ----
class Logger:
    """Rank 0 prints each line and appends it to the log file."""

    def __init__(self, path: Path | None, is_main: bool):
        self.path, self.is_main = path, is_main
        if path and is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, "x", encoding="utf-8")  # never append a second run (run() refuses)
        else:
            self.fh = None

    def __call__(self, msg: str, console: bool = True) -> None:
        if not self.is_main:
            return
        if console:
            print(msg, flush=True)
        if self.fh:
            self.fh.write(msg + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh:
            self.fh.close()
            self.fh = None


class Interrupted(BaseException):
    pass


def _raise_interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, [p.detach().float() for p in self.params], alpha=1 - self.decay)

    @torch.no_grad()
    def apply(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))


def grad_accum_steps(cfg: Config, world: int) -> int:
    """8 micro-steps over the world (as the reference): the global batch is world-independent."""
    if world > 8 or 8 % world:
        raise UserError(f"world size {world} must divide 8 (the global batch TRAIN_BATCH_TOKENS={cfg.train_batch_tokens}"
                        " is split into 8 micro-batches): use 1, 2, 4 or 8 processes")
    accum = 8 // world
    if cfg.train_batch_tokens % (world * accum * cfg.train_seq_len):
        raise UserError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} is not divisible by 8 x TRAIN_SEQ_LEN="
                        f"{cfg.train_seq_len}: each of the 8 micro-batches needs whole sequences")
    return accum


def train(cfg: Config, rt: Runtime, model: GPT, val: "ValData", log: Logger, clock=time.perf_counter) -> dict:
    """Wall-clock-budgeted training, EMA applied at the end: {steps, train_seconds}."""
    accum = grad_accum_steps(cfg, rt.world_size)
    local_tokens = cfg.train_batch_tokens // (rt.world_size * accum)
    fwd, nll = train_loss_fn(model, rt)
    opt = Optimizers(model, cfg, rt)

    def micro_steps(loader) -> Tensor:
        total = torch.zeros((), device=rt.device)
        for _ in range(accum):
            x, y = loader.next_batch(local_tokens, cfg.train_seq_len)
            with amp_ctx(rt):
                loss = fwd(x, y, nll)
            (loss / accum).backward()
            total += loss.detach() / accum
        return total

    if cfg.warmup_steps:  # prime the graphs, then undo
        init_model, init_opt, t_warm = copy.deepcopy(model.state_dict()), opt.state_dict(), clock()
        loader = DistributedLoader(cfg, rt)
        for ws in range(cfg.warmup_steps):
            model.train()
            model.qat = cfg.qat_enabled or (cfg.late_qat and ws == cfg.warmup_steps - 1 > 0)  # late QAT's graph too
            opt.zero_grad()
            micro_steps(loader)
            opt.set_schedule(1.0, 0)
            opt.step()
            if cfg.warmup_steps <= 20 or (ws + 1) % 10 == 0 or ws + 1 == cfg.warmup_steps:
                log(f"warmup_step:{ws + 1}/{cfg.warmup_steps}")
        model.qat = cfg.qat_enabled
        if cfg.val_loss_every:
            rows = max(cfg.val_batch_size // (rt.world_size * cfg.train_seq_len), 1)
            evaluate_plain(model, ValData(val.tokens[: rows * rt.world_size * cfg.train_seq_len + 1], val.luts), cfg, rt)
        model.load_state_dict(init_model)
        opt.load_state_dict(init_opt)
        opt.zero_grad()
        log(f"warmup:done seconds:{clock() - t_warm:.1f}")
    loader = DistributedLoader(cfg, rt)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_enabled else None
    model.qat = cfg.qat_enabled
    train_ms, step, stop_after = 0.0, 0, False
    sync(rt)
    t0 = clock()
    while True:
        last = step == cfg.iterations or stop_after
        if last or (cfg.val_loss_every and step % cfg.val_loss_every == 0):
            sync(rt)
            train_ms += 1000 * (clock() - t0)
            vl, vb = evaluate_plain(model, val, cfg, rt)
            log(f"step:{step}/{cfg.iterations} val_loss:{vl:.4f} val_bpb:{vb:.4f} train_time:{train_ms:.0f}ms "
                f"step_avg:{train_ms / max(step, 1):.2f}ms")
            sync(rt)
            t0 = clock()
        if last:
            break
        mul = lr_mul(step, train_ms + 1000 * (clock() - t0), cfg)
        if cfg.late_qat and not model.qat and mul < cfg.late_qat_threshold:
            model.qat = True
            log(f"late_qat:enabled step:{step} scale:{mul:.4f}")
        model.train()
        opt.zero_grad()
        loss = micro_steps(loader)
        opt.set_schedule(mul, step)
        opt.step()
        if ema is not None:
            ema.update()
        step += 1
        elapsed = train_ms + 1000 * (clock() - t0)
        # the step's one host sync
        flag = (~loss.isfinite()).float() * 2 + float(cfg.max_wallclock_seconds > 0 and
                                                      elapsed >= 1000 * cfg.max_wallclock_seconds)
        flag = all_reduce_(flag, dist.ReduceOp.MAX).item()
        if flag >= 2:
            raise UserError(f"non-finite training loss ({loss.item()}) at step {step}: lower the learning rates "
                            "(MATRIX_LR, SCALAR_LR, TIED_EMBED_LR) or check the data")
        reached = flag == 1
        if step <= 10 or step % max(cfg.train_log_every, 1) == 0 or step == cfg.iterations or \
                (reached and not stop_after):  # the last training step is always logged
            log(f"step:{step}/{cfg.iterations} train_loss:{loss.item():.4f} train_time:{elapsed:.0f}ms "
                f"step_avg:{elapsed / step:.2f}ms")
        if reached and not stop_after:
            stop_after = True
            log(f"stopping_early: wallclock_cap train_time:{elapsed:.0f}ms step:{step}/{cfg.iterations}")
    model.qat = False
    if ema is not None:
        log("ema:applying EMA weights")
        ema.apply()
    return {"steps": step, "train_seconds": train_ms / 1000}


# ---- artifact ----
ARTIFACT_MAGIC = b"PGOLF-A1"
ARCH_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "tie_embeddings",
               "rope_base", "logit_softcap", "bigram_vocab_size", "bigram_dim", "xsa_last_n", "rope_dims",
               "ln_scale", "ve_enabled", "ve_dim", "ve_layers")
INT6_PERCENTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
INT8_CLIP_Q = 0.9999984
PASSTHROUGH_MAX = 65536
BANK_NAMES = {"qo_bank": ("attn.c_q", "attn.proj"), "kv_bank": ("attn.c_k", "attn.c_v"),
              "mlp_up_bank": ("mlp.fc", None), "mlp_down_bank": ("mlp.proj", None)}


class ArtifactError(UserError):
    pass


def unbank(sd: dict, L: int) -> dict:
    """Banks -> per-layer 2-D matrices (blocks.{i}.attn.c_q.weight, ...)."""
    out = {k: v for k, v in sd.items() if k not in BANK_NAMES}
    for bank, (lo, hi) in BANK_NAMES.items():
        for i in range(L):
            out[f"blocks.{i}.{lo}.weight"] = sd[bank][i]
            if hi:
                out[f"blocks.{i}.{hi}.weight"] = sd[bank][L + i]
    return out


def rebank(sd: dict, L: int) -> dict:
    out = {k: v for k, v in sd.items() if not (k.startswith("blocks.") and k.endswith(".weight") and
                                                (".attn." in k or ".mlp." in k))}
    for bank, (lo, hi) in BANK_NAMES.items():
        mats = [sd[f"blocks.{i}.{lo}.weight"] for i in range(L)]
        if hi:
            mats += [sd[f"blocks.{i}.{hi}.weight"] for i in range(L)]
        out[bank] = torch.stack(mats)
    return out


def quantize_rows(w: Tensor, qmax: int, percentiles, interpolation: str = "linear") -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantization at each row's least-error clip percentile."""
    w = w.float()
    a = w.abs()
    clips = torch.quantile(a, torch.tensor(percentiles, dtype=torch.float32), dim=1, interpolation=interpolation) \
        if len(percentiles) > 1 or percentiles[0] < 1 else a.amax(dim=1)[None]
    best_q, best_s, best_err = None, None, None
    for clip in clips:
        s = (clip / qmax).half().clamp_min(2.0 ** -24)
        q = (w / s.float()[:, None]).round().clamp(-qmax, qmax)
        err = (q * s.float()[:, None] - w).square().sum(1)
        if best_err is None:
            best_q, best_s, best_err = q, s, err
        else:
            better = err < best_err
            best_q = torch.where(better[:, None], q, best_q)
            best_s, best_err = torch.where(better, s, best_s), torch.minimum(err, best_err)
    return best_q.to(torch.int8), best_s


def coarsen_rows(w: Tensor, s: Tensor, step: float) -> tuple[Tensor, Tensor]:
    """int6 codes of w on a grid `step` times coarser than its row scales s."""
    s = (s.float() * step).half().clamp_min(2.0 ** -24)
    return (w.float() / s.float()[:, None]).round().clamp(-31, 31).to(torch.int8), s


def gptq_factors(H: Tensor) -> tuple[Tensor, Tensor]:
    """(U, order) for H (B,C,C): U the upper Cholesky factor of the damped H^-1."""
    H = H.double().clone()
    d = H.diagonal(dim1=1, dim2=2)
    d += 0.01 * d.mean(1, keepdim=True) + (d == 0)  # a dead input is rounded to nearest
    p = d.argsort(1, descending=True)
    H = H.gather(1, p[:, :, None].expand_as(H)).gather(2, p[:, None, :].expand_as(H))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float(), p


def gptq_codes(w: Tensor, s: Tensor, U: Tensor, p: Tensor, block: int = 128) -> Tensor:
    """int6 codes of w (B,R,C) on row grids s (B,R) by GPTQ, columns in order p."""
    p = p[:, None, :].expand(w.shape)
    W = w.float().gather(2, p).transpose(1, 2).contiguous()  # (B,C,R): a column is contiguous
    s, Q = s.float(), torch.empty_like(W)
    for a in range(0, W.size(1), block):
        b = min(a + block, W.size(1))
        for j in range(a, b):
            Q[:, j] = q = (W[:, j] / s).round().clamp(-31, 31)
            W[:, j] = e = (W[:, j] - q * s) / U[:, j, j, None]
            W[:, j + 1:b] -= U[:, j, j + 1:b, None] * e[:, None]
        W[:, b:] -= U[:, a:b, b:].transpose(1, 2) @ W[:, a:b]
    return torch.empty(w.shape, device=w.device).scatter_(2, p, Q.transpose(1, 2))


def int6_codes(mats: dict, step: float, gptq: list = ()) -> dict:
    """{name: (codes, scales)} at `step`: nearest, or GPTQ for the names in gptq."""
    out = {k: coarsen_rows(w, s, step) for k, (w, s) in mats.items()}
    for ks, U, p in gptq:
        s = torch.stack([out[k][1] for k in ks])
        q = gptq_codes(torch.stack([mats[k][0] for k in ks]).to(U.device), s.to(U.device), U, p)
        out.update((k, (qi.to(torch.int8).cpu(), si)) for k, qi, si in zip(ks, q, s))
    return out


def gptq_kinds(names, hessians: dict) -> list:
    """[(names, U, order)]: the matrices grouped by kind, with gptq_factors."""
    kinds = {}
    for k in names:
        kinds.setdefault(k.split(".", 2)[-1], []).append(k)  # blocks.{i}.attn.c_q.weight -> attn.c_q.weight
    return [(ks, *gptq_factors(torch.stack([hessians[k] for k in ks]))) for ks in kinds.values()]


def int6_bits(mats: dict, step: float, gptq: list = ()) -> float:
    """Order-0 entropy (bits) of the int6 codes of mats at `step`."""
    bits = 0.0
    for q, _ in int6_codes(mats, step, gptq).values():
        c = torch.bincount(q.view(-1).long() + 31, minlength=63).double()
        p = c[c > 0] / q.numel()
        bits -= q.numel() * float((p * p.log2()).sum())
    return bits


class HessianRecorder(TorchFunctionMode):
    """Adds fp64 X^T X of each F.linear input whose weight is in `weights` to h[name]."""

    def __init__(self, weights: dict):
        super().__init__()
        self.names, self.last = {w.data_ptr(): k for k, w in weights.items()}, (None, None)
        self.h = {k: w.new_zeros(w.size(1), w.size(1), dtype=torch.float64) for k, w in weights.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and args[1].data_ptr() in self.names:
            if args[0] is not self.last[0]:  # Q, K and V share an input
                x = args[0].detach().flatten(0, -2).double()
                self.last = (args[0], x.T @ x)
            self.h[self.names[args[1].data_ptr()]] += self.last[1]
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def calibrate(model: GPT, cfg: Config, rt: Runtime) -> dict:
    """{name: X^T X of its inputs, all-reduced} on the first GPTQ_CALIB_SEQS train sequences."""
    model.eval()
    T, (lo, hi) = cfg.train_seq_len, shard_range(cfg.gptq_calib_seqs, rt.rank, rt.world_size)
    if hi > lo:
        ids = torch.from_numpy(TokenStream(shard_files(cfg.data_path, "train"), cfg.vocab_size).take(hi * T)[lo * T:]
                               .astype(np.int64)).view(hi - lo, T).to(rt.device)
    rec = HessianRecorder(unbank({n: getattr(model, n).detach() for n in BANK_NAMES}, cfg.num_layers))
    if hi > lo:
        with rec:
            model.forward_hidden(ids)
    return {k: all_reduce_(h) for k, h in rec.h.items()}


def quantize_state(sd: dict, cfg: Config) -> tuple[dict, dict]:
    """int6 (attn/mlp), int8 (embeddings), fp16 (small tensors): (arrays, meta)."""
    keep32 = tuple(p for p in cfg.control_tensor_name_patterns.split(",") if p)
    arrays, meta = {}, {}
    for name, t in unbank(sd, cfg.num_layers).items():
        t = t.detach().cpu()
        if t.numel() <= PASSTHROUGH_MAX or not t.is_floating_point():
            kind = "fp32" if any(p in name for p in keep32) else "fp16"
            arrays[name] = t.float().numpy() if kind == "fp32" else t.half().numpy()
        elif ".attn." in name or ".mlp." in name:
            kind = "int6"
            q, s = quantize_rows(t, 31, INT6_PERCENTILES)
            arrays[name + ".q"], arrays[name + ".scale"] = q.numpy(), s.numpy()
        else:
            kind = "int8"
            q, s = quantize_rows(t, 127, (INT8_CLIP_Q,), "higher")
            arrays[name + ".q"], arrays[name + ".scale"] = q.numpy(), s.numpy()
        meta[name] = {"kind": kind, "shape": list(t.shape)}
    return arrays, meta


def dequantize_state(arrays: dict, meta: dict, cfg: Config) -> dict:
    sd = {}
    for name, m in meta.items():
        if m["kind"] in ("int6", "int8"):
            q, s = torch.tensor(arrays[name + ".q"]).float(), torch.tensor(arrays[name + ".scale"]).float()
            sd[name] = (q * s[:, None]).view(m["shape"])
        else:
            sd[name] = torch.tensor(arrays[name]).float().view(m["shape"])
    return rebank(sd, cfg.num_layers)


def _compressors() -> dict:
    out = {"lzma": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)}
    if zstandard is not None:
        out["zstd"] = (lambda b: zstandard.ZstdCompressor(level=22).compress(b),
                       lambda b: zstandard.ZstdDecompressor().decompress(b))
    if brotli is not None:
        out["brotli"] = (lambda b: brotli.compress(b, quality=11, lgwin=24), brotli.decompress)
    return out


def pack_artifact(arrays: dict, meta: dict, arch: dict, only: str = "") -> tuple[bytes, str, dict]:
    """Compress with every compressor (or `only`); keep the smallest: (blob, method, sizes)."""
    header = json.dumps({"meta": meta, "arch": arch,
                         "arrays": [[k, str(v.dtype), list(v.shape)] for k, v in arrays.items()]}).encode()
    payload = len(header).to_bytes(4, "little") + header + b"".join(np.ascontiguousarray(v).tobytes()
                                                                      for v in arrays.values())
    from concurrent.futures import ThreadPoolExecutor
    comps = _compressors()
    comps = {only: comps[only]} if only else comps
    with ThreadPoolExecutor(len(comps)) as ex:
        results = dict(zip(comps, ex.map(lambda c: c[0](payload), comps.values())))
    method = min(results, key=lambda k: len(results[k]))
    names = sorted(comps)
    blob = (ARTIFACT_MAGIC + bytes([names.index(method)]) + len(names).to_bytes(1, "little") +
            b"".join(n.encode().ljust(8, b"\0") for n in names) + zlib.crc32(payload).to_bytes(4, "little") +
            results[method])
    return blob, method, {k: len(v) for k, v in results.items()}


def unpack_artifact(blob: bytes, path: str = "artifact") -> tuple[dict, dict, dict]:
    if not blob.startswith(ARTIFACT_MAGIC):
        raise ArtifactError(f"{path}: not an artifact of this program (bad magic)")
    try:
        idx, n = blob[len(ARTIFACT_MAGIC)], blob[len(ARTIFACT_MAGIC) + 1]
        off = len(ARTIFACT_MAGIC) + 2
        names = [blob[off + 8 * i: off + 8 * i + 8].rstrip(b"\0").decode() for i in range(n)]
        off += 8 * n
        if len(blob) <= off + 4:
            raise ArtifactError(f"{path}: truncated artifact ({len(blob)} bytes: the header is incomplete)")
        crc = int.from_bytes(blob[off: off + 4], "little")
        method = names[idx]
        comps = _compressors()
        if method not in comps:
            raise ArtifactError(f"{path}: compressed with {method}, which is not installed (pip install -r requirements.txt)")
        payload = comps[method][1](blob[off + 4:])
    except ArtifactError:
        raise
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"{path}: truncated or corrupted artifact ({len(blob)} bytes; {why})") from None
    if zlib.crc32(payload) != crc:
        raise ArtifactError(f"{path}: corrupted artifact (checksum mismatch)")
    try:
        hl = int.from_bytes(payload[:4], "little")
        header = json.loads(payload[4: 4 + hl])
        arrays, off = {}, 4 + hl
        for name, dtype, shape in header["arrays"]:
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            arrays[name] = np.frombuffer(payload, dtype=dtype, count=int(np.prod(shape)), offset=off).reshape(shape)
            off += n
    except Exception as e:
        raise ArtifactError(f"{path}: corrupted artifact payload ({type(e).__name__})") from None
    return arrays, header["meta"], header["arch"]


def atomic_write(path: Path, data: bytes) -> None:
    """Temp name, fsync, rename: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def model_budget(cfg: Config, code_bytes: int) -> int:
    """Model bytes left by ARTIFACT_TARGET_BYTES after the code (0: no limit)."""
    return max(cfg.artifact_target_bytes - code_bytes, 0)


def export_model(model: GPT, cfg: Config, budget: int = 0, hessians: dict | None = None
                 ) -> tuple[bytes, str, dict, float]:
    """Quantize and compress; over `budget` bytes every int6 matrix moves to one coarser grid `step`.
    Returns (blob, method, sizes at step 1, step)."""
    sd = model.state_dict()
    arrays, meta = quantize_state(sd, cfg)
    arch = {k: getattr(cfg, k) for k in ARCH_FIELDS}
    mats = {k: (w.detach().cpu(), torch.from_numpy(arrays[k + ".scale"])) for k, w in unbank(sd, cfg.num_layers).items()
            if meta[k]["kind"] == "int6"}
    gptq = gptq_kinds(mats, hessians) if hessians is not None else []

    def set_codes(step: float) -> None:
        for k, (q, s) in int6_codes(mats, step, gptq).items():
            arrays[k + ".q"], arrays[k + ".scale"] = q.numpy(), s.numpy()
    if gptq:
        set_codes(1.0)
    blob, method, sizes = pack_artifact(arrays, meta, arch)
    step = prev = 1.0
    goal = budget
    for _ in range(4 if mats and budget else 0):
        if len(blob) <= budget:
            break
        need, base = 8 * (len(blob) - goal), int6_bits(mats, step, gptq)
        lo, hi = step, 32.0
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if base - int6_bits(mats, mid, gptq) >= need else (mid, hi)
        step = hi
        set_codes(step)
        coarser = pack_artifact(arrays, meta, arch, only=method)[0]
        if len(coarser) >= len(blob):
            step = prev
            break
        blob, prev = coarser, step
        goal -= max(len(blob) - budget, 0) + budget // 2000  # the prediction missed: aim lower next time
    return blob, method, sizes, step


def export_ranks(model: GPT, cfg: Config, rt: Runtime, budget: int, hessians: dict | None) -> tuple:
    """export_model's result on every rank; with GPTQ, rank 0's, broadcast."""
    box = [export_model(model, cfg, budget, hessians) if hessians is None or rt.is_main else None]
    if hessians is not None and rt.distributed:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def load_artifact(path: str, cfg: Config) -> tuple[GPT, Config]:
    """A fresh model from an artifact; its architecture overrides the config's."""
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"LOAD_ARTIFACT {path}: cannot read ({e.strerror})") from None
    arrays, meta, arch = unpack_artifact(blob, path)
    arch = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}
    cfg = dataclasses.replace(cfg, **arch)
    model = GPT(cfg)
    try:
        model.load_state_dict(dequantize_state(arrays, meta, cfg), strict=True)
    except (RuntimeError, KeyError) as e:
        raise ArtifactError(f"{path}: artifact does not match the model ({str(e).splitlines()[0]})") from None
    return model, cfg


def code_bytes() -> int:
    return len(Path(__file__).read_bytes())


# ---- eval ----
@dataclass
class ValData:
    tokens: Tensor  # int64 (N+1,) on CPU: N targets
    luts: ByteLuts | None  # None: no byte accounting (score_stream)


def window_plan(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows (start, length, score_from) over n targets, each scored once."""
    if n <= seq_len:
        return [(0, n, 0)]
    plan, end = [(0, seq_len, 0)], seq_len
    while end < n:
        new_end = min(end + stride, n)
        plan.append((new_end - seq_len, seq_len, end - (new_end - seq_len)))
        end = new_end
    return plan


def pass_batch(n_windows: int, batch_seqs: int, world: int) -> int:
    """Windows per scoring batch: the same for a whole pass (the last padded)."""
    return min(batch_seqs, -(-n_windows // world))


def window_chunks(plan, chunk_tokens: int) -> list[int]:
    """TTT chunk of each window: the chunk of its first scored position."""
    return [(ws + lo) // chunk_tokens for ws, _, lo in plan]


def ttt_rows(lo: int, hi: int, seq_len: int) -> list[tuple[int, int]]:
    """Non-overlapping training rows (start, length) covering positions [lo, hi)."""
    return [(s, min(seq_len, hi - s)) for s in range(lo, hi, seq_len)]


def slot_weights(los: Tensor, T: int, mode: str, context: int, stride: int) -> Tensor:
    """Fit weights (G,F) of each group's first F rows, sum 1 per group (los: first scored rows, T: padding; README:
    SLOT). batch: one group, F = B*T. causal: F = T - stride, the `context` (0: all) rows before min(los, F)."""
    lo, n = los[:, None], T if mode == "batch" else max(T - stride, 0)
    pos, end = torch.arange(n, device=los.device)[None, :], lo.clamp_max(n)
    if mode == "batch":
        fit = (pos < T - 1) & (lo < T)
        return (fit / fit.sum().clamp_min(1)).view(1, -1)
    fit = (pos < end) & (pos >= end - (context or T)) & (lo < T)
    return fit / fit.sum(1, keepdim=True).clamp_min(1)


def softcap_rows(P: Tensor, hot: Tensor, shift: Tensor | None, c: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(s, e, S, NLL) of softcap(z + shift): s = sigmoid(2(z+shift)/c) = 1/(1+PQ), P = exp(-2z/c) (G,N,V), Q =
    exp(-2shift/c) (G,V); e = exp(2c(s-1)) <= 1 (no max); S = sum e; NLL = log S - 2c(s_y - 1)."""
    s = 1 / (1 + (P if shift is None else P * torch.exp((shift * (-2 / c)).clamp(-80, 43))[:, None, :]))
    e = torch.exp((s - 1) * (2 * c))
    S = e.sum(-1)
    return s, e, S, torch.log(S) - ((s * hot).sum(-1) - 1) * (2 * c)


def logit_rows(z: Tensor, y: Tensor, G: int, c: float) -> tuple[Tensor, Tensor, tuple]:
    """Raw logits z in G groups: P (G,N,V), targets' one-hot, softcap_rows at shift 0."""
    V = z.size(-1)
    P = torch.exp((z * (-2 / c)).clamp(-80, 43)).view(G, -1, V)  # PQ stays finite
    hot = (y.int()[..., None] == torch.arange(V, device=z.device, dtype=torch.int32)).view(G, -1, V)
    return P, hot, softcap_rows(P, hot, None, c)


def fit_delta(z: Tensor, y: Tensor, wt: Tensor, W: Tensor, cfg: Config, rows: tuple | None = None) -> Tensor:
    """AdamW on one delta per group: min sum wt CE(softcap(z + W delta), y) (README: SLOT); rows: logit_rows."""
    c, b1, b2, lr = cfg.logit_softcap, cfg.slot_beta1, cfg.slot_beta2, cfg.slot_lr
    G, n = wt.shape
    P, hot, (s, e, S, _) = rows or logit_rows(z, y, G, c)
    P, hot, s, e, S = P[:, :n], hot[:, :n], s[:, :n], e[:, :n], S[:, :n]
    k = math.gcd(n, 8)
    W, wt = W.to(P.dtype), (4 * wt).to(P.dtype)
    delta = P.new_zeros(G, W.size(1))
    m, v = torch.zeros_like(delta), torch.zeros_like(delta)
    for t in range(1, cfg.slot_steps + 1):
        if t > 1:
            s, e, S, _ = softcap_rows(P, hot, F.linear(delta, W), c)
        gu = ((e * (wt / S)[..., None] - hot * wt[..., None]) * (s - s * s)).view(G, n // k, k, P.size(-1))
        gu = gu.sum(2).sum(1)  # dL/d(W delta) (G,V), fixed order: k rows, then blocks (README: SLOT)
        g = gu @ W  # dL/d delta (G,D)
        m = m * b1 + g * (1 - b1)
        v = v * b2 + g * g * (1 - b2)
        delta = delta * (1 - lr * cfg.slot_wd) - lr / (1 - b1 ** t) * m / (v.sqrt() / math.sqrt(1 - b2 ** t) + cfg.slot_eps)
    return delta


def head_nll(h: Tensor, W: Tensor, y: Tensor, wt: Tensor | None, cfg: Config) -> tuple[Tensor, Tensor | None]:
    """Per-position NLL (B,T) on h (B,T,D): plain and, with SLOT fit weights wt (G,N), with the fitted delta."""
    c, z = cfg.logit_softcap, F.linear(h, W)
    rows = logit_rows(z, y, 1 if wt is None else wt.size(0), c)
    plain = rows[2][3].view(y.shape)
    if wt is None:
        return plain, None
    delta = fit_delta(z, y, wt, W, cfg, rows)
    return plain, softcap_rows(rows[0], rows[1], F.linear(delta, W), c)[3].view(y.shape)


def score_batch(model: GPT, hidden_fn, x: Tensor, y: Tensor, los: Tensor, cfg: Config, rt: Runtime,
                slot: bool) -> tuple[Tensor, dict]:
    """One trunk pass: (scored mask, {variant: (B,T) fp64 NLL, 0 where unscored})."""
    with torch.no_grad():
        with amp_ctx(rt):
            h = hidden_fn(x)
        h = wide(h)  # a float64 model stays float64
        wt = slot_weights(los, x.size(1), cfg.slot_mode, cfg.slot_context, cfg.eval_stride) if slot else None
        nll = rt.fn(head_nll)(h, model.head_weight().to(h.dtype), y, wt, cfg)
    scored = torch.arange(x.size(1), device=x.device)[None, :] >= los[:, None]
    return scored, {v: torch.where(scored, t, 0).double() for v, t in zip(("plain", "slot"), nll) if t is not None}


def ttt_train_chunk(model: GPT, opt, params, frozen_banks, val: ValData, lo: int, hi: int, lr: float, cfg: Config,
                    rt: Runtime) -> None:
    """TTT on positions [lo, hi), all scored already: rows split over ranks, SGD."""
    rows = ttt_rows(lo, hi, cfg.eval_seq_len)
    a, b = shard_range(len(rows), rt.rank, rt.world_size)
    mine = rows[a:b]
    n_batches = max(-(-len(rows) // (cfg.ttt_batch_seqs * rt.world_size)), 1)  # equal on every rank
    for g in opt.param_groups:
        g["lr"] = lr
    fwd, nll = train_loss_fn(model, rt)
    model.train()
    for _ in range(cfg.ttt_epochs):
        for bi in range(n_batches):
            part = mine[bi * cfg.ttt_batch_seqs: (bi + 1) * cfg.ttt_batch_seqs]
            opt.zero_grad(set_to_none=False)
            by_len: dict = {}
            for s, n in part:
                by_len.setdefault(n, []).append(s)
            total = sum(n for _, n in part)
            for n, starts in by_len.items():
                xy = torch.stack([val.tokens[s: s + n + 1] for s in starts]).to(rt.device)
                with amp_ctx(rt):
                    loss = fwd(xy[:, :-1], xy[:, 1:], nll)
                (loss * (len(starts) * n / max(total, 1))).backward()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if rt.world_size > 1:
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                counts = torch.tensor([float(total)], device=rt.device)
                all_reduce_(counts)
                all_reduce_(flat.mul_(total / max(counts.item(), 1)))
                off = 0
                for p in params:
                    p.grad.copy_(flat[off: off + p.numel()].view_as(p))
                    off += p.numel()
            for bank, k in frozen_banks:
                bank.grad[k] = 0
            if cfg.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
            opt.step()
    model.eval()


def eval_pass(model: GPT, val: ValData, cfg: Config, rt: Runtime, *, seq_len: int, stride: int, batch_seqs: int,
              slot: bool, ttt: bool, collect: bool = False, log: Logger | None = None, label: str = "",
              rank: int | None = None, world: int | None = None) -> dict:
    """One left-to-right scoring pass: sliding windows; with TTT, each chunk scored, then trained on.
    Returns {variant: {nll, tokens, bytes, loss, bpb}}."""
    rank = rt.rank if rank is None else rank
    world = rt.world_size if world is None else world
    tokens = val.tokens
    n = tokens.numel() - 1
    plan = window_plan(n, seq_len, stride)
    C = cfg.ttt_chunk_tokens if ttt else max(n, 1)
    n_chunks = -(-n // C)
    by_chunk: list[list] = [[] for _ in range(n_chunks)]
    for w, ch in zip(plan, window_chunks(plan, C)):
        by_chunk[min(ch, n_chunks - 1)].append(w)
    variants = ["plain"] + (["slot"] if slot else [])
    ctw = cfg.ctw_weight > 0
    if ctw:
        t_ctw = time.perf_counter()
        ctw_lp = ctw_log_probs(tokens.to(rt.device), cfg.vocab_size, cfg.ctw_depth, cfg.ctw_alpha)
        variants += [ctw_variant(v) for v in variants]
        if log:
            log(f"ctw: depth={cfg.ctw_depth} alpha={cfg.ctw_alpha or 1 / cfg.vocab_size:g} weight={cfg.ctw_weight} "
                f"mix=linear(fixed) tokens={n} "
                f"time={time.perf_counter() - t_ctw:.2f}s")
    sums = torch.zeros(len(variants), 3, dtype=torch.float64, device=rt.device)  # read once, at the end
    streams = {v: torch.full((n,), float("nan"), dtype=torch.float64) for v in variants} if collect else None
    hidden_fn = maybe_compile(model.forward_hidden, rt)
    luts = val.luts.to(rt.device) if val.luts is not None else None
    if ttt:
        saved = copy.deepcopy(model.state_dict())
        frozen = [f"blocks.{i}." for i in range(cfg.ttt_freeze_blocks)]
        params = [p for name, p in model.named_parameters() if not any(name.startswith(f) for f in frozen)]
        for name, p in model.named_parameters():
            p.requires_grad_(not any(name.startswith(f) for f in frozen))
        L = cfg.num_layers
        frozen_banks = [(b, list(range(cfg.ttt_freeze_blocks)) + list(range(L, L + cfg.ttt_freeze_blocks)))
                        for b in (model.qo_bank, model.kv_bank)] + \
                       [(b, list(range(cfg.ttt_freeze_blocks))) for b in (model.mlp_up_bank, model.mlp_down_bank)]
        frozen_banks = [(b, k) for b, k in frozen_banks if k]
        opt = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
        if log:
            log(f"ttt_sliding:start chunks={n_chunks} chunk_tokens={C} total_windows={len(plan)} stride={stride} "
                f"ttt_lr={cfg.ttt_lr} ttt_epochs={cfg.ttt_epochs} freeze_blocks={cfg.ttt_freeze_blocks}")
            n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) + \
                sum(len(k) * b[0].numel() for b, k in frozen_banks)
            log(f"ttt_sliding:params unfrozen={count_params(model) - n_frozen} frozen={n_frozen}")
    t0 = time.perf_counter()
    model.eval()
    B = pass_batch(len(plan), batch_seqs, world)
    for ci, wins in enumerate(by_chunk):
        a, b = shard_range(len(wins), rank, world)
        mine = wins[a:b]
        for bi in range(0, len(mine), B):
            batch = mine[bi: bi + B]
            T, pad = batch[0][1], B - len(batch)  # padding: fits and scores nothing
            idx = torch.tensor([ws for ws, _, _ in batch] + [batch[0][0]] * pad)[:, None] + torch.arange(T + 1)
            xy = tokens[idx].to(rt.device)
            x, y = xy[:, :-1], xy[:, 1:]
            los = torch.tensor([lo for _, _, lo in batch] + [T] * pad, device=rt.device)
            scored, nlls = score_batch(model, hidden_fn, x, y, los, cfg, rt, slot)  # masked sums: no host sync
            pos = idx[:, :-1].to(rt.device)  # stream index of each target
            if ctw:
                nlls.update({ctw_variant(v): torch.where(scored, ctw_mix(nlls[v], ctw_lp[pos], cfg.ctw_weight), 0)
                             for v in list(nlls)})
            nbytes = (luts.target_bytes(x, y) * scored).sum() if luts is not None else 0
            for vi, v in enumerate(variants):
                sums[vi, 0] += nlls[v].sum()
                sums[vi, 1] += scored.sum()
                sums[vi, 2] += nbytes
                if collect:
                    streams[v][pos[scored].cpu()] = nlls[v][scored].cpu()
        if ttt and ci < n_chunks - 1:
            lr = cfg.ttt_lr * 0.5 * (1 + math.cos(math.pi * ci / max(n_chunks - 1, 1)))
            ttt_train_chunk(model, opt, params, frozen_banks, val, ci * C, min((ci + 1) * C, n), lr, cfg, rt)
        if ttt and log and (ci % 10 == 0 or ci == n_chunks - 1):
            s = all_reduce_(sums.clone()).cpu()
            bpb = s[-1, 0] / math.log(2) / max(s[-1, 2].item(), 1)
            log(f"  ttt_chunk [{ci + 1}/{n_chunks}] bpb={bpb:.6f} time={time.perf_counter() - t0:.1f}s")
    if ttt:
        model.load_state_dict(saved)
        for p in model.parameters():
            p.requires_grad_(True)
    sums = all_reduce_(sums).cpu()
    out = {}
    for vi, v in enumerate(variants):
        nll, tok, nb = sums[vi].tolist()
        loss = nll / max(tok, 1)
        out[v] = {"nll": nll, "tokens": int(tok), "bytes": int(nb), "loss": loss,
                  "bpb": nll / math.log(2) / nb if nb else float("nan")}
        if collect:
            out[v]["nll_stream"] = streams[v]
    return out


def evaluate_plain(model: GPT, val: ValData, cfg: Config, rt: Runtime) -> tuple[float, float]:
    """Non-overlapping TRAIN_SEQ_LEN rows (roundtrip: EVAL_SEQ_LEN), every target once."""
    rows = max(cfg.val_batch_size // (rt.world_size * cfg.train_seq_len), 1)
    r = eval_pass(model, val, dataclasses.replace(cfg, ctw_weight=0.0), rt, seq_len=cfg.train_seq_len,
                  stride=cfg.train_seq_len, batch_seqs=rows, slot=False, ttt=False)["plain"]
    model.train()
    return r["loss"], r["bpb"]


def final_variant(cfg: Config) -> str:
    v = "slot" if cfg.slot_enabled else "plain"
    return ctw_variant(v) if cfg.ctw_weight > 0 else v


def score_stream(model: GPT, tokens: Tensor, cfg: Config) -> Tensor:
    """float64 NLL of every target, by the final evaluation's path on one process."""
    device = next(model.parameters()).device
    amp = cfg.amp and (device.type == "cuda" or cpu_bf16_is_fast())  # as setup_runtime decides it
    rt = Runtime(device=device, amp=amp, compile=False, compile_head=cfg.compile_head)
    r = eval_pass(model, ValData(tokens.long().cpu(), None), cfg, rt, seq_len=cfg.eval_seq_len,
                  stride=cfg.eval_stride, batch_seqs=cfg.eval_batch_seqs, slot=cfg.slot_enabled,
                  ttt=cfg.ttt_enabled, collect=True)
    return r[final_variant(cfg)]["nll_stream"]


def stage_compliance(variant: str, cfg: Config) -> str:
    """'causal' when scores depend only on the artifact and the strict prefix."""
    variant = "plain" if variant == "ctw" else variant.removesuffix("_ctw")
    if variant == "slot" and cfg.slot_mode == "batch":
        return "non-causal"
    return "causal"


def _sorted_groups(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Stable sort: (order, first), first[i] = start of sorted entry i's group."""
    order = torch.argsort(keys, stable=True)
    sk = keys[order]
    idx = torch.arange(keys.numel(), device=keys.device)
    start = torch.ones_like(sk, dtype=torch.bool)
    start[1:] = sk[1:] != sk[:-1]
    return order, torch.cummax(torch.where(start, idx, 0), 0).values


def _earlier_count(keys: Tensor) -> Tensor:
    """For each position t: the number of positions < t with the same key."""
    order, first = _sorted_groups(keys)
    out = torch.empty_like(keys)
    out[order] = torch.arange(keys.numel(), device=keys.device) - first
    return out


def _earlier_sum(order: Tensor, first: Tensor, v: Tensor) -> Tensor:
    """Per position: sum of v over earlier positions of its group (scan by doubling)."""
    sv = v[order]
    idx = torch.arange(v.numel(), device=v.device)
    acc = torch.zeros_like(sv)
    acc[1:] = sv[:-1]
    acc = torch.where(idx > first, acc, torch.zeros_like(acc))  # e[i] = v[i-1] inside a group, 0 at its start
    span, s = int((idx - first).max().item()) + 1, 1
    while s < span:
        sh = torch.zeros_like(acc)
        sh[s:] = acc[:-s]
        acc = acc + torch.where(idx - s >= first, sh, torch.zeros_like(sh))
        s *= 2
    out = torch.empty_like(v)
    out[order] = acc
    return out


def ctw_log_probs(tokens: Tensor, vocab: int, depth: int, alpha: float = 0.0) -> Tensor:
    """Context Tree Weighting (README: CTW): float64 log p(tokens[t] | tokens[:t]), t = 1..N, from
    counts over earlier targets only. Vectorised: sorts and segmented scans."""
    s = tokens.long()
    n, dev = s.numel() - 1, s.device
    alpha = alpha or 1.0 / vocab
    if n <= 0:
        return torch.zeros(0, dtype=torch.float64, device=dev)
    y = s[1:]
    padded = torch.cat([torch.full((depth,), vocab, dtype=torch.long, device=dev), s[:-1]])  # padded[depth+t] = s[t]
    ctx = [torch.zeros(n, dtype=torch.long, device=dev)]
    for j in range(1, depth + 1):  # token j back from target t (= s[t+1]) is s[t+1-j] = padded[depth + t + 1 - j]
        sym = padded[depth + 1 - j: depth + 1 - j + n]
        ctx.append(torch.unique(ctx[-1] * (vocab + 1) + sym, return_inverse=True)[1])
    lp = None
    while ctx:  # leaf (order depth) to root (order 0), one order's sorts alive at a time
        c = ctx.pop()
        order, first = _sorted_groups(c)
        nc = torch.empty_like(c)
        nc[order] = torch.arange(n, device=dev) - first
        ny = _earlier_count(c * vocab + y)
        log_kt = torch.log(ny.double() + alpha) - torch.log(nc.double() + vocab * alpha)
        if lp is None:
            lp = log_kt
        else:
            lb = _earlier_sum(order, first, log_kt - lp)
            lp = torch.logaddexp(F.logsigmoid(lb) + log_kt, F.logsigmoid(-lb) + lp)
    return lp


def ctw_variant(v: str) -> str:
    """plain -> ctw, slot -> slot_ctw."""
    return "ctw" if v == "plain" else v + "_ctw"


def ctw_mix(nll: Tensor, ctw_lp: Tensor, w: float) -> Tensor:
    """NLL under (1 - w) p_model + w p_ctw, in log space."""
    return -torch.logaddexp(math.log1p(-w) - nll, math.log(w) + ctw_lp.to(nll.dtype))


def estimate_eval_seconds(model: GPT, val: ValData, cfg: Config, rt: Runtime) -> float:
    """Extrapolate the sliding and TTT passes from one timed scoring batch."""
    n = val.tokens.numel() - 1
    T, windows = min(cfg.eval_seq_len, n), len(window_plan(n, cfg.eval_seq_len, cfg.eval_stride))
    B = pass_batch(windows, cfg.eval_batch_seqs, rt.world_size)
    x = val.tokens[: T + 1].repeat(B, 1).to(rt.device)
    los = torch.full((B,), max(T - cfg.eval_stride, 0), device=rt.device)
    hidden_fn = maybe_compile(model.forward_hidden, rt)
    for i in range(2):  # warm, then timed
        sync(rt)
        t = time.perf_counter()
        score_batch(model, hidden_fn, x[:, :-1], x[:, 1:], los, cfg, rt, cfg.slot_enabled)
        sync(rt)
    per_token = (time.perf_counter() - t) / (B * T)
    scoring = windows * T * per_token / rt.world_size
    ttt = scoring + 3 * cfg.ttt_epochs * n * per_token / rt.world_size if cfg.ttt_enabled else 0.0
    return scoring + ttt


# ---- main ----
def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def run(env: dict) -> dict:
    cfg = Config.from_env(env)
    run_id = cfg.run_id or str(uuid.uuid4())
    out_dir = Path(cfg.out_dir)
    if (out_dir / f"{run_id}.txt").exists():
        raise UserError(f"{out_dir / (run_id + '.txt')} exists (an earlier run with RUN_ID={run_id}): set another "
                        "RUN_ID, or unset it for a fresh one")
    rt = setup_runtime(cfg, env)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    loaded = load_artifact(cfg.load_artifact, cfg) if cfg.eval_only else None  # fail before OUT_DIR is touched
    source = Path(__file__).read_bytes()
    log = Logger(out_dir / f"{run_id}.txt", rt.is_main)
    try:
        return _run(cfg, rt, env, run_id, out_dir, loaded, source, log)
    finally:
        log.close()


def _run(cfg: Config, rt: Runtime, env: dict, run_id: str, out_dir: Path, loaded, source: bytes, log: Logger) -> dict:
    log(f"logs/run_id:{run_id} log:{out_dir / (run_id + '.txt')}")
    try:
        code = _SRC  # noqa: F821  set by a wrapper (tools/pack_code.py): the source it executes
    except NameError:
        code = source
    log(code.decode("utf-8"), console=False)
    log(f"python:{sys.version.split()[0]} torch:{torch.__version__} device:{rt.device} world_size:{rt.world_size} "
        f"attention:{_flash[0][0] if _flash and rt.cuda else 'sdpa'} amp:{int(rt.amp)} compile:{int(rt.compile)} "
        f"compile_head:{int(rt.compile_head)} cuda:{torch.version.cuda}")
    log(f"code:{Path(__file__).name} bytes:{len(source)} sha256:{hashlib.sha256(source).hexdigest()} "
        f"packed:{int(code is not source)}")
    for w in env_warnings(env) + [f"WARNING: {n}: attention falls back to SDPA" for n in FLASH_NOTES]:
        log(w)
    log("config " + " ".join(f"{f.name.upper()}={_format_value(getattr(cfg, f.name))}" for f in fields(cfg)))
    luts = load_tokenizer_luts(cfg)
    val = ValData(load_val_tokens(cfg), luts)
    n_val = val.tokens.numel() - 1
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={cfg.tokenizer_path}")
    log(f"val_loader:shards pattern={os.path.join(cfg.data_path, 'fineweb_val_*.bin')} tokens:{n_val}")
    summary = {"run_id": run_id, "device": str(rt.device), "world_size": rt.world_size, "preset": cfg.preset,
               "val_tokens": n_val, "stages": {}}
    artifact_path = Path(cfg.load_artifact) if cfg.eval_only else out_dir / f"{run_id}.ptz"
    if cfg.eval_only:
        model, cfg = loaded
        blob_len = artifact_path.stat().st_size
        summary.update(steps=0, train_seconds=0.0, mode="eval_only", artifact=str(artifact_path))
        log(f"eval_only: loaded {artifact_path} ({blob_len} bytes)")
        model = model.to(rt.device)
    else:
        train_files = shard_files(cfg.data_path, "train")
        if not train_files:
            raise DataError(f"DATA_PATH {cfg.data_path} has no fineweb_train_*.bin shards: get the data (see README)")
        for p in train_files:
            read_shard_header(p)
        log(f"train_loader:dataset:{Path(cfg.data_path).name} train_shards:{len(train_files)}")
        model = GPT(cfg).to(rt.device)
        accum = grad_accum_steps(cfg, rt.world_size)
        log(f"model_params:{count_params(model)}")
        log(f"XSA:last_{cfg.xsa_last_n} active_layers:{[i for i, b in enumerate(model.blocks) if b.xsa]}")
        log(f"world_size:{rt.world_size} grad_accum_steps:{accum}")
        log(f"attention_mode:gqa num_heads:{cfg.num_heads} num_kv_heads:{cfg.num_kv_heads}")
        log(f"tie_embeddings:{cfg.tie_embeddings} embed_lr:{cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr} "
            f"head_lr:{0.0 if cfg.tie_embeddings else cfg.head_lr} matrix_lr:{cfg.matrix_lr} scalar_lr:{cfg.scalar_lr}")
        log(f"train_batch_tokens:{cfg.train_batch_tokens} train_seq_len:{cfg.train_seq_len} iterations:{cfg.iterations} "
            f"warmup_steps:{cfg.warmup_steps} max_wallclock_seconds:{cfg.max_wallclock_seconds:.3f}")
        log(f"seed:{cfg.seed}")
        reserve = cfg.gptq_reserve_seconds if cfg.gptq and cfg.max_wallclock_seconds else 0.0  # calibration's
        summary.update(train(dataclasses.replace(cfg, max_wallclock_seconds=cfg.max_wallclock_seconds - reserve),
                             rt, model, val, log))
        hessians = None
        if cfg.gptq:
            t = time.perf_counter()
            hessians = calibrate(model, cfg, rt)
            sync(rt)
            summary["calib_seconds"] = secs = time.perf_counter() - t
            log(f"gptq:calibrated seqs:{cfg.gptq_calib_seqs} calib_time:{1000 * secs:.0f}ms "
                f"reserve:{1000 * reserve:.0f}ms train+calib:{1000 * (summary['train_seconds'] + secs):.0f}ms")
            if secs > reserve > 0:
                log(f"WARNING: calibration overran GPTQ_RESERVE_SECONDS={reserve:g} (raise it or lower GPTQ_CALIB_SEQS)")
        log(f"peak memory allocated: {peak_memory_mb(rt):.0f} MiB")
        t = time.perf_counter()
        vl, vb = evaluate_plain(model, val, cfg, rt)
        log(f"DIAGNOSTIC post_ema val_loss:{vl:.4f} val_bpb:{vb:.4f} eval_time:{1000 * (time.perf_counter() - t):.0f}ms")
        summary["stages"]["post_ema"] = {"val_loss": vl, "val_bpb": vb, "seconds": time.perf_counter() - t,
                                         "compliance": "causal"}
        t = time.perf_counter()
        target = cfg.artifact_target_bytes
        blob, method, sizes, step = export_ranks(model.cpu(), cfg, rt, model_budget(cfg, len(source)), hessians)
        if rt.is_main:
            atomic_write(artifact_path, blob)
        if rt.world_size > 1:
            dist.barrier()
        blob_len = len(blob)
        log(f"Serialized model int6+{method}: {blob_len} bytes (candidates {sizes}) "
            f"export_time:{1000 * (time.perf_counter() - t):.0f}ms artifact:{artifact_path}")
        if step != 1.0:
            log(f"artifact_fit: int6 step x{step:.4f} to fit ARTIFACT_TARGET_BYTES={target} "
                f"(step 1: {sizes[method]} bytes of {method})")
        summary.update(mode="train", artifact=str(artifact_path), compressor=method, int6_step=step)
        model, _ = load_artifact(str(artifact_path), cfg)  # roundtrip: a fresh model from the written file
        model = model.to(rt.device)
    nbytes_code = len(source)
    total = nbytes_code + blob_len
    fits = total <= 16_000_000
    log(f"Code size: {nbytes_code} bytes" + (" (the packed wrapper that ran)" if code is not source else ""))
    log(f"Total submission size int6: {total} bytes")
    if not fits:
        log(f"FAIL artifact_too_large total:{total} bytes > 16000000 (code {nbytes_code} + model {blob_len})")
    summary.update(model_params=count_params(model), bytes_code=nbytes_code, bytes_model=blob_len,
                   bytes_total=total, fits=fits, config={f.name: getattr(cfg, f.name) for f in fields(cfg)})
    est = estimate_eval_seconds(model, val, cfg, rt)
    log(f"eval_budget:estimate_seconds:{est:.0f} limit:{cfg.eval_time_limit_seconds:.0f}")
    if est > cfg.eval_time_limit_seconds:
        log(f"WARNING: estimated eval time {est:.3g}s exceeds EVAL_TIME_LIMIT_SECONDS={cfg.eval_time_limit_seconds:g}"
            " (to shrink it: raise EVAL_STRIDE, or disable TTT_ENABLED/SLOT_ENABLED)")
    eval_t0 = time.perf_counter()

    def record(name: str, r: dict, seconds: float, legacy: str | None, variant: str) -> None:
        comp = stage_compliance(variant, cfg)
        summary["stages"][name] = {"val_loss": r["loss"], "val_bpb": r["bpb"], "seconds": seconds,
                                   "compliance": comp}
        log(f"stage:{name} val_loss:{r['loss']:.4f} val_bpb:{r['bpb']:.4f} eval_time:{1000 * seconds:.0f}ms "
            f"compliance:{comp}")
        log(f"{name}_exact val_loss:{r['loss']:.8f} val_bpb:{r['bpb']:.8f}")
        if legacy:
            log(f"{legacy} val_loss:{r['loss']:.4f} val_bpb:{r['bpb']:.4f} eval_time:{1000 * seconds:.0f}ms")
            log(f"{legacy}_exact val_loss:{r['loss']:.8f} val_bpb:{r['bpb']:.8f}")

    t = time.perf_counter()
    vl, vb = evaluate_plain(model, val, dataclasses.replace(cfg, train_seq_len=cfg.eval_seq_len), rt)
    record("roundtrip", {"loss": vl, "bpb": vb}, time.perf_counter() - t, "final_int6_roundtrip", "plain")
    passes = [("sliding", False, "final_int6_sliding_window")] + ([("ttt", True, "legal_ttt")] if cfg.ttt_enabled else [])
    for name, ttt, legacy in passes:
        t = time.perf_counter()
        res = eval_pass(model, val, cfg, rt, seq_len=cfg.eval_seq_len, stride=cfg.eval_stride,
                        batch_seqs=cfg.eval_batch_seqs, slot=cfg.slot_enabled, ttt=ttt, log=log)
        secs = time.perf_counter() - t
        for v, r in res.items():
            record(name if v == "plain" else f"{name}_{v}", r, secs, legacy if v == "plain" else None, v)
    summary["eval_seconds"] = time.perf_counter() - eval_t0
    last = list(summary["stages"])[-1]
    summary["val_bpb"] = summary["stages"][last]["val_bpb"]
    summary["val_loss"] = summary["stages"][last]["val_loss"]
    summary["final_stage"] = last
    compliant = [k for k, s in summary["stages"].items() if s["compliance"] == "causal" and k != "post_ema"]
    summary["final_compliant_stage"] = compliant[-1] if compliant else None
    summary["val_bpb_compliant"] = summary["stages"][compliant[-1]]["val_bpb"] if compliant else None
    summary["val_bytes"] = res["plain"]["bytes"]
    summary["peak_memory_mb"] = peak_memory_mb(rt)
    summary["attention_calls"] = {k: int(v) for k, v in ATTN_CALLS.items() if int(v)}
    log("attention_calls " + " ".join(f"{k}:{v}" for k, v in summary["attention_calls"].items()))
    log(f"final stage:{last} val_bpb:{summary['val_bpb']:.8f} compliance:{summary['stages'][last]['compliance']} "
        f"eval_seconds:{summary['eval_seconds']:.1f} peak_memory_mb:{summary['peak_memory_mb']:.0f}")
    if rt.is_main:
        write_json(out_dir / f"{run_id}.json", summary)
        log(f"summary:{out_dir / (run_id + '.json')}")
        log("| stage | val_bpb | val_loss | seconds | compliance |\n|---|---|---|---|---|\n" + "\n".join(
            f"| {k} | {s['val_bpb']:.4f} | {s['val_loss']:.4f} | {s['seconds']:.1f} | {s['compliance']} |"
            for k, s in summary["stages"].items()))
    if rt.world_size > 1:
        dist.barrier()  # no rank tears down its process group while another still writes (a gloo abort at exit)
    return summary


def main(env=None) -> int:
    env = dict(os.environ if env is None else env)
    debug = env.get("DEBUG", "0") not in ("", "0")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        run(env)
        return 0
    except UserError as e:
        if debug:
            raise
        if env.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        if debug:
            raise
        print(f"interrupted ({str(e) or 'SIGINT'}): stopped; no artifact or summary was written for the unfinished phase "
              "(files are only ever renamed into place when complete)", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(rerun with DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
