"""Fused linear cross-entropy: the LM head and its loss without full-vocab logits for the whole batch.

`linear_cross_entropy(x, weight, targets)` is the mean cross-entropy of `x @ weight.T` over the
targets that are not `ignore_index`. With a 50k vocabulary the logits of a 64k-token batch take
6.6 GB in bf16 and twice that once upcast to fp32, plus as much again for their gradient: the
largest tensors of a small model's training step. The Triton path walks the tokens in chunks;
per chunk one cuBLAS matmul gives the logits, one Triton kernel turns them in place into their
gradient (online softmax over vocab blocks), and two more matmuls fold that gradient into dx
and dweight at once. The forward therefore already holds both gradients; the backward only
scales them by the incoming gradient (the Liger-Kernel scheme). When no gradient is needed
(evaluation, torch.no_grad) the forward computes the loss alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Logits of one chunk stay under this many bytes (the chunk's only full-vocab tensor).
CHUNK_BYTES = 1 << 30


def linear_cross_entropy_reference(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """The definition: x (..., d), weight (V, d), targets (...) int -> 0-d loss, at least fp32.

    Mean over the non-ignored targets of `logsumexp(z) - z[target]` with `z = x @ weight.T`
    computed in x's dtype and upcast to (at least) fp32. When every target is ignored the loss
    is 0 with zero gradients, not the NaN of `F.cross_entropy`'s 0 / 0.
    """
    logits = F.linear(x.reshape(-1, x.shape[-1]), weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    flat = targets.reshape(-1)
    total = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="sum")
    return total / (flat != ignore_index).sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,  # (C, V) one chunk's logits in x's dtype; overwritten in place with d(loss)/d(logits)
    targets_ptr,  # (C,) integer target ids of the chunk's rows; ignore_index marks a row not scored
    loss_ptr,  # (C,) fp32 out: each row's lse - logit[target], 0 for ignored rows
    n_valid_ptr,  # () int64: non-ignored targets in the whole batch, the mean's divisor (read on device)
    vocab_size,  # V
    stride_row,  # logits elements between consecutive rows
    ignore_index,  # the target id that marks an ignored row
    WRITE_GRAD: tl.constexpr,  # overwrite the logits with their gradient (False: the loss alone)
    BLOCK_V: tl.constexpr,  # vocab columns per loop iteration (a power of two)
):
    """One program per row: logsumexp by online softmax over vocab blocks, the row's loss, then
    (WRITE_GRAD) a second sweep that overwrites the logits with (softmax - onehot) / n_valid (0 if ignored)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)  # an in-range column to read for ignored rows
    n_valid = tl.load(n_valid_ptr)
    scale = tl.where(valid, 1.0 / tl.maximum(n_valid, 1).to(tl.float32), 0.0)
    cols = tl.arange(0, BLOCK_V)

    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + cols
        z = tl.load(base + offs, mask=offs < vocab_size, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target_logit = tl.load(base + safe_target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))

    if WRITE_GRAD:
        for start in range(0, vocab_size, BLOCK_V):
            offs = start + cols
            in_vocab = offs < vocab_size
            z = tl.load(base + offs, mask=in_vocab, other=0.0).to(tl.float32)
            grad = tl.exp(z - lse) - tl.where(offs == safe_target, 1.0, 0.0)
            tl.store(base + offs, (grad * scale).to(logits_ptr.dtype.element_ty), mask=in_vocab)


def _block_v(vocab_size: int) -> int:
    """Vocab columns per iteration: whole small vocabularies, 4096-wide sweeps over large ones."""
    return min(4096, triton.next_power_of_2(vocab_size))


def chunk_tokens_for(vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so that the chunk's logits take at most CHUNK_BYTES (a multiple of 64)."""
    per_token = vocab_size * dtype.itemsize
    return max(64, CHUNK_BYTES // per_token // 64 * 64)


def _grad_shapes(x: torch.Tensor, weight: torch.Tensor, needs_grad: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the op's dx and dweight outputs: x's and weight's, or (0,) each when no gradient is needed."""
    return (tuple(x.shape), tuple(weight.shape)) if needs_grad else ((0,), (0,))


def _fused_forward(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_tokens: int,
    needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dloss/dx, dloss/dweight) for x (N, d), weight (V, d), targets (N,); without
    `needs_grad` only the loss is computed and both gradients are empty."""
    num_tokens, _ = x.shape
    targets = targets.contiguous()
    vocab_size = weight.shape[0]
    chunk = chunk_tokens or chunk_tokens_for(vocab_size, x.dtype)
    n_valid = (targets != ignore_index).sum()  # stays on the device: no host sync
    row_loss = torch.empty(num_tokens, dtype=torch.float32, device=x.device)
    dx_shape, dweight_shape = _grad_shapes(x, weight, needs_grad)
    dx = torch.empty(dx_shape, dtype=x.dtype, device=x.device)
    # dweight sums one product per chunk: keep the running sum in fp32 for half-precision inputs.
    dweight = torch.zeros(dweight_shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=x.device)
    block_v = _block_v(vocab_size)
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        x_chunk = x[start:end]
        logits = x_chunk @ weight.t()  # (C, V) in x's dtype; becomes the gradient below when needs_grad
        _cross_entropy_fwd_kernel[(end - start,)](
            logits, targets[start:end], row_loss[start:end], n_valid, vocab_size, logits.stride(0),
            ignore_index, WRITE_GRAD=needs_grad, BLOCK_V=block_v,
            num_warps=8,  # 8 warps: 16 columns per thread per 4096-wide sweep
        )
        if needs_grad:
            torch.mm(logits, weight, out=dx[start:end])
            if dweight.dtype == logits.dtype:
                dweight.addmm_(logits.t(), x_chunk)
            else:
                dweight += logits.t() @ x_chunk
    loss = row_loss.sum() / n_valid.clamp(min=1)
    return loss, dx, dweight.to(weight.dtype)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("kernels::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_tokens: int,
    needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked Triton forward. Returns (loss, dx, dweight): the gradients are computed here
    and only scaled in the backward, so no logits are kept between forward and backward. Without
    `needs_grad`, dx and dweight are empty (0,) tensors and the forward does the loss's work only."""
    return _fused_forward(x, weight, targets, ignore_index, chunk_tokens, needs_grad)


@_linear_cross_entropy_op.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_tokens: int,
    needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx_shape, dweight_shape = _grad_shapes(x, weight, needs_grad)
    return (torch.empty((), dtype=torch.float32, device=x.device),
            torch.empty(dx_shape, dtype=x.dtype, device=x.device),
            torch.empty(dweight_shape, dtype=weight.dtype, device=weight.device))


def _setup_context(ctx: Any, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    _, dx, dweight = output
    ctx.mark_non_differentiable(dx, dweight)
    ctx.save_for_backward(dx, dweight)


def _backward(ctx: Any, grad_loss: torch.Tensor, _grad_dx: torch.Tensor, _grad_dweight: torch.Tensor) -> tuple:
    """Scale the gradients saved by the forward (always multiplied: a check for 1.0 would sync)."""
    dx, dweight = ctx.saved_tensors
    return dx * grad_loss, dweight * grad_loss, None, None, None, None


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` (x (..., d), weight (V, d), targets (...)) in chunks.

    Under autocast x and weight are cast to the autocast dtype first (custom ops are not
    autocast themselves), as `F.linear` would be. `chunk_tokens` 0 picks the chunk so that its
    logits take about CHUNK_BYTES. Targets must lie in [0, V) or equal `ignore_index`. When no
    gradient will be taken (grad mode off, or neither x nor weight requires one) the gradient
    work of the forward is skipped.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype outside autocast")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must match x's leading dims {tuple(x.shape[:-1])}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss, _, _ = _linear_cross_entropy_op(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1),
                                          ignore_index, chunk_tokens, needs_grad)
    return loss
