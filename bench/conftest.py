"""Benchmark fixtures: CPU smoke sizes vs GPU sizes, and one JSON of results per run.

On a CUDA machine the benchmarks run at LLM shapes and the records of the run are written to
bench/results/ at the end (disable with --no-bench-save). Without CUDA they run at smoke sizes
through the Triton interpreter so the harness can't rot, and nothing is written unless
--bench-save is given.
"""

from __future__ import annotations

import os
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bench.harness import write_results  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
_RECORDS: list[dict[str, Any]] = []


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


@pytest.fixture
def record():
    """Call record(op=..., impl=..., shape=..., ms=..., gbps=..., ...) to add a row to this run's JSON."""

    def add(**fields: Any) -> None:
        _RECORDS.append(fields)
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()))

    return add


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    opts = session.config.option
    save = (HAS_CUDA or getattr(opts, "bench_save", False)) and not getattr(opts, "no_bench_save", False)
    if _RECORDS and save:
        path = write_results("micro", _RECORDS)
        print(f"\nbenchmark results written to {path}")
