"""The one way Tachyon writes a file that must never be seen half-written: shards, meta.json, prepare's
progress, tokenizers, checkpoints and exported weights."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def temp_path(path: Path) -> Path:
    """Where `atomic_write` builds `path`: `.<name>.tmp-<pid>` beside it (the pattern clean-ups look for)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write `path` through `write(file)` under a temporary name, fsync it, then rename it into place.

    A kill or a crash (a full disk included) never leaves a complete-looking file that is not: `path` is either
    its old self or the whole new file. The temporary file is removed when `write` or the rename fails, and the
    error is raised as it came. The file gets the usual mode for a new file under the umask (0644 typically).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | Path, obj: object) -> Path:
    """Write `obj` as indented UTF-8 JSON to `path` through `atomic_write`."""
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
