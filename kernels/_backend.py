"""The backend switch: which implementation (Triton or PyTorch reference) the public ops run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

BACKENDS = ("auto", "triton", "reference")
_ENV_VAR = "TACHYON_KERNELS"


def _check(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return backend


_backend = _check(os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto")


def get_backend() -> str:
    """The backend in force: 'auto' (Triton for CUDA tensors), 'triton' or 'reference'."""
    return _backend


def set_backend(backend: str) -> None:
    """Choose the backend for every op from now on (the default comes from $TACHYON_KERNELS)."""
    global _backend
    _backend = _check(backend)


@contextmanager
def use(backend: str) -> Iterator[None]:
    """Run the enclosed code with `backend`, restoring the previous one afterwards."""
    previous = get_backend()
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on `x` runs its Triton kernel under the current backend."""
    if _backend == "reference":
        return False
    if _backend == "triton":
        return True
    return x.is_cuda
