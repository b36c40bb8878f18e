"""Pack train_gpt.py the way the leaderboard's records ship it: a small wrapper that executes the compressed source.

The source is minified (python-minifier: comments, docstrings and blank space removed, local names shortened;
module-level names, class attributes and keyword names are kept, so tools that import the wrapper still find
Config, run, ...), compressed with the smaller of lzma (raw LZMA2, preset 9e) and brotli (quality 11), and
written as base85 text inside a two-line loader:

    import brotli as Z,base64 as B
    exec(_SRC:=Z.decompress(B.b85decode("...")))

Run as a script, the wrapper's `__name__` is "__main__" and its `__file__` is the wrapper, so train_gpt.py's
`main()` runs and counts the wrapper's bytes as its code size; `_SRC` (the executed source) is what the run logs.
Packing is deterministic for one python-minifier version.

    python3 tools/pack_code.py                                   # train_gpt.py -> packed/train_gpt.py
    python3 tools/pack_code.py --method lzma                     # a loader that needs only the standard library
    python3 tools/pack_code.py --check packed/train_gpt.py       # which source does a wrapper execute?
"""
from __future__ import annotations

import ast
import base64
import functools
import hashlib
import lzma
import os
import sys
from pathlib import Path

from _cli import Parser

ROOT = Path(__file__).resolve().parent.parent
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
# Loaders by compressor, as (text before, text after) the base85 data. Each sets _SRC (train_gpt.py logs it) and
# executes it in the wrapper's own namespace.
LOADERS = {
    "lzma": ('import lzma as Z,base64 as B\nexec(_SRC:=Z.decompress(B.b85decode("',
             '"),Z.FORMAT_RAW,filters=[{"id":Z.FILTER_LZMA2}]))\n'),
    "brotli": ('import brotli as Z,base64 as B\nexec(_SRC:=Z.decompress(B.b85decode("', '")))\n'),
}
# python-minifier's defaults, plus: docstrings go (nothing reads __doc__); literals are not hoisted into names (the
# compressed result is smaller without). Module-level names are never renamed (tools import them).
MINIFY = dict(remove_literal_statements=True, hoist_literals=False, rename_globals=False, rename_locals=True)


class PackError(Exception):
    """Bad input: printed as one line, exit status 2."""


@functools.lru_cache(maxsize=8)  # the audits of one folder minify the same source again and again
def minify(source: str) -> str:
    try:
        import python_minifier
    except ImportError:
        raise PackError("python-minifier is not installed: pip install -r requirements.txt") from None
    try:
        ast.parse(source)
    except SyntaxError as e:
        raise PackError(f"the source does not parse (line {e.lineno}: {e.msg})") from None
    return python_minifier.minify(source, **MINIFY)


def compress(data: bytes) -> dict:
    """{method: compressed bytes} for every available compressor."""
    out = {"lzma": lzma.compress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)}
    try:
        import brotli
        out["brotli"] = brotli.compress(data, quality=11)
    except ImportError:
        pass
    return out


def decompress(method: str, blob: bytes) -> bytes:
    if method == "lzma":
        return lzma.decompress(blob, lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    import brotli
    return brotli.decompress(blob)


def pack(source: str, method: str = "auto") -> tuple[bytes, dict]:
    """(wrapper bytes, facts): the minified source compressed with the smaller compressor (or `method`), in its
    loader."""
    mini = minify(source).encode("utf-8")
    blobs = compress(mini)
    if method == "auto":
        method = min(blobs, key=lambda k: len(blobs[k]))
    elif method not in blobs:
        raise PackError(f"--method {method}: the {method} module is not installed")
    head, tail = LOADERS[method]
    wrapper = (head + base64.b85encode(blobs[method]).decode("ascii") + tail).encode("ascii")
    assert unpack(wrapper) == (method, mini), "the wrapper does not decode to the minified source"
    return wrapper, {"method": method, "source_bytes": len(source.encode("utf-8")), "minified_bytes": len(mini),
                     **{f"{k}_bytes": len(v) for k, v in blobs.items()}, "wrapper_bytes": len(wrapper)}


def unpack(wrapper: bytes) -> tuple[str, bytes] | None:
    """(compressor, executed source) of a wrapper made by pack(), read without executing it; None for anything
    else (a plain source file, another kind of wrapper)."""
    try:
        text = wrapper.decode("ascii")
    except UnicodeDecodeError:
        return None
    for method, (head, tail) in LOADERS.items():
        if text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail):
            try:
                return method, decompress(method, base64.b85decode(text[len(head): len(text) - len(tail)]))
            except Exception:  # not base85, or not a stream of this compressor
                return None
    return None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv=None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", default=str(ROOT / "train_gpt.py"), help="the readable source "
                    "(default: the repository's train_gpt.py); with --check, the wrapper to inspect")
    ap.add_argument("-o", "--out", default=str(ROOT / "packed" / "train_gpt.py"),
                    help="the wrapper to write (default packed/train_gpt.py; keep the name train_gpt.py)")
    ap.add_argument("--method", choices=("auto", "lzma", "brotli"), default="auto", help="the compressor (default: "
                    "the smaller; lzma needs only the standard library where the wrapper runs, brotli the brotli "
                    "package)")
    ap.add_argument("--check", action="store_true", help="print what a wrapper executes instead of packing")
    args = ap.parse_args(argv)
    src = Path(args.source)
    try:
        try:
            raw = src.read_bytes()
        except OSError as e:
            raise PackError(f"{src}: cannot read ({e.strerror})") from None
        if args.check:
            got = unpack(raw)
            if got is None:
                print(f"{src}: not a wrapper made by pack_code.py ({len(raw):,} bytes, sha256 {sha256(raw)})")
                return 1
            method, code = got
            print(f"{src}: wrapper of {len(raw):,} bytes (sha256 {sha256(raw)}), {method}; executes "
                  f"{len(code):,} bytes of minified source (sha256 {sha256(code)})")
            return 0
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PackError(f"{src}: not UTF-8 text") from None
        if unpack(raw) is not None:
            raise PackError(f"{src} is already a packed wrapper: pack the readable source")
        out = Path(args.out)
        if out.resolve() == src.resolve():
            raise PackError(f"-o {out} would overwrite the source: write the wrapper elsewhere")
        wrapper, facts = pack(text, args.method)
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_atomic(out, wrapper)
    sizes = ", ".join(f"{k} {facts[k + '_bytes']:,}" for k in ("lzma", "brotli") if k + "_bytes" in facts)
    print(f"{src} ({facts['source_bytes']:,} bytes) -> minified {facts['minified_bytes']:,} -> {sizes} -> "
          f"{out}: {facts['wrapper_bytes']:,} bytes ({facts['method']} + base85), "
          f"{facts['source_bytes'] - facts['wrapper_bytes']:,} bytes fewer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
