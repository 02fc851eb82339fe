"""The shard format: `shard_NNNNN.npy` files of token ids, found, checked and written.

A shard is a 2-D C-ordered (rows, width) integer array (int32; uint16 and int64 accepted) saved by numpy, with
end-of-text id 0 between documents and pad id 1 filling the last row: the layout of the original
PreprocessedMIXED dataset, so its files train here unchanged. `open_shard` reads only a shard's header (through
numpy's memory map, dropped again at once); the loader then reads windows with `os.pread` (see loader.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import TachyonError
from ..files import atomic_write, atomic_write_json

SHARD_GLOB = "shard_*.npy"


def shard_name(index: int) -> str:
    """The file name of shard `index`, as in the original dataset."""
    return f"shard_{index:05d}.npy"


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
        atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(rows)))

    def finish(self, meta: dict) -> dict:
        """Write the last (padded) shard and meta.json; returns the metadata written."""
        self._flush(final=True)
        meta = {**meta, "seq_len": self.seq_len, "shard_rows": self.shard_rows, "dtype": self.dtype.name,
                "num_shards": self.n_shards, "num_tokens": self.n_tokens, "num_documents": self.n_docs,
                "eot_id": self.eot_id, "pad_id": self.pad_id}
        atomic_write_json(self.out_dir / "meta.json", meta)
        return meta
