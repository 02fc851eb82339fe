"""Benchmark fixtures: CPU smoke sizes vs GPU sizes, and one JSON of results per run.

On a CUDA machine the benchmarks run at LLM shapes and the run's records are written to one
bench/results/ file, rewritten after every benchmark so that a run cut short by a time limit keeps
what it measured (disable with --no-bench-save). Without CUDA they run at smoke sizes through the
Triton interpreter so the harness can't rot, and nothing is written unless --bench-save is given.
Shapes and the skip of GPU-only ones come from bench.harness (shape_indices, pick_shape), timing
from bench.harness.bench.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bench.harness import write_results  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
_RECORDS: list[dict[str, Any]] = []
_SAVED: dict[str, Any] = {"path": None, "count": 0}  # the run's results file and how many records it holds


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tachyon")
    group.addoption("--bench-save", action="store_true", help="write bench/results JSON even without CUDA")
    group.addoption("--no-bench-save", action="store_true", help="never write bench/results JSON")


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="session")
def on_gpu() -> bool:
    """True when benchmarks run at real sizes; False at CPU smoke sizes."""
    return HAS_CUDA


def format_record(fields: dict[str, Any]) -> str:
    """One record as the line printed for it: key=value pairs, floats to 4 significant digits."""
    return " | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


@pytest.fixture
def record():
    """Call record(op=..., impl=..., shape=..., ms=..., gbps=..., ...) to add a row to this run's JSON."""

    def add(**fields: Any) -> None:
        _RECORDS.append(fields)
        print(format_record(fields))

    return add


def _saving(config: pytest.Config) -> bool:
    opts = config.option
    return (HAS_CUDA or getattr(opts, "bench_save", False)) and not getattr(opts, "no_bench_save", False)


def _save(config: pytest.Config) -> Path | None:
    """Write the records so far to the run's results file, when saving and there is something new."""
    if not _saving(config) or len(_RECORDS) == _SAVED["count"]:
        return _SAVED["path"]
    _SAVED["path"] = write_results("micro", _RECORDS, path=_SAVED["path"])
    _SAVED["count"] = len(_RECORDS)
    return _SAVED["path"]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    _save(item.config)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = _save(session.config)
    if path is not None:
        print(f"\nbenchmark results written to {path}")
