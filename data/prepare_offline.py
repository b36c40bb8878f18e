#!/usr/bin/env python3
"""Build an offline dataset in the competition's shard format, with no network.

    python data/prepare_offline.py                      # Debian's kernel + Python docs -> data/
    python data/prepare_offline.py --src DIR --data-dir /tmp/d --vocab-size 1024

Source: Debian's `linux-doc-6.12` reST (gzip'd; `translations/` and `devicetree/` skipped) and `python3.11-doc`
reST sources, or any folder of .txt/.md/.rst files (optionally .gz) given with --src. One file = one document.
Markup is stripped and only paragraphs that read as prose are kept. Documents are split into val and train by a
stable hash of their relative path; a SentencePiece BPE is trained on the train documents only; each document is
encoded as [BOS] + tokens (no EOS) and written to fineweb_{val,train}_NNNNNN.bin with `train_gpt.write_shard`.
Everything is built in temp names next to the destinations and renamed into place at the end. See data/README.md.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

APT_COMMAND = "apt-get install -y --no-install-recommends linux-doc-6.12 python3.11-doc"
DEFAULT_DOC_ROOT = "/usr/share/doc"  # OFFLINE_DOC_ROOT / --doc-root override it (tests point it elsewhere)
KERNEL_DOCS = "linux-doc-6.12/Documentation"  # **/*.rst.gz; the point release moves, so files are globbed
PYTHON_DOCS = "python3.11/html/_sources"  # **/*.rst.txt
KERNEL_SKIP = ("translations", "devicetree")
TEXT_SUFFIXES = (".txt", ".md", ".rst")
VAL_PER_MILLE = 50  # ~5% of documents are val candidates (by sha1 of the relative path)
BOS_ID = 1
SP_MAX_SENTENCE_BYTES = 4000  # SentencePiece silently drops training lines longer than max_sentence_length (4192)


class PrepareError(Exception):
    """Bad input or environment: reported as one line on stderr, exit status 2."""


# ---- markup stripping ----
# Directives whose body is prose (kept, de-indented); every other directive is dropped with its body.
PROSE_DIRECTIVES = {
    "function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod",
    "classmethod", "staticmethod", "abstractmethod", "coroutinefunction", "coroutinemethod",
    "awaitablefunction", "module", "member", "macro", "type", "var", "struct", "union", "enum", "enumerator",
    "opcode", "cmdoption", "option", "envvar", "describe", "object", "program", "pdbcommand", "2to3fixer",
    "impl-detail", "only", "container",
    "cssclass", "glossary", "topic", "sidebar", "admonition", "seealso",
}
# Admonitions and version notes: the text after "::" on the directive line is already body text.
VERSION_DIRECTIVES = {"versionadded", "versionchanged", "deprecated", "deprecated-removed"}
_VERSIONS = re.compile(r"^(?:\d+(?:\.\d+)*\s*)+")
ADMONITIONS = {"note", "warning", "tip", "hint", "important", "attention", "caution", "danger", "error", "seealso"}

_DIRECTIVE = re.compile(r"^\.\.\s+([\w:.+-]+?)::(?:\s+(.*))?$")
_SUBST_DEF = re.compile(r"^\.\.\s+\|([^|]+)\|\s+replace::\s*(.*)$")
_GRID_BORDER = re.compile(r"^\+[-=+]{2,}\+$")
_SIMPLE_BORDER = re.compile(r"^=+(?: +=+)+$")
_BULLET = re.compile(r"^(?:[-*+\u2022]|\d{1,3}[.)]|#\.|\([0-9a-zA-Z]{1,3}\))\s+")
_FIELD = re.compile(r"^:[^:\s`][^:`]*:(?:\s+|$)")
_MD_HEADING = re.compile(r"^#{1,6}(?:\s|$)")
_MARKUP_FIRST = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\u2022" + "0123456789")
_FENCE = re.compile(r"^(`{3,}|~{3,})")

_INLINE_LITERAL = re.compile(r"``(.+?)``")
_INTERPRETED = re.compile(r"(:[A-Za-z][\w.+-]*(?::[\w.+-]+)*:)?`([^`]+)`(?::[\w.+-]+:)?(?:__?)?")
_EXPLICIT_TARGET = re.compile(r"^(.*?)\s*<([^<>]*)>$", re.S)
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_SUBST_REF = re.compile(r"(?<![\w|])\|([^|\s](?:[^|]*[^|\s])?)\|(?:__?)?(?![\w|])")
_FOOTNOTE_REF = re.compile(r"\s?\[(?:#[\w-]*|\*|\d+|[A-Za-z][\w.-]*)\]_")
_MD_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\](?:\([^)]*\)|\[[^\]]*\])")
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_ESCAPE = re.compile(r"\\(.)")
_WORDLIKE = re.compile(r"(?<!\S)[(\"'\u201c\u2018]*[A-Za-z][a-z'\u2019-]*[.,;:!?)\"'\u201d\u2019]*(?!\S)")
_DELETE_LETTERS = {c: None for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"}
_CLOSERS = "\"')]\u201d\u2019"
_CODE_ENDS = (";", "{", "}", "*/", "=>", "->", "::", "):", ") :")
_CODE_STARTS = ("$ ", "# ", "> ", "% ", "/*", "//")
_CALL_START = re.compile(r"[\w.]+\(")


def _interpreted(m: re.Match) -> str:
    role, content = m.group(1), m.group(2)
    t = _EXPLICIT_TARGET.match(content)
    if t:
        content = t.group(1) or t.group(2)
        if role in (":ref:", ":doc:") and not t.group(1):
            content = content.rsplit("/", 1)[-1].replace("-", " ").replace("_", " ")
    elif role in (":ref:", ":doc:"):  # a bare label: make it read as words
        content = content.rsplit("/", 1)[-1].replace("-", " ").replace("_", " ")
    if role and role != ":math:":
        if content.startswith("~"):
            content = content[1:].rsplit(".", 1)[-1]
        content = content.lstrip("!")
    return content


def inline_text(text: str, subst: dict[str, str], markdown: bool) -> str:
    """Reduce inline markup to its text: ``x``, :role:`x <t>`, `text <url>`_, **x**, *x*, |subst|, [1]_."""
    if "|" in text:
        text = _SUBST_REF.sub(lambda m: subst.get(m.group(1), ""), text)
    parts = _INLINE_LITERAL.split(text) if "``" in text else [text]  # odd items are inline literals: verbatim
    for i in range(0, len(parts), 2):
        t = parts[i]
        if markdown:
            t = _MD_IMAGE.sub("", t)
            t = _MD_LINK.sub(r"\1", t)
            t = _HTML_TAG.sub("", t)
        if "`" in t:
            t = _INTERPRETED.sub(_interpreted, t)
        if "*" in t:
            t = _EMPHASIS.sub(r"\1", _STRONG.sub(r"\1", t))
        if "]_" in t:
            t = _FOOTNOTE_REF.sub("", t)
        if "\\" in t:
            t = _ESCAPE.sub(r"\1", t.replace("\\ ", ""))
        parts[i] = t
    return " ".join("".join(parts).split())


def _is_code_line(s: str) -> bool:
    return s.endswith(_CODE_ENDS) or s.startswith(_CODE_STARTS) or bool(_CALL_START.match(s))


def is_prose(text: str, raw_lines: list[str]) -> bool:
    """A paragraph reads as prose: enough words, mostly letters, mostly plain words, ends like a sentence,
    and not mostly lines that look like code."""
    if text.rstrip(_CLOSERS)[-1:] not in (".", "!", "?", ":"):
        return False
    words = text.count(" ") + 1
    if words < 5:
        return False
    nonspace = len(text) - words + 1
    if len(text) - len(text.translate(_DELETE_LETTERS)) < 0.7 * nonspace:
        return False
    if len(_WORDLIKE.findall(text)) < 0.6 * words:
        return False
    code_lines = sum(_is_code_line(s.strip()) for s in raw_lines)
    return code_lines * 3 < len(raw_lines)


def markup_paragraphs(text: str, markdown: bool = False) -> list[str]:
    """reST / markdown / plain text -> prose paragraphs (one string each, whitespace collapsed).

    Dropped: directives other than prose ones (PROSE_DIRECTIVES keep their body), comments, targets, substitution
    definitions, `::` literal blocks, doctest blocks, fenced code, grid/simple/pipe tables, headings, field and
    option markers, and any paragraph that does not read as prose (`is_prose`)."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8).split("\n")]
    subst: dict[str, str] = {}
    for ln in lines:  # substitution definitions may come after their use
        m = _SUBST_DEF.match(ln.strip())
        if m:
            subst[m.group(1)] = m.group(2)
    paras: list[tuple[list[str], str]] = []  # (raw lines, joined text)
    cur: list[str] = []
    cur_indent = -1
    skip_deeper = None  # skip blank lines and lines indented deeper than this
    skip_to_blank = False  # skip up to the next blank line
    literal_after = None  # the last paragraph ended with "::": an indented block deeper than this is literal
    simple_table = 0  # borders seen inside a simple table
    fence = None

    def flush():
        nonlocal cur
        if cur:
            joined = " ".join(s.strip() for s in cur)
            paras.append((cur, joined))
        cur = []

    n = len(lines)
    for i, line in enumerate(lines):
        s = line.strip()
        ind = len(line) - len(line.lstrip())
        if fence is not None:
            if s.startswith(fence):
                fence = None
            continue
        if simple_table:
            if _SIMPLE_BORDER.match(s):
                simple_table += 1
                if simple_table > 2 and (i + 1 == n or not lines[i + 1].strip()):
                    simple_table = 0
            continue
        if skip_deeper is not None:
            if not s or ind > skip_deeper:
                continue
            skip_deeper = None
        if skip_to_blank:
            if s:
                continue
            skip_to_blank = False
        if not s:
            if cur and cur[-1].endswith("::"):  # "text::" -> "text:", "text ::" -> "text", "::" -> nothing
                literal_after = cur_indent
                body = cur.pop()[:-2]
                if body.strip():
                    cur.append(body.rstrip() if body.endswith(" ") else body + ":")
            flush()
            continue
        if literal_after is not None:
            deeper = ind > literal_after
            literal_after, skip = None, literal_after
            if deeper:
                skip_deeper = skip
                continue
        if cur and ind != cur_indent:  # definition lists, block quotes, dedents: a new paragraph
            flush()
        # block-level constructs (cheap gate: prose lines start with a letter)
        if s[0] in _MARKUP_FIRST or (markdown and not cur and ind >= 4):
            m = _FENCE.match(s)
            if m:
                flush()
                fence = m.group(1)
                continue
            if s.startswith(".."):
                flush()
                d = _DIRECTIVE.match(s)
                name = d.group(1).lower().rsplit(":", 1)[-1] if d else None
                if name in ADMONITIONS or name in VERSION_DIRECTIVES:  # the argument is body text
                    arg = d.group(2) or ""
                    if name in VERSION_DIRECTIVES:
                        arg = _VERSIONS.sub("", arg)
                    cur, cur_indent = ([arg] if arg else []), ind + 3
                elif name in PROSE_DIRECTIVES:
                    skip_to_blank = True  # signature continuation lines and options up to the blank line
                else:
                    skip_deeper = ind  # other directives, comments, targets, footnotes, substitution definitions
                continue
            if _GRID_BORDER.match(s) or (s.startswith("|") and s.endswith("|") and s.count("|") > 2):
                flush()
                skip_to_blank = True
                continue
            if _SIMPLE_BORDER.match(s):
                flush()
                simple_table = 1
                continue
            if len(s) >= 3 and s == s[0] * len(s) and not s[0].isalnum():  # heading adornment, transition
                if len(cur) == 1:  # a heading title
                    cur = []
                flush()
                continue
            if _MD_HEADING.match(s) or s.startswith(">>>"):
                flush()
                if s.startswith(">>>"):
                    skip_to_blank = True
                continue
            if markdown and not cur and ind >= 4:
                continue  # markdown indented code
            b = _BULLET.match(s) or _FIELD.match(s)
            if b:
                flush()
                s = s[b.end():]
                cur_indent = ind + b.end()
                if s:
                    cur.append(s)
                continue
        if s.startswith("| "):  # reST line block
            s = s[2:]
        if not cur:
            cur_indent = ind
        cur.append(s)
    flush()
    out = []
    for raw, joined in paras:
        text = inline_text(joined, subst, markdown)
        if is_prose(text, raw):
            out.append(text)
    return out


# ---- sources ----
@dataclass
class Source:
    path: Path  # the file on disk
    rel: str  # stable relative name: the split hash and the document order use it


def find_sources(src: str | None, doc_root: str) -> list[Source]:
    """The files to read, sorted by relative name. Raises PrepareError for a missing/empty source."""
    if src is not None:
        root = Path(src)
        if not root.is_dir():
            raise PrepareError(f"--src {src} is not a directory")
        files = [p for p in root.rglob("*") if _is_text_file(p.name) and not p.is_dir()]
        if not files:
            raise PrepareError(f"--src {src} holds no .txt/.md/.rst files (optionally .gz)")
        return sorted((Source(p, p.relative_to(root).as_posix()) for p in files), key=lambda s: s.rel)
    root = Path(doc_root)
    kernel, python = root / KERNEL_DOCS, root / PYTHON_DOCS
    missing = [str(d) for d in (kernel, python) if not d.is_dir()]
    if missing:
        raise PrepareError(f"default source {' and '.join(missing)} not found: install it with `{APT_COMMAND}` "
                           f"(or pass --src DIR)")
    files = [p for p in kernel.rglob("*.rst.gz") if not set(p.relative_to(kernel).parts[:-1]) & set(KERNEL_SKIP)]
    files += list(python.rglob("*.rst.txt"))
    files = [p for p in files if not p.is_dir()]
    if not files:
        raise PrepareError(f"default source under {doc_root} holds no documents: reinstall it with `{APT_COMMAND}`")
    return sorted((Source(p, p.relative_to(root).as_posix()) for p in files), key=lambda s: s.rel)


def _is_text_file(name: str) -> bool:
    name = name[:-3] if name.endswith(".gz") else name
    return name.endswith(TEXT_SUFFIXES)


def read_text(path: Path) -> str:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise PrepareError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"cannot read {path}: not UTF-8 text (byte {e.start})") from None


def document_text(src: Source) -> list[str]:
    """Cleaned prose paragraphs of one file (NUL replaced by a space, as the competition's exporter does)."""
    text = read_text(src.path).replace("\x00", " ")
    return markup_paragraphs(text, markdown=".md" in Path(src.rel).suffixes)


def path_hash(rel: str) -> str:
    return hashlib.sha1(rel.encode("utf-8")).hexdigest()


def is_val(rel: str) -> bool:
    return int(path_hash(rel)[:8], 16) % 1000 < VAL_PER_MILLE


# ---- tokenizer ----
def train_tokenizer(paragraphs, vocab_size: int) -> bytes:
    """SentencePiece BPE with the competition's settings; deterministic (no sampling, no shuffle, one thread)."""
    import sentencepiece as spm

    def lines():
        for p in paragraphs:
            b = p.encode("utf-8")
            while len(b) > SP_MAX_SENTENCE_BYTES:  # cut at a space so nothing is silently dropped
                cut = b.rfind(b" ", 0, SP_MAX_SENTENCE_BYTES)
                cut = cut if cut > 0 else SP_MAX_SENTENCE_BYTES
                while cut < len(b) and (b[cut] & 0xC0) == 0x80:  # never inside a UTF-8 sequence
                    cut -= 1
                yield b[:cut].decode("utf-8")
                b = b[cut:].lstrip(b" ")
            if b:
                yield b.decode("utf-8")

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            character_coverage=0.999, byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
            add_dummy_prefix=False, pad_id=0, bos_id=BOS_ID, eos_id=2, unk_id=3, hard_vocab_limit=False,
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise PrepareError(f"SentencePiece training failed: {str(e).strip().splitlines()[-1]}") from None
    return model.getvalue()


# ---- build ----
def build(args) -> dict:
    import numpy as np
    import sentencepiece as spm

    t0 = time.time()
    sources = find_sources(args.src, args.doc_root)
    docs = []  # (sha1 of rel, rel, text)
    for s in sources:
        paras = document_text(s)
        if paras:
            docs.append((path_hash(s.rel), s.rel, "\n".join(paras)))
    if not docs:
        raise PrepareError(f"no prose found in {len(sources)} source files")
    docs.sort()  # a stable pseudo-random order that mixes the sources (the shards are read in order)
    corpus = hashlib.sha256()
    for _, _, text in docs:
        corpus.update(text.encode("utf-8") + b"\0")
    val_docs = [d for d in docs if is_val(d[1])]
    train_docs = [d for d in docs if not is_val(d[1])]
    if not train_docs or not val_docs:
        raise PrepareError(f"corpus too small: {len(docs)} documents give {len(train_docs)} train and "
                           f"{len(val_docs)} val documents; need at least one of each")
    t_clean = time.time() - t0

    model = train_tokenizer((p for _, _, text in train_docs for p in text.split("\n")), args.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=model)
    if sp.vocab_size() != args.vocab_size:
        raise PrepareError(f"corpus too small for vocab {args.vocab_size}: SentencePiece found only "
                           f"{sp.vocab_size()} pieces in {len(train_docs)} train documents; add text or lower "
                           f"--vocab-size")
    t_tok = time.time() - t0 - t_clean

    def encode(split_docs, cap):
        ids = sp.encode([text for _, _, text in split_docs])
        seqs, total = [], 0
        for toks in ids:
            if cap and total + 1 + len(toks) > cap:
                keep = cap - total - 1
                while 0 < keep < len(toks) and sp.is_byte(toks[keep]) and sp.is_byte(toks[keep - 1]) and \
                        0x80 <= int(sp.id_to_piece(toks[keep])[3:5], 16) < 0xC0:
                    keep -= 1  # never cut inside a byte-fallback character
                if keep > 0:
                    seqs.append(toks[:keep])
                break
            seqs.append(toks)
            total += 1 + len(toks)
        n_bytes = sum(len(t.encode("utf-8")) for t in sp.decode(seqs)) if seqs else 0
        body = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.uint16, count=sum(map(len, seqs)))
        starts = np.cumsum([0] + [len(t) for t in seqs[:-1]], dtype=np.int64)
        flat = np.insert(body, starts, BOS_ID) if seqs else body  # [BOS] + tokens per document
        return flat, len(seqs), n_bytes

    val_tokens, n_val_docs, val_bytes = encode(val_docs, args.val_tokens)
    train_tokens, n_train_docs, train_bytes = encode(train_docs, 0)
    t_enc = time.time() - t0 - t_clean - t_tok

    try:
        manifest = write_outputs(args, model, sp, encoded=((val_tokens, n_val_docs, val_bytes),
                                                                   (train_tokens, n_train_docs, train_bytes)),
                                 n_sources=len(sources), n_docs=len(docs), n_val_candidates=len(val_docs),
                                 corpus_sha256=corpus.hexdigest())
    except OSError as e:
        raise PrepareError(f"cannot write {e.filename or args.out}: {e.strerror or e}") from None
    manifest["timing_s"] = dict(clean=round(t_clean, 2), tokenizer=round(t_tok, 2), encode=round(t_enc, 2),
                                total=round(time.time() - t0, 2))
    return manifest


def write_outputs(args, model: bytes, sp, encoded, n_sources: int, n_docs: int,
                  n_val_candidates: int, corpus_sha256: str) -> dict:
    """Shards, manifest and tokenizer into temp names next to the destinations, then renamed into place."""
    import train_gpt as tg  # the shard format lives there (imports torch: only once there is something to write)

    (val_tokens, n_val_docs, val_bytes), (train_tokens, n_train_docs, train_bytes) = encoded
    out, tok_out = Path(args.out), Path(args.tokenizer_out)
    created = make_parents(out.parent, tok_out.parent)
    splits = {}
    tmp_dir = tok_tmp = Path("/nonexistent")
    done = False
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tok_tmp = Path(tempfile.mkdtemp(prefix=f".{tok_out.stem}.tmp-", dir=tok_out.parent))
        for split, toks, nd, nb in (("val", val_tokens, n_val_docs, val_bytes),
                                    ("train", train_tokens, n_train_docs, train_bytes)):
            files = 0
            for start in range(0, toks.size, args.shard_tokens):
                tg.write_shard(tmp_dir / f"fineweb_{split}_{files:06d}.bin", toks[start: start + args.shard_tokens])
                files += 1
            splits[split] = dict(docs=nd, tokens=int(toks.size), bytes=nb, files=files)
        (tok_tmp / "model").write_bytes(model)
        vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
        (tok_tmp / "vocab").write_text(vocab, encoding="utf-8")
        manifest = {
            "name": out.name,
            "format": {"header_ints": tg.HEADER_INTS, "magic": tg.SHARD_MAGIC, "version": tg.SHARD_VERSION,
                       "dtype": "uint16", "bos_id": BOS_ID, "append_eos": False},
            "source": {"src": args.src or [f"{args.doc_root}/{KERNEL_DOCS}/**/*.rst.gz",
                                           f"{args.doc_root}/{PYTHON_DOCS}/**/*.rst.txt"],
                       "files": n_sources, "documents": n_docs, "corpus_sha256": corpus_sha256,
                       "corpus_rule": "sha256 of each cleaned document's UTF-8 text + NUL, in shard order"},
            "split": {"rule": f"val if int(sha1(relative path)[:8], 16) % 1000 < {VAL_PER_MILLE}; documents ordered "
                              f"by sha1(relative path); val capped at val_tokens (whole documents, last one cut)",
                      "val_tokens_cap": args.val_tokens, "val_candidates": n_val_candidates,
                      "val_candidates_unused": n_val_candidates - n_val_docs},
            "tokenizer": {"file": tok_out.name, "sha256": hashlib.sha256(model).hexdigest(),
                          "vocab_size": sp.vocab_size(), "trained_on": "train documents only"},
            "shard_tokens": args.shard_tokens,
            "bytes_rule": "UTF-8 bytes of sp.decode(tokens) per document (equals the train_gpt byte LUT sum)",
            "splits": splits,
            "stats": {"docs_total": n_val_docs + n_train_docs, "docs_val": n_val_docs, "docs_train": n_train_docs,
                      "files_total": splits["val"]["files"] + splits["train"]["files"],
                      "files_val": splits["val"]["files"], "files_train": splits["train"]["files"],
                      "tokens_total": splits["val"]["tokens"] + splits["train"]["tokens"],
                      "tokens_val": splits["val"]["tokens"], "tokens_train": splits["train"]["tokens"]},
        }
        (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp makes it private; the dataset folder is an ordinary one
        # into place: tokenizer files, then the dataset folder (an older one is moved aside, then removed)
        os.replace(tok_tmp / "model", tok_out)
        os.replace(tok_tmp / "vocab", tok_out.with_suffix(".vocab"))
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp_dir, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        done = True
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        shutil.rmtree(tok_tmp, ignore_errors=True)
        if not done:  # leave nothing behind, not even the folders this run created
            for d in reversed(created):
                try:
                    d.rmdir()
                except OSError:
                    pass
    return manifest


def make_parents(*dirs: Path) -> list[Path]:
    """mkdir -p each folder; returns the folders created, outermost first."""
    created = []
    for d in dirs:
        missing = []
        while not d.exists():
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            m.mkdir()
            created.append(m)
    return created


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", help="folder of .txt/.md/.rst files (optionally .gz); default: Debian's kernel and "
                                 "Python docs under --doc-root")
    p.add_argument("--doc-root", default=os.environ.get("OFFLINE_DOC_ROOT", DEFAULT_DOC_ROOT),
                   help="where the default source is installed (env OFFLINE_DOC_ROOT; default %(default)s)")
    p.add_argument("--data-dir", default=str(REPO_ROOT / "data"),
                   help="root for datasets/offline_sp<V>/ and tokenizers/offline_<V>_bpe.model (default: data/)")
    p.add_argument("--out", help="dataset folder (default: DATA_DIR/datasets/offline_sp<V>)")
    p.add_argument("--tokenizer-out", help="tokenizer .model path (default: DATA_DIR/tokenizers/offline_<V>_bpe.model)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--val-tokens", type=int, default=65536,
                   help="cap on val tokens, BOS included: whole documents, the last one cut (0: no cap)")
    p.add_argument("--shard-tokens", type=int, default=10**6, help="tokens per shard file (default %(default)s)")
    args = p.parse_args(argv)
    if not 260 < args.vocab_size <= 65536:
        p.error("--vocab-size must be in 261..65536 (byte fallback needs 256 + 4 special pieces)")
    if args.val_tokens < 0 or args.shard_tokens < 1:
        p.error("--val-tokens must be >= 0 and --shard-tokens >= 1")
    v = args.vocab_size
    args.out = args.out or os.path.join(args.data_dir, "datasets", f"offline_sp{v}")
    args.tokenizer_out = args.tokenizer_out or os.path.join(args.data_dir, "tokenizers", f"offline_{v}_bpe.model")
    if not args.tokenizer_out.endswith(".model"):
        p.error("--tokenizer-out must end with .model (the .vocab goes next to it)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        m = build(args)
    except PrepareError as e:
        print(f"prepare_offline: error: {e}", file=sys.stderr)
        return 2
    s = m["splits"]
    print(f"prepare_offline: {m['source']['files']} files -> {m['source']['documents']} documents "
          f"(val {s['val']['docs']} of {m['split']['val_candidates']} candidates, train {s['train']['docs']})")
    for k in ("train", "val"):
        print(f"  {k}: {s[k]['tokens']:,} tokens, {s[k]['bytes']:,} bytes, "
              f"{s[k]['bytes'] / max(s[k]['tokens'], 1):.4f} bytes/token, {s[k]['files']} shard(s)")
    print(f"  corpus_sha256: {m['source']['corpus_sha256']}")
    print(f"  tokenizer: {args.tokenizer_out} (sha256 {m['tokenizer']['sha256'][:16]}...)")
    print(f"  dataset: {args.out}")
    print(f"  time: {m['timing_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
