"""Shared benchmark plumbing: device facts, versions, copy bandwidth, timing and the JSON writer."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """The checked-out commit (with '+dirty' when the tree has changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """Device name and the versions that a number depends on."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: torch.device | str, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of fn() (CUDA events on the GPU, perf_counter on the CPU)."""
    import time

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


@functools.cache
def copy_bandwidth_gbps(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    if torch.device(device).type != "cuda":
        nbytes = 64 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * nbytes / seconds / 1e9


def write_results(name: str, records: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    """Write one run's records to bench/results/<name>-<device>-<timestamp>.json and return the path."""
    env = environment()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    device = "".join(ch if ch.isalnum() else "-" for ch in env["device"].lower()).strip("-")[:40]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{device}-{stamp}.json"
    payload = {"name": name, "created": stamp, "environment": env, **(extra or {}), "records": records}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
