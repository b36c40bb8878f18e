"""Data pipeline: shard format, byte accounting, the offline dataset builder and the hub downloader.

The downloader is exercised for real against a fake hub: an HTTP server on 127.0.0.1 that serves the hub's
`/datasets/{repo}/resolve/{revision}/{path}` URLs (HEAD and GET) from a temp folder, reached via HF_ENDPOINT.
Tests that need Debian's docs (linux-doc-6.12, python3.11-doc) or ../shared/official skip cleanly without them.
"""
import hashlib
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT / "data"
PREPARE = DATA / "prepare_offline.py"
DOWNLOAD = DATA / "cached_challenge_fineweb.py"
OFFICIAL = REPO_ROOT.parent / "shared" / "official"
DOC_ROOT = Path("/usr/share/doc")
KERNEL_PROCESS = DOC_ROOT / "linux-doc-6.12/Documentation/process"
PY_TUTORIAL = DOC_ROOT / "python3.11/html/_sources/tutorial"
APT = "apt-get install -y --no-install-recommends linux-doc-6.12 python3.11-doc"

needs_debian_docs = pytest.mark.skipif(not (KERNEL_PROCESS.is_dir() and PY_TUTORIAL.is_dir()),
                                       reason=f"Debian docs not installed ({APT})")
needs_official = pytest.mark.skipif(not (OFFICIAL / "fineweb_1024_bpe.model").is_file(),
                                    reason="../shared/official is absent")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def po():
    return _load("prepare_offline", PREPARE)


def run_script(script, *args, env=None, timeout=120):
    """Run a data script in a fresh interpreter; returns (rc, stdout, stderr, seconds)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MATCHED_FINEWEB_"))}
    full_env.update(env or {})
    t = time.time()
    p = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                       env=full_env, timeout=timeout, cwd=REPO_ROOT)
    return p.returncode, p.stdout, p.stderr, time.time() - t


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


# ---- shard format (train_gpt.write_shard / read_shard_header / load_shard) ----
def test_shard_roundtrip(tg, tmp_path):
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 65536, size=12345).astype(np.int64)
    toks[:3] = (0, 1, 65535)
    p = tmp_path / "fineweb_val_000000.bin"
    tg.write_shard(p, toks)
    assert p.stat().st_size == 1024 + 2 * toks.size
    assert tg.read_shard_header(p) == toks.size
    got = tg.load_shard(p)
    assert got.dtype == np.uint16 and np.array_equal(got.astype(np.int64), toks)
    head = np.fromfile(p, dtype="<i4", count=256)
    assert head[:3].tolist() == [20240520, 1, toks.size] and not head[3:].any()
    assert not list(tmp_path.glob("*.tmp"))  # written via a temp name
    empty = tmp_path / "empty.bin"
    tg.write_shard(empty, [])
    assert tg.read_shard_header(empty) == 0 and tg.load_shard(empty).size == 0


def test_write_shard_rejects_ids_outside_uint16(tg, tmp_path):
    for bad in ([65536], [-1]):
        with pytest.raises(tg.DataError, match="uint16"):
            tg.write_shard(tmp_path / "x.bin", bad)


def _corrupt(tg, path, kind):
    tg.write_shard(path, np.arange(100) % 50)
    raw = bytearray(path.read_bytes())
    if kind == "magic":
        raw[0:4] = np.array([12345], "<i4").tobytes()
    elif kind == "version":
        raw[4:8] = np.array([2], "<i4").tobytes()
    elif kind == "truncated body":
        raw = raw[:-10]
    elif kind == "trailing bytes":
        raw += b"\0\0"
    elif kind == "truncated header":
        raw = raw[:100]
    elif kind == "header count":
        raw[8:12] = np.array([101], "<i4").tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind, message", [
    ("magic", r"bad magic 12345"), ("version", r"unsupported shard version 2"),
    ("truncated body", r"truncated body: 1214 bytes but the header says 100 tokens"),
    ("trailing bytes", r"trailing bytes: 1226 bytes but the header says 100 tokens"),
    ("header count", r"truncated body: 1224 bytes but the header says 101 tokens"),
    ("truncated header", r"truncated header \(100 bytes"),
])
def test_corrupt_shard_raises_data_error_naming_file_and_defect(tg, tmp_path, kind, message):
    p = tmp_path / f"fineweb_train_{kind.replace(' ', '_')}.bin"
    _corrupt(tg, p, kind)
    for fn in (tg.read_shard_header, tg.load_shard):
        with pytest.raises(tg.DataError, match=message) as e:
            fn(p)
        assert str(p) in str(e.value)


def test_tiny_odd_sized_shard_raises_data_error(tg, tmp_path):
    p = tmp_path / "fineweb_val_000000.bin"
    p.write_bytes(b"\0" * 10)
    with pytest.raises(tg.DataError, match=r"truncated header \(10 bytes"):
        tg.read_shard_header(p)


def test_token_id_out_of_vocab_and_missing_shard(tg, tmp_path):
    p = tmp_path / "fineweb_val_000000.bin"
    tg.write_shard(p, [1, 5, 1023, 1024, 7])
    assert tg.load_shard(p, vocab_size=1025).size == 5
    with pytest.raises(tg.DataError, match=r"token id 1024 at index 3 is >= VOCAB_SIZE=1024") as e:
        tg.load_shard(p, vocab_size=1024)
    assert str(p) in str(e.value)
    with pytest.raises(tg.DataError, match=r"cannot read shard") as e:
        tg.read_shard_header(tmp_path / "nope.bin")
    assert "nope.bin" in str(e.value)


# ---- markup stripping ----
RST_SAMPLE = """\
.. _label:

Title of the page
=================

This paragraph has ``inline code``, a :func:`~os.path.join` role, a `link <https://x.org>`_
and **strong** and *emphasis* words, plus a footnote [#]_ and |name| here.

.. |name| replace:: a substitution

Here is an example of use::

    for i in range(3):
        print(i)

.. code-block:: c

   int main(void) { return 0; }

.. note:: The note text on the directive line is
   kept as prose, like any other paragraph.

.. function:: spam(a,
              b)
   :noindex:

   Return the spam of the arguments a and b, as a prose paragraph.

.. versionchanged:: 3.2
   Added the *b* parameter to the spam function.

+-------+-------+
| table | cells |
+-------+-------+

- A bullet item that is long enough to be a real sentence.
- Short item.

.. This is a comment that should never show up in the output text.

>>> print("doctest lines are dropped")
"""


def test_markup_paragraphs_keeps_prose_and_reduces_inline_markup(po):
    got = po.markup_paragraphs(RST_SAMPLE)
    assert got == [
        "This paragraph has inline code, a join role, a link and strong and emphasis words, plus a footnote "
        "and a substitution here.",
        "Here is an example of use:",
        "The note text on the directive line is kept as prose, like any other paragraph.",
        "Return the spam of the arguments a and b, as a prose paragraph.",
        "Added the b parameter to the spam function.",
        "A bullet item that is long enough to be a real sentence.",
    ]


def test_markdown_and_plain_text(po):
    md = ("# Heading\n\nSome *markdown* text with a [link](http://x.org) and `code` in it.\n\n"
          "```\ncode block that is dropped;\n```\n\n    indented code is dropped too;\n\n"
          "| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert po.markup_paragraphs(md, markdown=True) == ["Some markdown text with a link and code in it."]


# ---- byte accounting: sum of LUT bytes over targets == UTF-8 bytes of sp.decode ----
def lut_and_decoded_bytes(tg, sp, luts, toks):
    """(LUT bytes of [BOS]+toks, scored as targets, and len(sp.decode(toks).encode()))."""
    t = torch.tensor([1] + list(toks), dtype=torch.long)
    return int(luts.target_bytes(t[:-1], t[1:]).sum()), len(sp.decode(list(toks)).encode("utf-8"))


def split_docs(stream: np.ndarray) -> list[list[int]]:
    starts = np.flatnonzero(stream == 1).tolist() + [stream.size]
    assert starts[0] == 0, "a split starts with BOS"
    return [stream[a + 1: b].tolist() for a, b in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def debian_subset(tmp_path_factory):
    """~60 real documents: the kernel's process/ guide and the Python tutorial."""
    if not (KERNEL_PROCESS.is_dir() and PY_TUTORIAL.is_dir()):
        pytest.skip(f"Debian docs not installed ({APT})")
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(KERNEL_PROCESS, src / "kernel/process")
    shutil.copytree(PY_TUTORIAL, src / "python/tutorial")
    return src


@pytest.fixture(scope="module")
def small_build(debian_subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("build1")
    rc, so, se, _ = run_script(PREPARE, "--src", debian_subset, "--data-dir", out, "--val-tokens", 4096,
                               "--shard-tokens", 50000)
    assert rc == 0, se
    return out


def test_prepare_offline_is_deterministic(small_build, debian_subset, tmp_path):
    rc, so, se, _ = run_script(PREPARE, "--src", debian_subset, "--data-dir", tmp_path, "--val-tokens", 4096,
                               "--shard-tokens", 50000)
    assert rc == 0, se
    a, b = all_files(small_build), all_files(tmp_path)
    assert [p.relative_to(small_build) for p in a] == [p.relative_to(tmp_path) for p in b]
    names = {p.name for p in a}
    assert {"offline_1024_bpe.model", "offline_1024_bpe.vocab", "manifest.json", "fineweb_val_000000.bin",
            "fineweb_train_000000.bin", "fineweb_train_000001.bin"} <= names
    assert not any(n.startswith(".") for n in names)  # no temp leftovers
    for x, y in zip(a, b):
        if x.is_file():
            assert x.read_bytes() == y.read_bytes(), f"{x.name} differs between two runs"


def test_prepare_offline_manifest_matches_shards(tg, small_build):
    import sentencepiece as spm
    ds = small_build / "datasets/offline_sp1024"
    m = json.loads((ds / "manifest.json").read_text())
    model = small_build / "tokenizers/offline_1024_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == 1024 and m["tokenizer"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()) == (1, 2, 3, 0)
    luts = tg.build_byte_luts(sp, 1024)
    for split in ("val", "train"):
        files = tg.shard_files(str(ds), split)
        assert len(files) == m["splits"][split]["files"] == m["stats"][f"files_{split}"]
        stream = np.concatenate([tg.load_shard(f, 1024) for f in files]).astype(np.int64)
        docs = split_docs(stream)
        assert stream.size == m["splits"][split]["tokens"] and len(docs) == m["splits"][split]["docs"]
        t = torch.from_numpy(stream)
        assert int(luts.target_bytes(t[:-1], t[1:]).sum()) == m["splits"][split]["bytes"]
        assert sum(len(sp.decode(d).encode()) for d in docs) == m["splits"][split]["bytes"]
        assert not (stream == 2).any()  # no EOS
    assert m["splits"]["val"]["tokens"] == 4096  # the cap, the last document cut
    assert len(re.fullmatch(r"[0-9a-f]{64}", m["source"]["corpus_sha256"]).group()) == 64


def test_offline_tokenizer_bytes_match_decode_per_document(tg, small_build):
    """Byte-fallback tokenizer: exact equality for every real document, no exceptions."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(small_build / "tokenizers/offline_1024_bpe.model"))
    luts = tg.build_byte_luts(sp, 1024)
    ds = small_build / "datasets/offline_sp1024"
    docs = []
    for split in ("val", "train"):  # documents may straddle shards: concatenate a split first
        files = tg.shard_files(str(ds), split)
        docs += split_docs(np.concatenate([tg.load_shard(f, 1024) for f in files]).astype(np.int64))
    assert len(docs) > 40
    for d in docs:
        lut, dec = lut_and_decoded_bytes(tg, sp, luts, d)
        assert lut == dec
    # byte-fallback pieces count 1 byte each and reassemble to the UTF-8 of characters outside the vocab
    text = "Snowman \u2603 and \u6771\u4eac, na\u00efve caf\u00e9 \U0001F600."
    ids = sp.encode(text)
    assert any(sp.is_byte(i) for i in ids)
    assert lut_and_decoded_bytes(tg, sp, luts, ids) == (len(text.encode()), len(text.encode()))


def test_byte_rule_special_cases(tg, small_build):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(small_build / "tokenizers/offline_1024_bpe.model"))
    luts = tg.build_byte_luts(sp, 1024)
    # BOS (a control piece) counts 0 bytes as a target, whatever precedes it
    assert int(luts.target_bytes(torch.tensor([5]), torch.tensor([1]))) == 0
    # a leading U+2581 right after BOS counts 0 bytes, and the decoder drops it too
    the = sp.piece_to_id("\u2581the")
    assert the != sp.unk_id()
    assert int(luts.target_bytes(torch.tensor([1]), torch.tensor([the]))) == 3
    assert int(luts.target_bytes(torch.tensor([the]), torch.tensor([the]))) == 4
    assert sp.decode([the]) == "the" and sp.decode([the, the]) == "the the"
    # bytes are those of the NFKC-normalized text: the ligature U+FB01 (3 bytes) counts as "fi" (2 bytes);
    # newlines become spaces and runs of spaces collapse
    for text, n in (("\ufb01ne", 4), ("a\n\nb   c", 5)):
        assert lut_and_decoded_bytes(tg, sp, luts, sp.encode(text)) == (n, n)


@needs_official
@needs_debian_docs
def test_published_tokenizer_bytes_on_real_documents(tg, po, debian_subset):
    """The published sp1024 has no byte fallback: characters outside its vocab (it lacks even ASCII # * + < = > @
    [ \\ ] ^ _ ` { } ~) become <unk>, which decodes to " \u2047 " (5 bytes) but counts 0 bytes, and the piece
    after it loses its leading-space byte (its previous token is a boundary). Exact rule per document:
    decoded - LUT = sum over <unk> of 5 + has_leading_space(next token)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(OFFICIAL / "fineweb_1024_bpe.model"))
    assert not any(sp.is_byte(i) for i in range(sp.vocab_size()))
    luts = tg.build_byte_luts(sp, 1024)
    unk = sp.unk_id()
    assert sp.decode([unk]) == " \u2047 "
    n_exact = n_unk = 0
    for p in sorted(debian_subset.rglob("*.*")):
        text = "\n".join(po.document_text(po.Source(p, p.name)))
        if not text:
            continue
        ids = sp.encode(text)
        lut, dec = lut_and_decoded_bytes(tg, sp, luts, ids)
        expected = sum(5 + (int(luts.has_space[ids[i + 1]]) if i + 1 < len(ids) else 0)
                       for i, t in enumerate(ids) if t == unk)
        assert dec - lut == expected, p.name
        n_unk += expected > 0
        n_exact += expected == 0
    assert n_unk >= 10 and n_exact >= 5
    # a constructed case: "a 中文 b" -> a, ▁, <unk> (both characters merge into one), ▁b
    ids = sp.encode("a \u4e2d\u6587 b")
    assert [sp.id_to_piece(i) for i in ids] == ["a", "\u2581", "<unk>", "\u2581b"]
    assert lut_and_decoded_bytes(tg, sp, luts, ids) == (3, 9)  # LUT: a, ▁, (0), b; decode: "a  ⁇  b"


@needs_official
def test_published_tokenizer_leading_space_after_bos(tg):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(OFFICIAL / "fineweb_1024_bpe.model"))
    luts = tg.build_byte_luts(sp, 1024)
    ids = sp.encode("a world")
    assert [sp.id_to_piece(i) for i in ids] == ["a", "\u2581world"]
    assert lut_and_decoded_bytes(tg, sp, luts, ids) == (7, 7)
    assert lut_and_decoded_bytes(tg, sp, luts, ids[1:]) == (5, 5)  # "world": the leading space is dropped


def test_real_offline_dataset_if_built(tg):
    """The dataset built by `python data/prepare_offline.py` (skipped when it has not been built)."""
    import sentencepiece as spm
    ds, model = DATA / "datasets/offline_sp1024", DATA / "tokenizers/offline_1024_bpe.model"
    if not ((ds / "manifest.json").is_file() and model.is_file()):
        pytest.skip("data/datasets/offline_sp1024 not built")
    m = json.loads((ds / "manifest.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert m["tokenizer"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    luts = tg.build_byte_luts(sp, 1024)
    val = np.concatenate([tg.load_shard(f, 1024) for f in tg.shard_files(str(ds), "val")]).astype(np.int64)
    t = torch.from_numpy(val)
    assert val.size == m["splits"]["val"]["tokens"]
    assert int(luts.target_bytes(t[:-1], t[1:]).sum()) == m["splits"]["val"]["bytes"]


# ---- prepare_offline: bad input leaves nothing behind ----
def _bad_src(tmp_path, kind):
    src = tmp_path / "src"
    if kind == "missing":
        return src
    src.mkdir()
    if kind == "empty":
        (src / "notes.pdf").write_bytes(b"%PDF")  # not a text file
    elif kind == "too small":
        (src / "a.txt").write_text("The quick brown fox jumps over the lazy dog again and again.\n\n" * 50)
        for i in range(40):
            (src / f"d{i}.md").write_text(f"Document {i} says that small corpora cannot train a tokenizer.\n")
    elif kind == "bad gzip":
        (src / "good.txt").write_text("Some text that reads as prose for the test here.\n")
        (src / "broken.rst.gz").write_bytes(b"\x1f\x8b\x08\x00not really gzip data")
    elif kind == "not utf-8":
        (src / "latin1.txt").write_bytes("Caf\u00e9 au lait is a drink that people like.\n".encode("latin-1"))
    return src


@pytest.mark.parametrize("kind, message", [
    ("missing", r"--src .*src is not a directory"),
    ("empty", r"--src .*src holds no \.txt/\.md/\.rst files"),
    ("too small", r"corpus too small for vocab 1024: SentencePiece found only \d+ pieces"),
    ("bad gzip", r"cannot read .*broken\.rst\.gz"),
    ("not utf-8", r"cannot read .*latin1\.txt: not UTF-8 text"),
])
def test_prepare_offline_bad_input(tmp_path, kind, message):
    src = _bad_src(tmp_path, kind)
    out = tmp_path / "out"
    rc, so, se, _ = run_script(PREPARE, "--src", src, "--data-dir", out)
    assert rc == 2
    line = one_line(se)
    assert line.startswith("prepare_offline: error: ") and re.search(message, line), line
    assert all_files(out) == []  # nothing half-written, no temp folders


def test_prepare_offline_default_source_missing(tmp_path):
    rc, so, se, _ = run_script(PREPARE, "--data-dir", tmp_path / "out", env={"OFFLINE_DOC_ROOT": str(tmp_path)})
    assert rc == 2
    line = one_line(se)
    assert f"`{APT}`" in line and str(tmp_path / "linux-doc-6.12/Documentation") in line
    rc, so, se, _ = run_script(PREPARE, "--doc-root", tmp_path / "nope", "--data-dir", tmp_path / "out")
    assert rc == 2 and APT in one_line(se) and not (tmp_path / "out").exists()


# ---- downloader against a fake hub on 127.0.0.1 ----
COMMIT = hashlib.sha1(b"fake hub commit").hexdigest()


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    """Serves /{repo_type}s/{repo}/resolve/{revision}/{path} from server.root, with the headers
    huggingface_hub reads (X-Repo-Commit, ETag, Content-Length; Range for resumed GETs)."""

    def _file(self):
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m or m.group(1) != self.server.repo_id:
            return None, None
        f = self.server.root / m.group(3)
        return (f, m.group(3)) if f.is_file() else (None, m.group(3))

    def _respond(self, body: bool):
        f, rel = self._file()
        if f is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if rel else "RepoNotFound")
            self.send_header("X-Error-Message", "Entry not found")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = f.read_bytes()
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "") or "")
        if body and m:
            start, status = int(m.group(1)), 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if body:
            self.server.gets.append(rel)
            self.wfile.write(data[start:])

    def do_HEAD(self):
        self._respond(body=False)

    def do_GET(self):
        self._respond(body=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(tg, tmp_path):
    """A published export in miniature: manifest, 2 val + 3 train shards, tokenizer files, docs."""
    repo = tmp_path / "hub"
    root = repo / "datasets"
    ds = root / "datasets/fineweb10B_sp1024"
    ds.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("val", 2), ("train", 3)):
        for i in range(n):
            tg.write_shard(ds / f"fineweb_{split}_{i:06d}.bin", rng.integers(0, 1024, size=int(rng.integers(500, 3000))))
    (root / "tokenizers").mkdir()
    (root / "tokenizers/fineweb_1024_bpe.model").write_bytes(b"fake sentencepiece model " * 40)
    (root / "tokenizers/fineweb_1024_bpe.vocab").write_text("<pad>\t0\n<s>\t0\n")
    (root / "docs_selected.jsonl").write_text('{"text": "a document"}\n')
    (root / "docs_selected.source_manifest.json").write_text('{"docs_sha256": "x", "shuffle_seed": 1337}\n')
    manifest = {
        "version": "10B", "num_docs": 10, "num_val_docs": 2, "shard_size": 100000000, "append_eos": False,
        "docs_jsonl": "docs_selected.jsonl",
        "tokenizers": [{"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024, "bos_id": 1,
                        "eos_id": 2, "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                      "path": "datasets/fineweb10B_sp1024", "vocab_size": 1024,
                      "stats": {"files_total": 5, "files_val": 2, "files_train": 3}}],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHubHandler)
    server.root, server.repo_id, server.gets = repo, "willdepueoai/parameter-golf", []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    yield server, root, env
    server.shutdown()
    server.server_close()


def test_download_from_fake_hub_then_resume(tg, fake_hub, tmp_path):
    server, root, env = fake_hub
    out = tmp_path / "data"
    rc, so, se, _ = run_script(DOWNLOAD, "--data-dir", out, "--train-shards", 2, env=env)
    assert rc == 0, se
    ds = out / "datasets/fineweb10B_sp1024"
    want = ["datasets/manifest.json", "datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
            "datasets/fineweb10B_sp1024/fineweb_train_000001.bin", "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
            "datasets/fineweb10B_sp1024/fineweb_val_000001.bin", "tokenizers/fineweb_1024_bpe.model",
            "tokenizers/fineweb_1024_bpe.vocab"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(want)
    remote = {rel: "manifest.json" if rel == "datasets/manifest.json" else rel for rel in want}
    for rel in want:
        assert (out / rel).read_bytes() == (root / remote[rel]).read_bytes(), rel
    assert sorted(server.gets) == sorted(f"datasets/{r}" for r in remote.values())  # each file fetched once
    assert os.stat(ds / "fineweb_val_000000.bin").st_nlink == 2  # hard-linked out of the HF cache
    assert "6 file(s) fetched, 0 already complete" in so  # the manifest is not counted

    # resume: nothing is fetched again
    n_gets = len(server.gets)
    rc, so, se, _ = run_script(DOWNLOAD, "--data-dir", out, "--train-shards", 2, env=env)
    assert rc == 0, se
    assert len(server.gets) == n_gets and "0 file(s) fetched, 6 already complete" in so

    # a shard truncated in place (which also truncates the hard-linked cache blob) is fetched again
    shard = ds / "fineweb_train_000001.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    # a shard replaced by a short file (the cache blob is intact) is linked again from the cache
    other = ds / "fineweb_val_000001.bin"
    other.unlink()
    other.write_bytes(b"\0" * 10)
    rc, so, se, _ = run_script(DOWNLOAD, "--data-dir", out, "--train-shards", 3, env=env)
    assert rc == 0, se
    assert sorted(server.gets[n_gets:]) == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                                            "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin"]
    for name in ("fineweb_train_000001.bin", "fineweb_val_000001.bin", "fineweb_train_000002.bin"):
        assert (ds / name).read_bytes() == (root / "datasets/fineweb10B_sp1024" / name).read_bytes()
        assert tg.read_shard_header(ds / name) > 0
    assert "3 file(s) fetched" in so


def test_download_with_docs_and_env_overrides(fake_hub, tmp_path):
    server, root, env = fake_hub
    # serve the same export under another repo id and root prefix, chosen by the env overrides
    alt = root.parent / "exports"
    shutil.copytree(root, alt)
    server.repo_id = "someone/golf"
    env = dict(env, MATCHED_FINEWEB_REPO_ID="someone/golf", MATCHED_FINEWEB_REMOTE_ROOT_PREFIX="exports")
    out = tmp_path / "data"
    rc, so, se, _ = run_script(DOWNLOAD, "--data-dir", out, "--train-shards", 0, "--with-docs", env=env)
    assert rc == 0, se
    assert (out / "datasets/docs_selected.jsonl").read_text() == '{"text": "a document"}\n'
    assert (out / "datasets/docs_selected.source_manifest.json").is_file()
    assert not list((out / "datasets/fineweb10B_sp1024").glob("fineweb_train_*"))
    assert all(g.startswith("exports/") for g in server.gets)


@pytest.mark.parametrize("args, message", [
    (("--train-shards", 4), r"--train-shards 4 is more than the 3 train shards published"),
    (("--variant", "sp4096"), r"the manifest has no dataset fineweb10B_sp4096 \(it has: fineweb10B_sp1024\)"),
])
def test_download_bad_request_is_one_line(fake_hub, tmp_path, args, message):
    server, root, env = fake_hub
    rc, so, se, _ = run_script(DOWNLOAD, "--data-dir", tmp_path / "data", *args, env=env)
    assert rc == 2 and re.search(message, one_line(se))


def test_download_offline_fails_fast_with_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    rc, so, se, dt = run_script(DOWNLOAD, "--data-dir", tmp_path / "data", env=env, timeout=60)
    assert rc == 2 and dt < 15
    line = one_line(se)
    assert "datasets/manifest.json" in line and "HF_HUB_OFFLINE=1" in line
    assert not (tmp_path / "data" / "datasets" / "fineweb10B_sp1024").exists()


def test_download_unreachable_hub_fails_fast_with_one_line(tmp_path):
    import socket
    with socket.socket() as s:  # a loopback port that nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf"), "NO_PROXY": "127.0.0.1"}
    rc, so, se, dt = run_script(DOWNLOAD, "--data-dir", tmp_path / "data", env=env, timeout=60)
    assert rc == 2 and dt < 15
    assert "unreachable" in one_line(se)
