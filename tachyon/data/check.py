"""`python -m tachyon.data check`: read every shard in full and list every bad header, dtype, width or id."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import TachyonError
from ..tokenizer import load_tokenizer
from .shards import ShardInfo, find_shards, open_shard


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
