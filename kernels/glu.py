"""SwiGLU: `silu(gate) * up`, elementwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._triton_utils import INTERPRET, as_rows, cast_out


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The definition, in the inputs' dtype."""
    return F.silu(gate) * up


# --- Triton kernels ---------------------------------------------------------------------------------


@triton.jit
def silu_mul(gate, up):
    """silu(gate) * up on fp32 tiles: the SwiGLU forward (also the MoE gate+up GEMM's epilogue)."""
    return gate * tl.sigmoid(gate) * up


@triton.jit
def silu_mul_grad(gate, up, dout):
    """(dgate, dup) of silu(gate) * up given its gradient dout, on fp32 tiles; silu is recomputed, not saved."""
    sig = tl.sigmoid(gate)
    silu = gate * sig
    return dout * up * (sig + silu * (1.0 - sig)), dout * silu


# 2-D tiles of 4K-8K elements: wide rows take one long strip, narrow ones several rows.
_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w)
    for m, n, w in ((1, 4096, 8), (2, 2048, 8), (4, 1024, 4), (8, 1024, 8), (16, 512, 8), (32, 256, 8))
]


def _prune(configs, named_args, **meta):
    """Drop tiles much wider than a row; in the interpreter keep one (no timing, fewest programs)."""
    n_cols = named_args["n_cols"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max(256, 2 * triton.next_power_of_2(n_cols))]
    return kept[-1:] if INTERPRET else kept


@triton.jit
def _tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (BLOCK_M, 1) int64 rows, (1, BLOCK_N) columns and their in-bounds mask."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    return rows, cols, (rows < n_rows) & (cols < n_cols)


_TUNING = {"configs": _CONFIGS, "key": ["n_cols"], "prune_configs_by": {"early_config_prune": _prune}}


@triton.autotune(**_TUNING)
@triton.jit
def _swiglu_fwd_kernel(
    G,  # pointer to gate, (n_rows, n_cols) with unit column stride
    U,  # pointer to up, (n_rows, n_cols) with unit column stride
    Y,  # pointer to the output, (n_rows, n_cols) contiguous
    stride_g,  # elements between rows of G
    stride_u,  # elements between rows of U
    stride_y,  # elements between rows of Y
    n_rows,  # number of rows
    n_cols,  # number of columns
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per program
):
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = silu_mul(g, u)
    tl.store(Y + rows * stride_y + cols, cast_out(y, Y.dtype.element_ty), mask=mask)


@triton.autotune(**_TUNING)
@triton.jit
def _swiglu_bwd_kernel(
    DY,  # pointer to the output gradient, (n_rows, n_cols) with unit column stride
    G,  # pointer to gate, (n_rows, n_cols) with unit column stride
    U,  # pointer to up, (n_rows, n_cols) with unit column stride
    DG,  # pointer to the gate gradient, (n_rows, n_cols) contiguous, gate's dtype
    DU,  # pointer to the up gradient, (n_rows, n_cols) contiguous, up's dtype
    stride_dy,  # elements between rows of DY
    stride_g,  # elements between rows of G
    stride_u,  # elements between rows of U
    stride_d,  # elements between rows of DG and DU
    n_rows,  # number of rows
    n_cols,  # number of columns
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per program
):
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dg, du = silu_mul_grad(g, u, dy)  # the forward saved only gate and up
    tl.store(DG + rows * stride_d + cols, cast_out(dg, DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_d + cols, cast_out(du, DU.dtype.element_ty), mask=mask)


# --- launchers ---------------------------------------------------------------------------------------


def _grid(n_rows: int, n_cols: int):
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(n_cols, meta["BLOCK_N"]))


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check(gate, up)
    y = torch.empty(gate.shape, dtype=torch.result_type(gate, up), device=gate.device)
    if gate.numel() == 0:
        return y
    n_cols = gate.shape[-1]
    g2, u2 = as_rows(gate, n_cols), as_rows(up, n_cols)
    n_rows = g2.shape[0]
    _swiglu_fwd_kernel[_grid(n_rows, n_cols)](g2, u2, y, g2.stride(0), u2.stride(0), n_cols, n_rows, n_cols)
    return y


def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel() == 0:
        return dg, du
    n_cols = gate.shape[-1]
    dy2, g2, u2 = as_rows(dy, n_cols), as_rows(gate, n_cols), as_rows(up, n_cols)
    n_rows = g2.shape[0]
    _swiglu_bwd_kernel[_grid(n_rows, n_cols)](
        dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0), n_cols, n_rows, n_cols
    )
    return dg, du


# --- the public op ------------------------------------------------------------------------------------


@torch.library.custom_op("kernels::swiglu", mutates_args=())
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused `silu(gate) * up` (any leading shape, any row stride, e.g. the halves of one GEMM output)."""
    return _swiglu_fwd(gate, up)


@swiglu.register_fake
def _(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check(gate, up)
    return torch.empty(gate.shape, dtype=torch.result_type(gate, up), device=gate.device)


@torch.library.custom_op("kernels::swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) of swiglu, recomputing silu(gate) from the saved gate."""
    return _swiglu_bwd(dy, gate, up)


@swiglu_bwd.register_fake
def _(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(up.shape, dtype=up.dtype, device=up.device))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy: torch.Tensor):
    gate, up = ctx.saved_tensors
    return swiglu_bwd(dy, gate, up)


swiglu.register_autograd(_backward, setup_context=_setup_context)
