"""The backend switch: which implementation (Triton or PyTorch reference) the public ops run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

BACKENDS = ("auto", "triton", "reference")
_ENV_VAR = "TACHYON_KERNELS"


def _check(backend: str, source: str = "kernel backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown {source} {backend!r}: choose one of {', '.join(BACKENDS)}")
    return backend


# Read at import but checked when first used, so that a bad $TACHYON_KERNELS is one error where the
# backend is asked for (a CLI turns it into one line) instead of a traceback from `import kernels`.
_backend = os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto"


def get_backend() -> str:
    """The backend in force: 'auto' (Triton for CUDA tensors), 'triton' or 'reference'.

    Raises ValueError when it came from an invalid $TACHYON_KERNELS.
    """
    return _check(_backend, f"${_ENV_VAR} value")


def set_backend(backend: str) -> None:
    """Choose the backend for every op from now on (the default comes from $TACHYON_KERNELS)."""
    global _backend
    _backend = _check(backend)


@contextmanager
def use(backend: str) -> Iterator[None]:
    """Run the enclosed code with `backend`, restoring the previous one afterwards."""
    global _backend
    previous = _backend  # as it was, even an unchecked $TACHYON_KERNELS value
    set_backend(backend)
    try:
        yield
    finally:
        _backend = previous


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on `x` runs its Triton kernel under the current backend."""
    backend = get_backend()
    if backend == "reference":
        return False
    if backend == "triton":
        return True
    return x.is_cuda
