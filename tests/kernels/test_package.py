"""The kernels package's shape: importable alone, every public op a function, no submodule hidden by an op."""

from __future__ import annotations

import importlib
import pkgutil

import kernels


def test_no_public_name_is_also_a_submodule() -> None:
    """`import kernels.rope` must not hand back a function (a module named like an op is shadowed by it)."""
    submodules = {info.name for info in pkgutil.iter_modules(kernels.__path__)}
    assert not submodules & set(kernels.__all__), submodules & set(kernels.__all__)
    for name in ("rotary", "glu", "moe", "rmsnorm", "router", "cross_entropy"):
        assert importlib.import_module(f"kernels.{name}").__name__ == f"kernels.{name}"


def test_every_public_op_has_its_reference_twin() -> None:
    ops = [name for name in kernels.__all__ if f"{name}_reference" in kernels.__all__]
    assert sorted(ops) == ["linear_cross_entropy", "moe_experts", "qk_norm_rope", "rms_norm", "rope", "router_topk",
                           "swiglu"]
    assert all(callable(getattr(kernels, name)) for name in ops)
