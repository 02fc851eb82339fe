"""Training data: the memory-mapped shard reader, the shard writer, `download`, and the embedded default corpus.

Shards are `shard_NNNNN.npy`, 2-D (rows, width) integer arrays (int32; uint16 and int64 accepted) with
end-of-text id 0 between documents and pad id 1 filling the last row: the layout of the original
PreprocessedMIXED dataset, so its files train here unchanged. `prepare` (your own text) lives in tachyon.prepare.

    python -m tachyon.data prepare --tokenizer T --input PATH... --out DIR --seq-len 2048
    python -m tachyon.data download --repo SuperGoatScriptGuy/PreprocessedMIXED --shards 0-49 --out ./data
    python -m tachyon.data check DIR [--tokenizer T | --vocab-size N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import sysconfig
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import TachyonError, run_cli
from .files import atomic_write
from .model import IGNORE_INDEX
from .tokenizer import file_sha256, load_tokenizer, train_bpe

SHARD_GLOB = "shard_*.npy"
SPLIT_SEED = 1234  # the val/train split is a property of the data, not of a run's --seed
DEFAULT_VERSION = "1"  # bump when the embedded corpus or its tokenizer recipe changes: caches rebuild
DEFAULT_VOCAB = 8192
DEFAULT_MAX_MB_ENV = "TACHYON_DEFAULT_MB"  # caps the embedded corpus (tests set it small)
DEFAULT_MAX_MB = 16.0  # the whole standard library without its tests: about 13 MB, 3M tokens


def shard_name(index: int) -> str:
    """The file name of shard `index`, as in the original dataset."""
    return f"shard_{index:05d}.npy"


def cache_dir() -> Path:
    """Where the embedded default is cached: $TACHYON_CACHE, else ~/.cache/tachyon."""
    return Path(os.environ.get("TACHYON_CACHE") or Path.home() / ".cache" / "tachyon").expanduser()


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save `array` as `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: np.save(f, array))


def _atomic_write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON to `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


# ---------------------------------------------------------------------------------------------- reading shards


def find_shards(data_dir: str | Path) -> list[Path]:
    """The `shard_*.npy` files of a data dir, sorted by name.

    A folder laid out by a hub download (files one level down, e.g. a `snapshots/<rev>/` folder) is accepted
    when exactly one sub-folder holds shards.
    """
    data_dir = Path(data_dir).expanduser()
    if data_dir.is_file():
        raise TachyonError(f"data dir {data_dir} is a file, not a folder; pass --data-dir with the folder that holds "
                           f"the {SHARD_GLOB} files")
    if not data_dir.is_dir():
        raise TachyonError(f"data dir {data_dir} does not exist; pass --data-dir with a folder of {SHARD_GLOB} files "
                           "(make one with `python -m tachyon.data prepare` or `download`)")
    shards = sorted(data_dir.glob(SHARD_GLOB))
    if not shards:
        found = sorted(data_dir.rglob(SHARD_GLOB))
        parents = sorted({p.parent for p in found})
        if len(parents) > 1:
            raise TachyonError(f"data dir {data_dir} has {SHARD_GLOB} files in several folders "
                               f"({', '.join(str(p) for p in parents[:3])}); pass one of them as --data-dir")
        shards = found
    if not shards:
        raise TachyonError(f"data dir {data_dir} has no {SHARD_GLOB} files; make some with "
                           "`python -m tachyon.data prepare` or `download`, or point --data-dir at them")
    return shards


@dataclass(frozen=True)
class ShardInfo:
    """Where a shard's rows live in its file: enough to read any window without mapping or loading the shard."""

    path: Path
    rows: int
    width: int
    dtype: np.dtype
    offset: int  # bytes of .npy header before the data


def open_shard(path: Path) -> ShardInfo:
    """Check one shard through numpy's memory map (only its header is read; the map is dropped again).

    A 2-D C-ordered integer array whose file holds every row it declares, or a TachyonError naming the file.
    """
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # np.memmap refuses files shorter than declared
    except Exception as exc:  # truncated data, a bad header, a pickle, not an .npy at all
        raise TachyonError(f"shard {path} is truncated or not a valid .npy file ({exc}); "
                           "re-download or re-prepare it, or move it out of the data dir") from None
    if not np.issubdtype(array.dtype, np.integer):
        raise TachyonError(f"shard {path} holds {array.dtype} values, not token ids; shards must be integer "
                           "(int32, uint16 or int64) arrays")
    if array.ndim != 2:
        raise TachyonError(f"shard {path} is {array.ndim}-D with shape {array.shape}; shards must be 2-D "
                           "(rows, seq_len) arrays, as written by `python -m tachyon.data prepare`")
    if np.isfortran(array):
        raise TachyonError(f"shard {path} is stored in Fortran order; re-save it with np.save(path, "
                           "np.ascontiguousarray(array))")
    info = ShardInfo(Path(path), array.shape[0], array.shape[1], array.dtype, array.offset)
    array._mmap.close()  # a kept map would also keep a file descriptor per shard (2,685 of them for the full set)
    return info


def _scan_ids(info: ShardInfo, vocab_size: int | None, advance: Callable[[int], object],
              chunk: int = 1 << 22) -> str | None:
    """Read a whole shard through a memory map, a chunk of rows at a time; the first id outside [0, vocab_size)
    (or below 0 without a vocab size) in words, or None. `advance(n)` is told of every n ids read."""
    array = np.load(info.path, mmap_mode="r", allow_pickle=False)
    try:
        step = max(1, chunk // max(1, info.width))
        for start in range(0, info.rows, step):
            rows = np.asarray(array[start:start + step])
            advance(rows.size)
            lo, hi = int(rows.min(initial=0)), int(rows.max(initial=0))
            if lo >= 0 and (vocab_size is None or hi < vocab_size):
                continue
            bad = (rows < 0) if vocab_size is None else (rows < 0) | (rows >= vocab_size)
            row, col = (int(i) for i in np.argwhere(bad)[0])
            where = f"{rows[row, col]} at row {start + row}, column {col}"
            if vocab_size is None:
                return f"shard {info.path} holds a negative token id {where}"
            return f"shard {info.path} holds token id {where}: outside [0, {vocab_size}), the vocab size"
        return None
    finally:
        array._mmap.close()


def check_shards(data_dir: str | Path, vocab_size: int | None = None, progress: bool = True) -> list[str]:
    """Scan every shard of a data dir in full: headers, dtypes and widths, then every id against `vocab_size`.

    Returns the problems found, one line each (empty: the data is sound). The trainer checks headers, dtypes and
    widths when it starts and ids only in the batches it reads; this reads everything once, memory-mapped.
    """
    from tqdm import tqdm

    problems, shards = [], []
    for path in find_shards(data_dir):
        try:
            shards.append(open_shard(path))
        except TachyonError as exc:
            problems.append(str(exc))
    widths = sorted({info.width for info in shards})
    if len(widths) > 1:
        problems.append(f"shards in {data_dir} have different widths ({widths}); keep one seq_len per data dir")
    with tqdm(total=sum(info.rows * info.width for info in shards), unit="tok", unit_scale=True, desc="check",
              disable=not progress) as bar:
        for info in shards:
            if problem := _scan_ids(info, vocab_size, bar.update):
                problems.append(problem)
    return problems


def _vocab_for_check(data_dir: Path, tokenizer: str | None, vocab_size: int | None) -> int | None:
    """The vocab size to check ids against: --vocab-size, else the tokenizer's, else the one meta.json records."""
    if vocab_size is not None:
        return vocab_size
    if tokenizer is not None:
        return load_tokenizer(tokenizer).vocab_size
    try:
        recorded = json.loads((Path(data_dir) / "meta.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, int) else None


class _WindowReader:
    """Reads token windows straight from shard files with os.pread, one small cache of open files per thread.

    Why not index the memory map: every page touched through a map counts toward the process's RSS, and recent
    kernels map whole large page-cache folios (up to 2 MB) per fault, so a few hundred random windows of a
    freshly written shard added ~200 MB of RSS in a test. pread copies only the window; the page cache still
    serves repeated reads, and the GIL is released during the read so worker threads overlap.
    """

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._local = threading.local()
        self._caches: list[OrderedDict[Path, int]] = []  # every thread's cache, so close() reaches them all
        self._lock = threading.Lock()

    def read(self, shard: ShardInfo, row: int, start: int, length: int) -> np.ndarray:
        """`length` ids of `shard` starting at (row, start), in the shard's own dtype."""
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = OrderedDict()
            with self._lock:
                self._caches.append(files)
        fd = files.pop(shard.path, None)
        if fd is None:
            fd = os.open(shard.path, os.O_RDONLY)
            while len(files) >= self.max_open:
                os.close(files.popitem(last=False)[1])
        files[shard.path] = fd
        size = shard.dtype.itemsize
        raw = os.pread(fd, length * size, shard.offset + (row * shard.width + start) * size)
        if len(raw) != length * size:
            raise TachyonError(f"shard {shard.path} ended early (truncated after it was opened?); "
                               "re-download or re-prepare it")
        return np.frombuffer(raw, dtype=shard.dtype)

    def close(self) -> None:
        """Close every thread's files; call only when no read is in flight."""
        with self._lock:
            for files in self._caches:
                while files:
                    os.close(files.popitem()[1])


class BatchLoader:
    """Infinite (inputs, targets) batches from memory-mapped shards in a seeded order that any worker count repeats.

    Every (shard, row, window) is an item; a row of width W gives W // seq_len windows. The split (train/val)
    is a fixed set of items; each epoch walks a permutation of it drawn with the seed and epoch, and batches take
    consecutive runs of that walk (crossing into the next epoch when one ends). The position is one number of
    items consumed, so `state_dict()` resumes at exactly the next unseen batch, even with another batch size.
    Workers (threads) only read ahead; they never change what comes out.
    """

    def __init__(self, data_dir: str | Path, *, batch_size: int, seq_len: int, seed: int = 42, num_workers: int = 0,
                 vocab_size: int | None = None, device: str | torch.device = "cpu", split: str = "train",
                 val_fraction: float = 0.0, val_shards: int = 0, pad_id: int | None = 1):
        if batch_size < 1 or seq_len < 2:
            raise TachyonError(f"batch size must be >= 1 and seq-len >= 2 (got {batch_size} and {seq_len})")
        if split not in ("train", "val"):
            raise TachyonError(f"split must be 'train' or 'val', not {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise TachyonError(f"--val-fraction must be in [0, 1), not {val_fraction}")
        self.paths = find_shards(data_dir)
        self.shards = [open_shard(p) for p in self.paths]
        widths = {info.width for info in self.shards}
        if len(widths) > 1:
            first = self.shards[0].width
            odd = next(info.path for info in self.shards if info.width != first)
            raise TachyonError(f"shards in {Path(data_dir)} have different widths ({sorted(widths)}), e.g. "
                               f"{self.paths[0].name} is {first} wide but {odd.name} is not; "
                               "keep shards of one seq_len per data dir")
        self.width = widths.pop()
        if seq_len > self.width:
            raise TachyonError(f"seq-len {seq_len} is longer than the shard rows ({self.width} tokens in "
                               f"{self.paths[0]}); use --seq-len {self.width} or less, or re-prepare with a longer one")
        self.batch_size, self.seq_len, self.seed, self.split = batch_size, seq_len, seed, split
        self.vocab_size, self.pad_id, self.device = vocab_size, pad_id, torch.device(device)
        self.tokens_per_batch = batch_size * seq_len
        self.windows_per_row = self.width // seq_len
        counts = [info.rows * self.windows_per_row for info in self.shards]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.items = self._split_items(split, val_fraction, val_shards, data_dir)
        self.num_items = len(self.items)
        self._consumed = 0  # items handed out so far, across epochs: epoch * num_items + position
        self._planned = 0  # items already submitted to the read-ahead queue
        self._perms: dict[int, np.ndarray] = {}
        self.num_workers = num_workers
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="tachyon-data") if num_workers > 0 else None
        self._queue: deque[Future] = deque()
        self._reader = _WindowReader()

    def _split_items(self, split: str, val_fraction: float, val_shards: int, data_dir: str | Path) -> np.ndarray:
        total = int(self._offsets[-1])
        if val_shards > 0:
            if val_shards >= len(self.paths) and split == "train":
                raise TachyonError(f"--val-shards {val_shards} leaves no training shards ({len(self.paths)} in "
                                   f"{data_dir}); use fewer validation shards")
            cut = int(self._offsets[max(len(self.paths) - val_shards, 0)])
            items = np.arange(cut, total) if split == "val" else np.arange(0, cut)
        elif val_fraction > 0:
            order = np.random.default_rng(SPLIT_SEED).permutation(total)
            n_val = int(total * val_fraction)
            items = np.sort(order[total - n_val:] if split == "val" else order[: total - n_val])
        else:
            items = np.arange(total) if split == "train" else np.arange(0)
        if len(items) == 0:
            if split == "val":
                raise TachyonError(f"the validation split of {data_dir} is empty ({total} windows of {self.seq_len} "
                                   "tokens); pass --val-fraction (e.g. 0.01) or --val-shards N with enough data")
            raise TachyonError(f"{data_dir} has no windows of {self.seq_len} tokens to train on; add data")
        return items.astype(np.int64)

    # -- order

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def _plan(self, start: int) -> np.ndarray:
        """The item ids of the batch whose first item is number `start` of the endless walk."""
        parts, pos, need = [], start, self.batch_size
        while need:
            epoch, offset = divmod(pos, self.num_items)
            take = min(need, self.num_items - offset)
            parts.append(self.items[self._perm(epoch)[offset:offset + take]])
            pos, need = pos + take, need - take
        return np.concatenate(parts)

    # -- reading

    def _read(self, item_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the windows out of the memory maps, check the ids, and build shifted targets (CPU, maybe pinned)."""
        shard_idx = np.searchsorted(self._offsets, item_ids, side="right") - 1
        rows, windows = np.divmod(item_ids - self._offsets[shard_idx], self.windows_per_row)
        T = self.seq_len
        buf = np.empty((len(item_ids), T), dtype=np.int64)
        for b, (s, r, w) in enumerate(zip(shard_idx, rows, windows, strict=True)):
            buf[b] = self._reader.read(self.shards[s], int(r), int(w) * T, T)
        self._check_ids(buf, shard_idx)
        inputs = torch.from_numpy(buf)
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets[:, :-1] = inputs[:, 1:]
        if self.pad_id is not None:
            targets[targets == self.pad_id] = IGNORE_INDEX
        if self.device.type == "cuda":
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets

    def _check_ids(self, buf: np.ndarray, shard_idx: np.ndarray) -> None:
        """Cheap per-batch check on the CPU, so a bad id is a clear error and never a CUDA device-side assert."""
        lo, hi = int(buf.min()), int(buf.max())
        if lo < 0:
            path = self.paths[shard_idx[int(np.argmin(buf.min(axis=1)))]]
            raise TachyonError(f"shard {path} holds a negative token id ({lo}); the shard is corrupt, re-prepare it")
        if self.vocab_size is not None and hi >= self.vocab_size:
            path = self.paths[shard_idx[int(np.argmax(buf.max(axis=1)))]]
            raise TachyonError(f"shard {path} holds token id {hi} but the model's vocab_size is {self.vocab_size}; "
                               "use the tokenizer these shards were made with (--tokenizer) or a larger vocab")

    # -- iteration

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) pair, each (batch_size, seq_len) int64 on the loader's device."""
        if self._pool is None:
            inputs, targets = self._read(self._plan(self._consumed))
        else:
            while len(self._queue) < 2 * self.num_workers:
                self._queue.append(self._pool.submit(self._read, self._plan(self._planned)))
                self._planned += self.batch_size
            inputs, targets = self._queue.popleft().result()
        self._consumed += self.batch_size
        if self.device.type != "cpu":
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
        return inputs, targets

    @property
    def epoch(self) -> int:
        """How many full passes over the split have been handed out."""
        return self._consumed // self.num_items

    def state_dict(self) -> dict:
        """The reader's position (epoch, position within it) and what it depends on, for checkpoints."""
        epoch, position = divmod(self._consumed, self.num_items)
        return {"epoch": epoch, "position": position, "seed": self.seed, "num_items": self.num_items,
                "seq_len": self.seq_len, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: the next batch is the first one not yet seen. Adopts the saved seed."""
        if state.get("num_items", self.num_items) != self.num_items or state.get("seq_len", self.seq_len) != \
                self.seq_len:
            raise TachyonError(f"the saved data position is for {state.get('num_items')} windows of "
                               f"{state.get('seq_len')} tokens but this data has {self.num_items} of {self.seq_len}; "
                               "resume with the same --data-dir, --seq-len and validation split")
        self._drain()
        self.seed = int(state.get("seed", self.seed))
        self._perms.clear()
        self._consumed = self._planned = int(state["epoch"]) * self.num_items + int(state["position"])

    def reset(self) -> None:
        """Start again from the first batch of epoch 0 (e.g. to score the same validation batches at every eval)."""
        self.load_state_dict({"epoch": 0, "position": 0})

    def _drain(self) -> None:
        while self._queue:
            future = self._queue.popleft()
            if not future.cancel():
                future.exception()  # wait; an error in a batch never handed out is not the caller's problem
        self._planned = self._consumed

    def close(self) -> None:
        """Stop the read-ahead threads and close the shard files."""
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._reader.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to report
            pass

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- writing shards


class ShardWriter:
    """Packs documents, each followed by end-of-text, into fixed rows and writes them as numbered shards.

    Right after `add` reports that it wrote shards, whatever is still pending (`carry`) is a tail of that one
    document, shorter than a shard: the moment for `prepare` to record where to resume (see `restore`).
    `meta.json` is written last: its presence means the set is complete. The last row is filled up with the pad
    id, or dropped when the tokenizer has none (pad_id None).
    """

    def __init__(self, out_dir: Path, seq_len: int, shard_rows: int, eot_id: int, pad_id: int | None,
                 dtype: np.dtype = np.int32):
        self.out_dir, self.seq_len, self.shard_rows = out_dir, seq_len, shard_rows
        self.eot_id, self.pad_id, self.dtype = eot_id, pad_id, np.dtype(dtype)
        self._pending: list[np.ndarray] = []  # token chunks not yet written
        self._pending_len = 0
        self.n_shards = self.n_tokens = self.n_docs = 0

    @property
    def carry(self) -> np.ndarray:
        """The tokens added but not written yet, as one array."""
        return np.concatenate(self._pending) if self._pending else np.empty(0, self.dtype)

    def restore(self, n_shards: int, n_tokens: int, n_docs: int, carry: np.ndarray) -> None:
        """Continue as if the first `n_shards` shards had just been written with `carry` left over (a resumed run)."""
        self.n_shards, self.n_tokens, self.n_docs = n_shards, n_tokens, n_docs
        self._pending = [carry.astype(self.dtype)] if len(carry) else []
        self._pending_len = len(carry)

    def add(self, ids: list[int]) -> bool:
        """Append one document (and an end-of-text after it); True when that completed one or more shards."""
        if not ids:
            return False
        chunk = np.empty(len(ids) + 1, dtype=self.dtype)
        chunk[:-1] = ids
        chunk[-1] = self.eot_id
        self._pending.append(chunk)
        self._pending_len += len(chunk)
        self.n_tokens += len(chunk)
        self.n_docs += 1
        if self._pending_len < self.seq_len * self.shard_rows:
            return False
        self._flush(final=False)
        return True

    def _flush(self, final: bool) -> None:
        flat = self.carry
        per_shard = self.seq_len * self.shard_rows
        start = 0
        while len(flat) - start >= per_shard:
            self._write(flat[start:start + per_shard].reshape(self.shard_rows, self.seq_len))
            start += per_shard
        rest = flat[start:]
        if final and self.pad_id is None:  # nothing to pad with: drop the partial last row
            whole = len(rest) - len(rest) % self.seq_len
            self.n_tokens -= len(rest) - whole
            rest = rest[:whole]
        if final and len(rest):
            if short := -len(rest) % self.seq_len:
                rest = np.concatenate([rest, np.full(short, self.pad_id, dtype=self.dtype)])
            self._write(rest.reshape(-1, self.seq_len))
            rest = rest[:0]
        self._pending, self._pending_len = ([rest] if len(rest) else []), len(rest)

    def _write(self, rows: np.ndarray) -> None:
        path = self.out_dir / shard_name(self.n_shards)
        self.n_shards += 1
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(path, np.ascontiguousarray(rows))

    def finish(self, meta: dict) -> dict:
        """Write the last (padded) shard and meta.json; returns the metadata written."""
        self._flush(final=True)
        meta = {**meta, "seq_len": self.seq_len, "shard_rows": self.shard_rows, "dtype": self.dtype.name,
                "num_shards": self.n_shards, "num_tokens": self.n_tokens, "num_documents": self.n_docs,
                "eot_id": self.eot_id, "pad_id": self.pad_id}
        _atomic_write_json(self.out_dir / "meta.json", meta)
        return meta


# ---------------------------------------------------------------------------------------------- download


def parse_shard_range(spec: str) -> list[int]:
    """'0-49' or '0,3,7-9' -> shard indices, sorted and unique."""
    indices: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise TachyonError(f"--shards {spec!r} is not a range like 0-49 or a list like 0,3,7-9")
        lo = int(m.group(1))
        indices.update(range(lo, int(m.group(2) or lo) + 1))
    return sorted(indices)


def download(repo: str, shards: str, out: str | Path, log: Callable[[str], None] = print) -> list[Path]:
    """Fetch exactly the named shards of a hub dataset into `out` with huggingface_hub (which resumes partial files)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    names = [shard_name(i) for i in parse_shard_range(shards)]
    try:
        infos = HfApi().get_paths_info(repo, names, repo_type="dataset")
    except RepositoryNotFoundError:
        raise TachyonError(f"dataset {repo} was not found on the Hugging Face hub; check --repo") from None
    except Exception as exc:
        raise TachyonError(f"could not reach the Hugging Face hub for {repo} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); check the network and retry") from None
    found = {info.path: getattr(info, "size", None) or 0 for info in infos}
    missing = [n for n in names if n not in found]
    if missing:
        raise TachyonError(f"dataset {repo} has no {missing[0]}" + (f" (and {len(missing) - 1} more)" if
                           len(missing) > 1 else "") + "; choose --shards within the dataset")
    out = Path(out)
    log(f"downloading {len(names)} shards, {sum(found.values()) / 1e9:.2f} GB in all, from {repo} to {out} "
        "(files already there are skipped)")
    try:
        snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=names, local_dir=str(out))
    except Exception as exc:
        raise TachyonError(f"download from {repo} stopped ({type(exc).__name__}); run the same command again "
                           "to resume") from None
    return [out / n for n in names]


# ---------------------------------------------------------------------------------------------- embedded default


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
        _atomic_write_json(root_meta, {"key": key, "tokenizer": tok_path.name})
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


# ---------------------------------------------------------------------------------------------- CLI


def run_check(data_dir: Path, tokenizer: str | None, vocab_size: int | None) -> None:
    """`check`: print each problem (TachyonError after the last, so the exit status is 2) or one all-clear line."""
    if vocab_size is not None and vocab_size < 1:
        raise TachyonError(f"--vocab-size must be at least 1, got {vocab_size}")
    vocab = _vocab_for_check(data_dir, tokenizer, vocab_size)
    problems = check_shards(data_dir, vocab, progress=sys.stderr.isatty())
    for problem in problems[:-1]:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        raise TachyonError(problems[-1] + (f" ({len(problems)} problems in all)" if len(problems) > 1 else ""))
    against = f"ids in [0, {vocab})" if vocab is not None else "no negative ids (no vocab size known)"
    print(f"{data_dir}: {len(find_shards(data_dir))} shards, all sound: {against}")


def main(argv: list[str] | None = None) -> int:
    """`python -m tachyon.data prepare|check|download ...`; user errors print one `error:` line and return 2."""
    parser = argparse.ArgumentParser(prog="python -m tachyon.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize .txt/.md/.jsonl files into shards")
    p.add_argument("--tokenizer", required=True, help="a tokenizers JSON file")
    p.add_argument("--input", required=True, nargs="+", help="text files or folders")
    p.add_argument("--out", required=True, help="folder for shard_*.npy and meta.json")
    p.add_argument("--seq-len", type=int, default=2048, help="row width in tokens (default 2048)")
    p.add_argument("--shard-rows", type=int, default=None, help="rows per shard (default: about 20M tokens)")
    p.add_argument("--text-field", default="text", help="the .jsonl field holding the text (default 'text')")
    c = sub.add_parser("check", help="scan every shard in full for bad headers, dtypes, widths and ids")
    c.add_argument("data_dir", type=Path, help="folder of shard_*.npy files")
    c.add_argument("--tokenizer", help="check ids against this tokenizer's vocab size")
    c.add_argument("--vocab-size", type=int, help="check ids against this vocab size (default: the tokenizer's, "
                   "else meta.json's; without any, only negative ids are caught)")
    d = sub.add_parser("download", help="fetch shards of a Hugging Face dataset")
    d.add_argument("--repo", default="SuperGoatScriptGuy/PreprocessedMIXED")
    d.add_argument("--shards", default="0-49", help="indices like 0-49 or 0,3,7-9 (default 0-49)")
    d.add_argument("--out", default="./data")
    args = parser.parse_args(argv)

    def command() -> None:
        if args.command == "prepare":
            from .prepare import prepare  # imported here: tachyon.prepare builds on this module
            if args.seq_len < 2 or (args.shard_rows is not None and args.shard_rows < 1):
                raise TachyonError("--seq-len must be >= 2 and --shard-rows >= 1")
            prepare(args.tokenizer, args.input, args.out, seq_len=args.seq_len, shard_rows=args.shard_rows,
                    text_field=args.text_field)
        elif args.command == "check":
            run_check(args.data_dir, args.tokenizer, args.vocab_size)
        else:
            download(args.repo, args.shards, args.out)

    return run_cli(command, interrupted="interrupted; run the same command again to continue")


if __name__ == "__main__":
    sys.exit(main())
