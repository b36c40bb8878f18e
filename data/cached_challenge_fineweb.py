#!/usr/bin/env python3
"""Download the competition's published FineWeb export (shards + tokenizer) from the Hugging Face hub.

    python data/cached_challenge_fineweb.py                          # sp1024: all val + 80 train shards
    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 8 --with-docs

Reads `<root>/manifest.json` of the dataset repo first (repo `willdepueoai/parameter-golf`, env
MATCHED_FINEWEB_REPO_ID; root `datasets`, env MATCHED_FINEWEB_REMOTE_ROOT_PREFIX), then fetches every
fineweb_val_NNNNNN.bin, the first --train-shards fineweb_train_NNNNNN.bin and the tokenizer files, one at a time
with `hf_hub_download(repo_type="dataset")`. Files are hard-linked (or copied) out of the HF cache:
    <root>/<dataset path>/...  -> data/datasets/fineweb10B_<variant>/...
    <root>/tokenizers/...      -> data/tokenizers/...
    <root>/manifest.json, docs -> data/datasets/
Resumable: a shard whose size matches its header, or another file that exists, is not fetched again.
Without network it fails within seconds with one line on stderr (HF_HUB_OFFLINE=1: only the HF cache is used).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
PREFLIGHT_TIMEOUT_S = 10.0
OFFLINE_ENV = "HF_HUB_OFFLINE=1 is set"


class FetchError(Exception):
    """Reported as one line on stderr, exit status 2."""


def variant_arg(s: str) -> str:
    if not re.fullmatch(r"sp\d+|byte260", s):
        raise argparse.ArgumentTypeError(f"{s!r} is not a variant: use sp1024, sp2048, sp4096, sp8192 or byte260")
    return s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", type=variant_arg, default="sp1024", help="sp1024 (default) | sp<N> | byte260")
    p.add_argument("--train-shards", type=int, default=80, help="first N train shards (1e8 tokens each); default 80")
    p.add_argument("--with-docs", action="store_true",
                   help="also fetch docs_selected.jsonl and docs_selected.source_manifest.json (large)")
    p.add_argument("--data-dir", default=str(REPO_ROOT / "data"), help="local root (default: data/ of this repo)")
    args = p.parse_args(argv)
    if args.train_shards < 0:
        p.error("--train-shards must be >= 0")
    return args


# ---- manifest ----
def select_dataset(manifest: dict, variant: str) -> tuple[dict, dict]:
    """The manifest's dataset entry for the variant and its tokenizer entry."""
    datasets = manifest.get("datasets") or []
    want = f"fineweb10B_{variant}"
    for d in datasets:
        if d.get("name") == want or Path(d.get("path", "")).name == want:
            break
    else:
        have = ", ".join(sorted(str(d.get("name")) for d in datasets)) or "none"
        raise FetchError(f"the manifest has no dataset {want} (it has: {have})")
    for t in manifest.get("tokenizers") or []:
        if t.get("name") == d.get("tokenizer_name"):
            return d, t
    raise FetchError(f"the manifest has no tokenizer {d.get('tokenizer_name')!r} for dataset {want}")


def plan_files(manifest: dict, variant: str, train_shards: int, with_docs: bool) -> list[tuple[str, str, bool]]:
    """(remote path relative to the root, local path relative to the data dir, is_shard) for every file."""
    d, tok = select_dataset(manifest, variant)
    stats = d.get("stats") or {}
    try:
        n_val, n_train = int(stats["files_val"]), int(stats["files_train"])
    except (KeyError, TypeError, ValueError):
        raise FetchError(f"the manifest's dataset {d.get('name')} has no stats.files_val/files_train") from None
    if train_shards > n_train:
        raise FetchError(f"--train-shards {train_shards} is more than the {n_train} train shards published "
                         f"for {d.get('name')}")
    path = d.get("path") or f"datasets/fineweb10B_{variant}"
    files = [(f"{path}/fineweb_val_{i:06d}.bin", f"{path}/fineweb_val_{i:06d}.bin", True) for i in range(n_val)]
    files += [(f"{path}/fineweb_train_{i:06d}.bin", f"{path}/fineweb_train_{i:06d}.bin", True)
              for i in range(train_shards)]
    artifacts = [tok[k] for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    if not artifacts:
        raise FetchError(f"the manifest's tokenizer {tok.get('name')} names no model_path/vocab_path/path")
    files += [(a, a, False) for a in artifacts]
    if with_docs:
        docs = manifest.get("docs_jsonl") or "docs_selected.jsonl"
        sidecar = docs[: -len(".jsonl")] + ".source_manifest.json" if docs.endswith(".jsonl") else docs + ".source_manifest.json"
        files += [(docs, f"datasets/{docs}", False), (sidecar, f"datasets/{sidecar}", False)]
    return files


def shard_defect(path: Path) -> str | None:
    """Why a local shard is unusable (missing, bad header, size not matching the header), or None."""
    import train_gpt as tg

    try:
        tg.read_shard_header(path)
    except tg.DataError as e:
        return str(e)
    except ValueError as e:  # a file shorter than the header whose size is not a multiple of 4
        return f"{path}: truncated header ({e})"
    return None


def is_complete(path: Path, is_shard: bool) -> bool:
    if not path.is_file():
        return False
    return shard_defect(path) is None if is_shard else path.stat().st_size > 0


# ---- hub ----
class Hub:
    def __init__(self, repo_id: str, root: str):
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.hf, self.repo_id, self.root = huggingface_hub, repo_id, root.strip("/")
        self.endpoint = constants.ENDPOINT
        self.offline_reason = OFFLINE_ENV if constants.HF_HUB_OFFLINE else None
        self.fetched = 0

    def remote(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def preflight(self, rel: str) -> None:
        """One HEAD with a short timeout and no retries: without network, use only the HF cache (no 23 s of retries)."""
        if self.offline_reason:
            return
        from huggingface_hub.errors import HfHubHTTPError

        url = self.hf.hf_hub_url(self.repo_id, self.remote(rel), repo_type="dataset")
        try:
            self.hf.get_hf_file_metadata(url, timeout=PREFLIGHT_TIMEOUT_S)
        except HfHubHTTPError as e:
            status = getattr(e.response, "status_code", "?")
            raise FetchError(f"{self.endpoint}: {self.remote(rel)} of dataset {self.repo_id} is not available "
                             f"(HTTP {status}); check MATCHED_FINEWEB_REPO_ID / MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
                             ) from None
        except Exception as e:  # connection refused, DNS failure, timeout, proxy: no network
            self.offline_reason = f"{self.endpoint} is unreachable ({type(e).__name__}: {_first_line(e)})"

    def download(self, rel: str, force: bool = False) -> Path:
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

        remote = self.remote(rel)
        try:
            path = self.hf.hf_hub_download(self.repo_id, remote, repo_type="dataset", force_download=force,
                                           local_files_only=self.offline_reason is not None)
        except LocalEntryNotFoundError:
            fix = "unset HF_HUB_OFFLINE" if self.offline_reason == OFFLINE_ENV else "connect to the network"
            raise FetchError(f"{remote} of dataset {self.repo_id} is not in the local Hugging Face cache and "
                             f"{self.offline_reason or 'the hub is unreachable'}: {fix}, or build the offline "
                             f"dataset with `python data/prepare_offline.py`") from None
        except EntryNotFoundError:
            raise FetchError(f"{remote} is missing from dataset {self.repo_id} on {self.endpoint}") from None
        except HfHubHTTPError as e:
            raise FetchError(f"{remote}: {_first_line(e)}") from None
        except OSError as e:
            raise FetchError(f"{remote}: {e.strerror or e}") from None
        except Exception as e:  # network dropped mid-run
            raise FetchError(f"{remote}: download failed ({type(e).__name__}: {_first_line(e)})") from None
        return Path(path).resolve(strict=True)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def place(src: Path, dest: Path) -> None:
    """Hard-link (same filesystem) or copy `src` to `dest` via a temp name, so `dest` is never half-written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(hub: Hub, rel: str, dest: Path, is_shard: bool) -> None:
    place(hub.download(rel), dest)
    if is_shard and shard_defect(dest):
        # the cached blob itself is bad (e.g. a hard-linked copy was truncated in place): fetch it again
        if hub.offline_reason:
            raise FetchError(f"{shard_defect(dest)} (the cached copy is bad and {hub.offline_reason})")
        dest.unlink()
        place(hub.download(rel, force=True), dest)
        if shard_defect(dest):
            raise FetchError(f"{shard_defect(dest)} (as served by {hub.endpoint})")
    hub.fetched += 1


def run(args) -> str:
    from tqdm import tqdm

    data_dir = Path(args.data_dir)
    repo_id = os.environ.get("MATCHED_FINEWEB_REPO_ID") or DEFAULT_REPO_ID
    root = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT)
    hub = Hub(repo_id, root)
    hub.preflight("manifest.json")
    manifest_path = data_dir / "datasets" / "manifest.json"
    try:
        place(hub.download("manifest.json"), manifest_path)
    except FetchError:
        if not (hub.offline_reason and manifest_path.is_file()):
            raise  # offline with a local copy from an earlier run: use it
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FetchError(f"{manifest_path}: not a readable manifest ({_first_line(e)})") from None
    files = plan_files(manifest, args.variant, args.train_shards, args.with_docs)
    todo = [f for f in files if not is_complete(data_dir / f[1], f[2])]
    # no progress bar offline: linking out of the cache is instant, and a failure stays one line on stderr
    with tqdm(todo, desc=args.variant, unit="file", dynamic_ncols=True,
              disable=not todo or hub.offline_reason is not None) as bar:
        for rel, local, is_shard in bar:
            bar.set_postfix_str(Path(local).name)
            fetch(hub, rel, data_dir / local, is_shard)
    skipped = len(files) - len(todo)
    d, _ = select_dataset(manifest, args.variant)
    where = data_dir / (d.get("path") or f"datasets/fineweb10B_{args.variant}")
    note = f" (offline: {hub.offline_reason})" if hub.offline_reason else ""
    return (f"cached_challenge_fineweb: {args.variant}: {hub.fetched} file(s) fetched, {skipped} already complete"
            f"{note} -> {where}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(run(args))
    except FetchError as e:
        print(f"cached_challenge_fineweb: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cached_challenge_fineweb: interrupted (rerun to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
