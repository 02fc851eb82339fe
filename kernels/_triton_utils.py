"""Small helpers shared by the Triton kernels: row views, launch sizes, interpreter-safe casts."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# True when kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, set before import).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def as_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` seen as (rows, width) with unit column stride and one row stride, copying only if no such view exists.

    Slices along the last dim (gate/up halves of one GEMM output) and expanded gradients keep
    their storage; only layouts that no single row stride describes are made contiguous.
    """
    if x.stride(-1) != 1 and x.numel() > 0:
        x = x.contiguous()
    try:
        return x.view(-1, width)
    except RuntimeError:
        return x.reshape(-1, width)


@functools.cache
def num_programs_for_reduction(device: torch.device) -> int:
    """How many persistent programs a backward with per-program partial sums launches."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after the other: few of them is faster


# The interpreter casts fp32 to bf16 by truncation (the GPU rounds to nearest even): round by hand there.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """fp32 `x` cast to `dtype`, rounding to nearest even on the GPU and in the interpreter alike."""
    if _ROUND_BF16_BY_HAND:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def warps_for(tile: int) -> int:
    """num_warps for a tile of `tile` elements: about 16 elements per thread, between 1 and 32 warps."""
    return max(1, min(32, tile // 512))
