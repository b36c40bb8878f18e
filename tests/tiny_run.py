"""Helpers shared by test_train.py and test_dist.py: a tiny SentencePiece model and tiny shards in a temp folder,
and the env of a tiny end-to-end run (seconds on a 2-core CPU)."""
import io
import random
import re
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_GPT = REPO_ROOT / "train_gpt.py"
VOCAB = 320
WORDS = ("the cat sat on a mat while dogs ran over green hills and quick brown foxes jumped past lazy rivers under "
         "bright stars every night people sing old songs about distant lands near café naïve façade").split()


def make_tiny_data(root: Path, tg, val_tokens: int = 640, train_tokens: int = 6000) -> tuple[Path, Path]:
    """Train a byte-fallback BPE model (vocab 320) on synthetic text and write fineweb_{train,val}_*.bin shards
    of BOS-separated documents into root. Returns (data_path, tokenizer_path). Deterministic."""
    import sentencepiece as spm
    rng = random.Random(0)

    def doc():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))) + rng.choice(".!?,")

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([doc() for _ in range(2000)]), model_writer=buf,
                                   vocab_size=VOCAB, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   num_threads=1, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    root.mkdir(parents=True, exist_ok=True)
    tok_path = root / "tiny_320_bpe.model"
    tok_path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    assert sp.vocab_size() == VOCAB

    def stream(n):
        out = []
        while len(out) < n:
            out += [sp.bos_id()] + sp.encode(doc())
        return np.array(out[:n], dtype=np.int64)

    data = root / "tiny_sp320"
    data.mkdir(exist_ok=True)
    tg.write_shard(data / "fineweb_val_000000.bin", stream(val_tokens))
    half = train_tokens // 2
    tg.write_shard(data / "fineweb_train_000000.bin", stream(half))
    tg.write_shard(data / "fineweb_train_000001.bin", stream(train_tokens - half))
    return data, tok_path


def tiny_env(data: Path, tok: Path, out: Path, **extra) -> dict:
    """Env of a tiny competition-preset run: every shape/length knob shrunk, every feature left on."""
    env = dict(
        PRESET="competition", DATA_PATH=str(data), TOKENIZER_PATH=str(tok), OUT_DIR=str(out), RUN_ID="tiny",
        DEVICE="cpu", AMP="0", COMPILE="0", COMPILE_HEAD="0", VOCAB_SIZE=str(VOCAB), NUM_LAYERS="2", MODEL_DIM="64",
        NUM_HEADS="2", NUM_KV_HEADS="1",
        ROPE_DIMS="16", VE_LAYERS="0,1", XSA_LAST_N="1", BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", VE_DIM="16",
        TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS=str(8 * 32), EVAL_SEQ_LEN="32", EVAL_STRIDE="8", TTT_CHUNK_TOKENS="64",
        ITERATIONS="3", MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="1", WARMDOWN_ITERS="2", TRAIN_LOG_EVERY="1",
        VAL_BATCH_SIZE="256", MUON_MOMENTUM_WARMUP_STEPS="2", EVAL_TIME_LIMIT_SECONDS="600",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


EXACT_RE = re.compile(r"^(\w+)_exact val_loss:(-?[\d.]+|nan) val_bpb:(-?[\d.]+|nan)$")


def exact_lines(log_text: str) -> dict:
    """{name: (val_loss, val_bpb)} from the `<name>_exact val_loss:X val_bpb:Y` lines of a log."""
    out = {}
    for line in log_text.splitlines():
        m = EXACT_RE.match(line.strip())
        if m:
            out[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return out
