"""kernels.swiglu against its reference under the correctness rule of docs/design.md (output, d gate, d up)."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.kernels.correctness import DEVICE, check_against_truth

swiglu = importlib.import_module("kernels.glu")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, width", [(1, 64), (199, 200), (37, 1000), (3, 7)])
def test_matches_reference(dtype: torch.dtype, rows: int, width: int) -> None:
    gate = 3 * torch.randn(rows, width, device=DEVICE, dtype=dtype)
    up = torch.randn(rows, width, device=DEVICE, dtype=dtype)
    check_against_truth(swiglu.swiglu, swiglu.swiglu_reference, [gate, up])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_halves_of_one_projection(dtype: torch.dtype) -> None:
    """gate and up as the two halves of one GEMM output (B, T, 2f): strided views, no copy."""
    h = 3 * torch.randn(2, 11, 2 * 176, device=DEVICE, dtype=dtype)
    gate, up = h.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    check_against_truth(swiglu.swiglu, swiglu.swiglu_reference, [gate, up])


def test_backward_saves_only_the_inputs() -> None:
    """The backward recomputes silu: autograd keeps gate and up and no activation of their size."""
    gate = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    up = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu.swiglu(gate, up)
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        swiglu.swiglu(torch.randn(2, 3), torch.randn(2, 4))


def test_opcheck() -> None:
    gate = torch.randn(3, 5, 40, device=DEVICE, requires_grad=True)
    up = torch.randn(3, 5, 40, device=DEVICE, requires_grad=True)
    torch.library.opcheck(swiglu.swiglu, (gate, up))
    torch.library.opcheck(swiglu.swiglu_bwd, (torch.randn(3, 5, 40, device=DEVICE), gate.detach(), up.detach()))


@pytest.mark.gpu
@pytest.mark.parametrize("rows, width", [(16384, 1408), (16384, 4096), (8192, 5632), (1, 704)])
def test_gpu_bf16_real_sizes(rows: int, width: int) -> None:
    h = torch.randn(rows, 2 * width, device="cuda", dtype=torch.bfloat16)
    check_against_truth(swiglu.swiglu, swiglu.swiglu_reference, list(h.chunk(2, dim=-1)))
