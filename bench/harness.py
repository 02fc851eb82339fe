"""Shared benchmark plumbing: device facts, versions, the one timer, copy bandwidth, shapes and results.

`bench(fn, device)` is the timer every benchmark uses, built like `triton.testing.do_bench`: on a
GPU it warms up, writes a buffer larger than L2 before every timed call (outside the timed region,
so each call starts from DRAM as it would inside a training step), times each call with CUDA
events and returns the min and median over the repetitions. On the CPU, where benchmarks run at
smoke sizes only to keep the harness from rotting, it runs the function once, with no flush.
"""

from __future__ import annotations

import datetime as _dt
import functools
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from tachyon.files import atomic_write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"
L2_FLUSH_BYTES = 256 << 20  # larger than any GPU's L2 (H100: 50 MB, H200: 60 MB, B200: 126 MB)
WARMUP_MS = 25.0  # GPU: time spent warming up before the timed calls (as triton.testing.do_bench)
REP_MS = 100.0  # GPU: time the timed calls should take together
MIN_REPS = 5  # GPU: timed calls even when one call takes longer than REP_MS
MAX_REPS = 1000
ESTIMATE_CALLS = 3  # GPU: flushed calls timed together to size the warm-up and the repetitions

T = TypeVar("T")


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
    """Wait for the device's queued work (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --- timing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Seconds per call over `reps` timed calls: the fastest and the median."""

    min_s: float
    median_s: float
    reps: int

    @property
    def ms(self) -> float:
        return self.median_s * 1e3

    @property
    def min_ms(self) -> float:
        return self.min_s * 1e3

    def fields(self) -> dict[str, float | int]:
        """The record fields every timed benchmark row carries: ms (median), ms_min and reps."""
        return {"ms": self.ms, "ms_min": self.min_ms, "reps": self.reps}


@functools.cache
def _l2_flush_buffer(device: str) -> torch.Tensor:
    """The L2_FLUSH_BYTES buffer written before each timed GPU call (one per device, kept)."""
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)


def _cuda_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


def _cuda_events_ms(fn: Callable[[], Any], flush: torch.Tensor, calls: int) -> list[float]:
    """Milliseconds of each of `calls` calls of fn, each after an L2 flush outside its event pair."""
    pairs = [(_cuda_event(), _cuda_event()) for _ in range(calls)]
    for start, end in pairs:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def _cuda_reps(fn: Callable[[], Any], flush: torch.Tensor, warmup_ms: float, rep_ms: float) -> tuple[int, int]:
    """(warm-up calls, timed calls) that take about warmup_ms and rep_ms, from a few flushed calls."""
    estimate_ms = max(sum(_cuda_events_ms(fn, flush, ESTIMATE_CALLS)) / ESTIMATE_CALLS, 1e-3)
    return int(warmup_ms / estimate_ms), max(MIN_REPS, min(MAX_REPS, int(rep_ms / estimate_ms)))


def _cpu_seconds(fn: Callable[[], Any], calls: int) -> list[float]:
    """Wall seconds of each of `calls` calls of fn."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench(fn: Callable[[], Any], device: torch.device | str, reps: int | None = None, warmup: int | None = None,
          warmup_ms: float = WARMUP_MS, rep_ms: float = REP_MS) -> Timing:
    """Time fn() on `device`: min and median seconds per call over the timed repetitions.

    CUDA: one untimed call (compilation, autotuning, allocator), then, unless `reps` is given, a
    few flushed calls to size `warmup` and `reps` to about warmup_ms and rep_ms (at least MIN_REPS
    timed calls); then the warm-up calls, then each timed call after writing L2_FLUSH_BYTES, with
    CUDA events around the call alone. CPU: `reps` calls (default 1) timed by the wall clock, no
    warm-up unless asked and no flush, so smoke runs stay cheap.
    """
    if torch.device(device).type != "cuda":
        _cpu_seconds(fn, warmup or 0)
        times = _cpu_seconds(fn, reps or 1)
    else:
        fn()
        torch.cuda.synchronize()
        flush = _l2_flush_buffer(str(torch.device(device)))
        if reps is None:
            auto_warmup, reps = _cuda_reps(fn, flush, warmup_ms, rep_ms)
            warmup = auto_warmup if warmup is None else warmup
        for _ in range(warmup or 0):
            fn()
        times = [ms / 1e3 for ms in _cuda_events_ms(fn, flush, reps)]
    return Timing(min_s=min(times), median_s=statistics.median(times), reps=len(times))


def run_benchmark(benchmark: Any, fn: Callable[[], Any], device: torch.device | str, on_gpu: bool,
                  gpu_rounds: int) -> None:
    """pytest-benchmark's own timing of fn (synchronised): gpu_rounds rounds on a GPU, one on the CPU.

    It fills pytest-benchmark's table and serves its --benchmark-* options; the JSON records and the
    numbers the report uses come from bench(), which flushes L2 and reports min and median."""

    def timed() -> None:
        fn()
        sync(device)

    benchmark.pedantic(timed, rounds=gpu_rounds if on_gpu else 1, iterations=1)


@functools.cache
def copy_bandwidth_gbps(device: str, nbytes: int) -> float:
    """Device-to-device copy bandwidth in GB/s when the copy moves `nbytes` (half read, half written).

    Take it at the byte count of the op it is compared with: a copy's achieved bandwidth depends on
    its size (launch overhead for small ones, L2 residency for mid-sized ones), so an op's "fraction
    of copy bandwidth" is only fair against a copy of the same size, timed the same way.
    """
    half = max(1, nbytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * half / bench(lambda: dst.copy_(src), device).median_s / 1e9


# --- shapes ---------------------------------------------------------------------------------------


def shape_indices(gpu_shapes: Sequence[Any], cpu_shapes: Sequence[Any]) -> list[int]:
    """Indices to parametrize a benchmark over: enough for the longer list, so test ids are the same on
    every machine and a CPU run skips the GPU-only ones (see pick_shape)."""
    return list(range(max(len(gpu_shapes), len(cpu_shapes))))


def pick_shape(gpu_shapes: Sequence[T], cpu_shapes: Sequence[T], index: int, on_gpu: bool) -> T:
    """The index-th shape of the list for this machine; skips the test when that list is shorter."""
    shapes = gpu_shapes if on_gpu else cpu_shapes
    if index >= len(shapes):
        import pytest  # only benchmarks call this; bench.throughput must import without pytest

        pytest.skip("GPU-only shape")
    return shapes[index]


# --- results --------------------------------------------------------------------------------------


def results_path(name: str, env: dict[str, Any], stamp: str) -> Path:
    """bench/results/<name>-<device>-<stamp>.json for a run on env's device."""
    device = "".join(ch if ch.isalnum() else "-" for ch in env["device"].lower()).strip("-")[:40]
    return RESULTS_DIR / f"{name}-{device}-{stamp}.json"


def write_results(name: str, records: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                  path: Path | None = None) -> Path:
    """Write one run's records to `path` (default: a new results_path) atomically and return the path.

    Writing the same path again replaces it, so a run can save what it has after every benchmark and a
    killed run still leaves its finished records behind."""
    env = environment()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = path or results_path(name, env, stamp)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "created": stamp, "environment": env, **(extra or {}), "records": records}
    atomic_write_json(path, payload)
    return path

