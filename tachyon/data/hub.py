"""`python -m tachyon.data download`: named shards of a Hugging Face dataset repository, with huggingface_hub."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..errors import TachyonError
from .shards import shard_name


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
