"""RMSNorm: `x * rsqrt(mean(x^2) + eps) * w` over the last dim, fp32 statistics."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import INTERPRET, as_rows, cast_out, num_programs_for_reduction, warps_for

# Largest normalised width kept in registers as one tile (64K elements, as in Liger and quack).
MAX_FUSED_WIDTH = 65536


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The definition: normalise in fp32, scale by `weight`, return in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for the ground truth
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    return y.to(x.dtype)


# --- Triton kernels ---------------------------------------------------------------------------------

# Rows per program and warps for the forward; _prune_fwd keeps those that suit the width.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": m}, num_warps=w)
    for m, w in ((1, 4), (1, 8), (1, 16), (1, 32), (2, 8), (4, 8), (8, 4), (16, 4))
]


def _prune_fwd(configs, named_args, **meta):
    """Keep configs with 8-64 elements per thread and tiles of at most 16K elements (or one row).

    Fewer elements per thread wastes the vector loads; more spills registers. In the interpreter
    there is no timing: keep the largest tile, which means the fewest programs.
    """
    block_n = meta.get("BLOCK_N", named_args.get("BLOCK_N"))
    per_thread = lambda c: c.kwargs["BLOCK_M"] * block_n / (32 * c.num_warps)
    fits = lambda c: c.kwargs["BLOCK_M"] == 1 or c.kwargs["BLOCK_M"] * block_n <= 16384
    kept = [c for c in configs if 8 <= per_thread(c) <= 64 and fits(c)]
    if not kept:  # very narrow rows: the most rows per program; very wide ones: the most warps
        kept = [max((c for c in configs if fits(c)), key=lambda c: (c.kwargs["BLOCK_M"], -per_thread(c)))]
    if INTERPRET:
        kept = [max(kept, key=lambda c: c.kwargs["BLOCK_M"])]
    return kept


@triton.autotune(configs=_FWD_CONFIGS, key=["n_cols", "BLOCK_N"], prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _rms_norm_fwd_kernel(
    X,  # pointer to the input, (n_rows, n_cols) with unit column stride
    W,  # pointer to the weight, (n_cols,)
    Y,  # pointer to the output, (n_rows, n_cols) contiguous, x's dtype
    stride_x,  # elements between rows of X
    stride_y,  # elements between rows of Y
    n_rows,  # number of rows
    n_cols,  # normalised width
    eps,  # added to mean(x^2) before the rsqrt
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of two >= n_cols: a whole row per tile
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], cast_out(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # pointer to the output gradient, (n_rows, n_cols) with unit column stride
    X,  # pointer to the forward input, (n_rows, n_cols) with unit column stride
    W,  # pointer to the weight, (n_cols,)
    DX,  # pointer to the input gradient, (n_rows, n_cols) contiguous, x's dtype
    DW_PARTIAL,  # pointer to fp32 (num_programs, n_cols): this program's share of dw, summed afterwards
    stride_dy,  # elements between rows of DY
    stride_x,  # elements between rows of X
    stride_dx,  # elements between rows of DX
    n_rows,  # number of rows
    n_cols,  # normalised width
    eps,  # the forward's eps (rstd is recomputed, not saved)
    BLOCK_M: tl.constexpr,  # rows per step of a program's loop
    BLOCK_N: tl.constexpr,  # power of two >= n_cols
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Programs stride over blocks of rows so each keeps one dw partial in registers.
    for start in range(pid * BLOCK_M, n_rows, num_progs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)[:, None]
        xhat = x * rstd
        dw += tl.sum(dy * xhat, axis=0)
        g = dy * w[None, :]
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
        tl.store(DX + rows64 * stride_dx + cols[None, :], cast_out(dx, DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_mask)


# --- launchers ---------------------------------------------------------------------------------------


def _block_n(n_cols: int) -> int:
    block_n = triton.next_power_of_2(n_cols)
    if block_n > MAX_FUSED_WIDTH:
        raise ValueError(f"rms_norm: width {n_cols} exceeds the fused kernel's limit of {MAX_FUSED_WIDTH}")
    return block_n


def _check_weight(weight: torch.Tensor, n_cols: int) -> None:
    """The kernels read n_cols weights (made contiguous first): any other count is an error."""
    if weight.numel() != n_cols:
        raise ValueError(f"rms_norm: weight has {weight.numel()} elements (shape {tuple(weight.shape)}), "
                         f"but the normalised width is {n_cols}")


def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n_cols = x.shape[-1]
    _check_weight(weight, n_cols)
    x2 = as_rows(x, n_cols)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return y
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),)
    _rms_norm_fwd_kernel[grid](x2, weight.contiguous(), y, x2.stride(0), n_cols, n_rows, n_cols, eps,
                               BLOCK_N=_block_n(n_cols))
    return y


def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    n_cols = x.shape[-1]
    _check_weight(weight, n_cols)
    x2, dy2 = as_rows(x, n_cols), as_rows(dy, n_cols)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x2.shape[0]
    block_n = _block_n(n_cols)
    block_m = max(1, min(16, 4096 // block_n))
    programs = max(1, min(num_programs_for_reduction(x.device), triton.cdiv(n_rows, block_m)))
    partial = torch.zeros(programs, n_cols, dtype=torch.float32, device=x.device)
    if n_rows:
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight.contiguous(), dx, partial, dy2.stride(0), x2.stride(0), n_cols, n_rows, n_cols, eps,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps_for(block_m * block_n),
        )
    return dx, partial.sum(0).to(weight.dtype).view(weight.shape)


# --- the public op ------------------------------------------------------------------------------------


@torch.library.custom_op("kernels::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused RMSNorm over the last dim of x (any leading shape, any row stride); output in x's dtype."""
    return _rms_norm_fwd(x, weight, eps)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    _check_weight(weight, x.shape[-1])
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) of rms_norm: dx in x's dtype, dw in weight's dtype, rstd recomputed from x."""
    return _rms_norm_bwd(dy, x, weight, eps)


@rms_norm_bwd.register_fake
def _(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, dy: torch.Tensor):
    x, weight = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy, x, weight, ctx.eps)
    return dx, dw, None


rms_norm.register_autograd(_backward, setup_context=_setup_context)
