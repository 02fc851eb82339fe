"""The embedded default corpus: the Python standard library's docs and sources, a BPE tokenizer trained on
them, and their shards, built once into a cache so that `python -m tachyon.train` needs no download."""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

from ..errors import TachyonError
from ..files import atomic_write_json
from ..tokenizer import file_sha256, load_tokenizer, train_bpe
from .shards import ShardWriter

DEFAULT_VERSION = "1"  # bump when the embedded corpus or its tokenizer recipe changes: caches rebuild
DEFAULT_VOCAB = 8192
DEFAULT_MAX_MB_ENV = "TACHYON_DEFAULT_MB"  # caps the embedded corpus (tests set it small)
DEFAULT_MAX_MB = 16.0  # the whole standard library without its tests: about 13 MB, 3M tokens


def cache_dir() -> Path:
    """Where the embedded default is cached: $TACHYON_CACHE, else ~/.cache/tachyon."""
    return Path(os.environ.get("TACHYON_CACHE") or Path.home() / ".cache" / "tachyon").expanduser()


def _stdlib_documents(max_bytes: int) -> tuple[list[str], int]:
    """The embedded corpus: pydoc's topic help texts, then the standard library's .py sources (tests left out),
    in a fixed order, until `max_bytes` of UTF-8 text. Returns (documents, number of files read)."""
    docs, total, n_files = [], 0, 0
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for key in sorted(topics):
        size = len(topics[key].encode())
        if total + size > max_bytes:
            break
        docs.append(topics[key])
        total += size
    n_files += bool(docs)
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skip]  # prune: site-packages alone can hold 10,000s of files
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    for path in files:
        if total >= max_bytes:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        size = len(text.encode())
        if total + size > max_bytes:
            continue
        docs.append(text)
        total += size
        n_files += 1
    return docs, n_files


def _train_default_tokenizer(docs: list[str], root: Path) -> Path:
    """Train the embedded tokenizer into root/tokenizer-<sha256 prefix>.json: content-addressed, so a rebuild
    (another Python's stdlib, another size cap) adds a file and never overwrites one a checkpoint points to."""
    building = root / f".tokenizer-building-{os.getpid()}.json"
    train_bpe(docs, building, vocab_size=DEFAULT_VOCAB, length=len(docs))
    path = root / f"tokenizer-{file_sha256(building)[:16]}.json"
    os.replace(building, path)  # same name, same bytes: replacing an identical earlier build changes nothing
    return path


def embedded_default(seq_len: int = 256, log: Callable[[str], None] = print,
                     max_mb: float | None = None) -> tuple[Path, Path]:
    """(shard_dir, tokenizer_json) of the embedded default corpus, building whatever is not cached yet.

    The corpus is text every Python install has (see `_stdlib_documents`), so the default run needs no download.
    The tokenizer (byte-level BPE, vocab 8192, <|endoftext|> 0, <|pad|> 1) lives in cache_dir()/default under a
    name holding its hash, and shards of width `seq_len` in a sub-folder per width. Everything is keyed by
    DEFAULT_VERSION, the Python version and the size cap (`max_mb`, else $TACHYON_DEFAULT_MB, else 16 MB); when
    the key changes the shards are rebuilt and a new tokenizer file is added beside the old ones, which stay.
    Files are written under temp names and renamed; meta.json comes last, so an interrupted build is redone.
    """
    if max_mb is None:
        max_mb = float(os.environ.get(DEFAULT_MAX_MB_ENV) or DEFAULT_MAX_MB)
    root = cache_dir() / "default"
    key = {"version": DEFAULT_VERSION, "python": sys.version.split()[0], "max_mb": max_mb, "vocab": DEFAULT_VOCAB}
    shard_dir = root / f"seq{seq_len}"
    root_meta, shard_meta = root / "meta.json", shard_dir / "meta.json"

    def current(meta_path: Path) -> dict | None:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("key") == key else None

    recorded = current(root_meta)
    tok_path = root / recorded["tokenizer"] if recorded and isinstance(recorded.get("tokenizer"), str) else None
    tok_ok = tok_path is not None and tok_path.is_file()
    if tok_ok and current(shard_meta):
        log(f"using the cached embedded default corpus in {root}")
        return shard_dir, tok_path
    docs, n_files = _stdlib_documents(int(max_mb * 1e6))
    if not docs:
        raise TachyonError(f"no Python standard-library sources found under {sysconfig.get_paths()['stdlib']} to "
                           "build the embedded default corpus; pass --data-dir and --tokenizer instead")
    log(f"building corpus from {n_files} files ({sum(len(d.encode()) for d in docs) / 1e6:.1f} MB) "
        "of the Python standard library...")
    if not tok_ok:
        root.mkdir(parents=True, exist_ok=True)
        root_meta.unlink(missing_ok=True)
        for stale in root.glob("seq*"):  # every shard folder depends on the tokenizer; tokenizer files all stay
            shutil.rmtree(stale)
        log(f"training tokenizer (byte-level BPE, vocab {DEFAULT_VOCAB})...")
        tok_path = _train_default_tokenizer(docs, root)
        atomic_write_json(root_meta, {"key": key, "tokenizer": tok_path.name})
    tok = load_tokenizer(tok_path)
    log(f"writing shards of {seq_len} tokens to {shard_dir}...")
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    writer = ShardWriter(shard_dir, seq_len, shard_rows=max(1, 1_000_000 // seq_len), eot_id=tok.eot_id,
                         pad_id=tok.pad_id)
    for ids in tok.encode_batch(docs):
        writer.add(ids)
    writer.finish({"key": key, "tokenizer": str(tok_path), "tokenizer_sha256": tok.sha256,
                   "vocab_size": tok.vocab_size})
    log(f"embedded default ready: {writer.n_tokens:,} tokens in {writer.n_shards} shards")
    return shard_dir, tok_path
