"""`BatchLoader`: (inputs, targets) training batches read window by window from shards with `os.pread`.

No shard is loaded or memory-mapped: each window's bytes are copied out of its file with one `pread` (see
`_WindowReader` for why not a memory map), so memory stays flat however large the shards are.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import TachyonError
from .shards import ShardInfo, find_shards, open_shard

IGNORE_INDEX = -100  # the target of positions not scored (pads, each window's last position); the loss skips it
SPLIT_SEED = 1234  # the val/train split is a property of the data, not of a run's --seed


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
    """Infinite (inputs, targets) batches read from shards with os.pread, in a seeded order any worker count repeats.

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
        """Read the windows (pread), check the ids, and build shifted targets (CPU, pinned for a CUDA loader)."""
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
