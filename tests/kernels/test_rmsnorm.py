"""kernels.rms_norm against its reference under the correctness rule of docs/design.md (output, dx and dw)."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels._triton_utils import as_rows
from tests.kernels.correctness import DEVICE, check_against_truth

rmsnorm = importlib.import_module("kernels.rmsnorm")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6


def _fused(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return rmsnorm.rms_norm(x, w, EPS)


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return rmsnorm.rms_norm_reference(x, w, EPS)


def _weight(width: int, dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    """A weight away from 1 so that a kernel ignoring it fails."""
    return (1 + 0.5 * torch.randn(width, device=device)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, width", [(1, 64), (199, 200), (37, 1000), (5, 48)])
def test_matches_reference(dtype: torch.dtype, rows: int, width: int) -> None:
    x = 3 * torch.randn(rows, width, device=DEVICE, dtype=dtype)
    check_against_truth(_fused, _reference, [x, _weight(width, dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp32_weight_with_low_precision_input(dtype: torch.dtype) -> None:
    """The model's case under autocast: bf16/fp16 activations, fp32 weight; dw comes back in fp32."""
    x = torch.randn(2, 9, 96, device=DEVICE, dtype=dtype)
    check_against_truth(_fused, _reference, [x, _weight(96, torch.float32)], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows_and_leading_dims(dtype: torch.dtype) -> None:
    """A (B, T, width) slice of a wider buffer (row stride != width) is read in place."""
    base = torch.randn(3, 7, 2 * 80, device=DEVICE, dtype=dtype)
    x = base[..., 80:]
    assert not x.is_contiguous()
    check_against_truth(_fused, _reference, [x, _weight(80, dtype)])


def test_no_copy_of_strided_rows() -> None:
    """The launcher views a last-dim slice as rows in place rather than copying it."""
    base = torch.randn(4, 2 * 80)
    rows = as_rows(base[:, 80:], 80)
    assert rows.data_ptr() == base[:, 80:].data_ptr() and rows.stride() == (160, 1)


def test_strided_weight_is_read_in_order() -> None:
    """A non-contiguous weight (every other element of a wider one) is made contiguous for the kernels."""
    x = torch.randn(7, 48, device=DEVICE)
    w = _weight(96, torch.float32)[::2]
    assert not w.is_contiguous()
    check_against_truth(_fused, _reference, [x, w])


@pytest.mark.parametrize("width", [47, 49, 1])
def test_weight_of_the_wrong_size_is_an_error(width: int) -> None:
    x = torch.randn(3, 48, device=DEVICE)
    with pytest.raises(ValueError, match="normalised width is 48"):
        _fused(x, _weight(width, torch.float32))
    with pytest.raises(ValueError, match="normalised width is 48"):
        rmsnorm.rms_norm_bwd(x, x, _weight(width, torch.float32), EPS)


def test_empty_input() -> None:
    x = torch.randn(0, 64, device=DEVICE)
    assert _fused(x, _weight(64, torch.float32)).shape == (0, 64)


def test_opcheck() -> None:
    x = torch.randn(5, 3, 40, device=DEVICE, requires_grad=True)
    w = _weight(40, torch.float32).requires_grad_()
    torch.library.opcheck(rmsnorm.rms_norm, (x, w, EPS))
    dy = torch.randn(5, 3, 40, device=DEVICE)
    torch.library.opcheck(rmsnorm.rms_norm_bwd, (dy, x.detach(), w.detach(), EPS))


@pytest.mark.gpu
@pytest.mark.parametrize("rows, width", [(16384, 1024), (16384, 2048), (16384, 4096), (4097, 5120), (1, 4096)])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_bf16_real_sizes(rows: int, width: int, weight_dtype: torch.dtype) -> None:
    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    check_against_truth(_fused, _reference, [x, _weight(width, weight_dtype, "cuda")], dtype=torch.bfloat16)
