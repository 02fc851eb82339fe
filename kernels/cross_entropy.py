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

fp16 is the exception: a gradient stored in fp16 before the loss scale is applied underflows
(softmax / n_valid is far below fp16's smallest normal for most of the vocabulary), which loss
scaling exists to prevent. For fp16 the forward computes the loss alone and the backward
recomputes each chunk's logits and writes their gradient already multiplied by the incoming
gradient, rounding to fp16 once, where plain autograd does: one more matmul per chunk.

Each chunk's logits live in a buffer whose row stride is the vocabulary rounded up to a multiple of
VOCAB_ALIGN (50258 -> 50304), with -inf in the padding: rows start 16-byte aligned and the sweeps
need no mask on the true vocabulary, so they read and write 128-bit vectors (with a row stride of
50258 elements they could only move one element at a time). The model's vocabulary is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Logits of one chunk stay under this many bytes (the chunk's only full-vocab tensor).
CHUNK_BYTES = 1 << 30
# The chunk buffer's row stride is a multiple of this many elements (128 bytes of fp16, 256 of fp32).
VOCAB_ALIGN = 64


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
def _cross_entropy_kernel(
    logits_ptr,  # (C, padded_vocab) one chunk's logits in x's dtype, -inf past vocab_size; becomes the gradient
    targets_ptr,  # (C,) integer target ids of the chunk's rows; ignore_index marks a row not scored
    loss_ptr,  # (C,) fp32 out: each row's lse - logit[target], 0 for ignored rows
    grad_scale_ptr,  # () fp32: d(loss)/d(row loss) of a scored row, grad_loss / n_valid (read on device)
    vocab_size,  # V, the true vocabulary
    padded_vocab,  # V rounded up to VOCAB_ALIGN: the row stride and the sweeps' extent
    ignore_index,  # the target id that marks an ignored row
    WRITE_GRAD: tl.constexpr,  # overwrite the logits with their gradient (False: the loss alone)
    BLOCK_V: tl.constexpr,  # vocab columns per loop iteration (a power of two)
):
    """One program per row: logsumexp by online softmax over vocab blocks and the row's loss, then
    (WRITE_GRAD) a second sweep that overwrites the logits with (softmax - onehot) * grad_scale (0 if
    ignored), keeping -inf in the padding for the buffer's next chunk."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * padded_vocab
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)  # an in-range column to read for ignored rows
    cols = tl.arange(0, BLOCK_V)

    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, padded_vocab, BLOCK_V):
        offs = start + cols
        z = tl.load(base + offs, mask=offs < padded_vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target_logit = tl.load(base + safe_target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))

    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(grad_scale_ptr), 0.0)
        for start in range(0, padded_vocab, BLOCK_V):
            offs = start + cols
            in_row = offs < padded_vocab
            z = tl.load(base + offs, mask=in_row, other=float("-inf")).to(tl.float32)
            grad = (tl.exp(z - lse) - tl.where(offs == safe_target, 1.0, 0.0)) * scale
            grad = tl.where(offs < vocab_size, grad, float("-inf"))  # a select, not a mask: stores stay 128-bit
            tl.store(base + offs, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


# --------------------------------------------------------------------------------------------
# Launchers: one chunk loop for the forward and for fp16's recomputing backward
# --------------------------------------------------------------------------------------------


def padded_vocab_for(vocab_size: int) -> int:
    """The chunk buffer's row stride: vocab_size rounded up to a multiple of VOCAB_ALIGN."""
    return -(-vocab_size // VOCAB_ALIGN) * VOCAB_ALIGN


def _block_v(padded_vocab: int) -> int:
    """Vocab columns per iteration: whole small vocabularies, 4096-wide sweeps over large ones."""
    return min(4096, triton.next_power_of_2(padded_vocab))


def chunk_tokens_for(vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so that the chunk's (padded) logits take at most CHUNK_BYTES (a multiple of 64)."""
    per_token = padded_vocab_for(vocab_size) * dtype.itemsize
    return max(64, CHUNK_BYTES // per_token // 64 * 64)


def _recomputes_in_backward(dtype: torch.dtype) -> bool:
    """Whether the gradient waits for the backward (fp16: see the module docstring) instead of the forward."""
    return dtype == torch.float16


def _grad_shapes(x: torch.Tensor, weight: torch.Tensor, grads_in_forward: bool
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the forward's dx and dweight outputs: x's and weight's, or (0,) each when it computes none."""
    return (tuple(x.shape), tuple(weight.shape)) if grads_in_forward else ((0,), (0,))


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """The shape and dtype rules of every cross-entropy op, real and fake."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: x {tuple(x.shape)} and weight {tuple(weight.shape)} must be "
                         f"(N, d) and (V, d)")
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if targets.shape != x.shape[:1] or targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets {tuple(targets.shape)} {targets.dtype} must be integer ids, one per row of x "
                         f"{tuple(x.shape)}")


def _logits_buffer(rows: int, vocab_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(rows, padded vocab) chunk buffer with -inf in the padding columns (the kernel keeps them so)."""
    buffer = torch.empty(rows, padded_vocab_for(vocab_size), dtype=dtype, device=device)
    buffer[:, vocab_size:] = float("-inf")
    return buffer


def _sweep_chunks(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_tokens: int,
    row_loss: torch.Tensor, grad_scale: torch.Tensor, grads: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """Per chunk: logits by one matmul, then the kernel (loss, and with `grads` the logits' gradient),
    then with `grads` = (dx, dweight) the two matmuls that write dx and add to dweight."""
    num_tokens, vocab_size = x.shape[0], weight.shape[0]
    chunk = min(chunk_tokens or chunk_tokens_for(vocab_size, x.dtype), max(num_tokens, 1))
    buffer = _logits_buffer(chunk, vocab_size, x.dtype, x.device)
    padded = buffer.shape[1]
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        x_chunk = x[start:end]
        logits = buffer[: end - start, :vocab_size]  # row stride `padded`
        torch.mm(x_chunk, weight.t(), out=logits)
        _cross_entropy_kernel[(end - start,)](
            logits, targets[start:end], row_loss[start:end], grad_scale, vocab_size, padded, ignore_index,
            WRITE_GRAD=grads is not None, BLOCK_V=_block_v(padded),
            num_warps=8,  # 8 warps: 16 columns per thread per 4096-wide sweep
        )
        if grads is not None:
            dx, dweight = grads
            torch.mm(logits, weight, out=dx[start:end])
            if dweight.dtype == logits.dtype:
                dweight.addmm_(logits.t(), x_chunk)
            else:
                dweight += logits.t() @ x_chunk


def _grad_buffers(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dx in x's dtype; dweight sums one product per chunk, so its running sum is (at least) fp32."""
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=x.device))


def _fused_forward(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_tokens: int,
    grads_in_forward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dloss/dx, dloss/dweight) for x (N, d), weight (V, d), targets (N,); without
    `grads_in_forward` only the loss is computed and both gradients are empty."""
    targets = targets.contiguous()
    n_valid = (targets != ignore_index).sum().clamp(min=1)  # stays on the device: no host sync
    row_loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    grads = _grad_buffers(x, weight) if grads_in_forward else None
    _sweep_chunks(x, weight, targets, ignore_index, chunk_tokens, row_loss, 1.0 / n_valid.float(), grads)
    loss = row_loss.sum() / n_valid
    if grads is None:
        dx_shape, dweight_shape = _grad_shapes(x, weight, False)
        return loss, x.new_empty(dx_shape), weight.new_empty(dweight_shape)
    return loss, grads[0], grads[1].to(weight.dtype)


def _recomputed_backward(
    grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) for an incoming grad_loss: the logits' gradient is written already scaled by it."""
    targets = targets.contiguous()
    n_valid = (targets != ignore_index).sum().clamp(min=1)
    grad_scale = grad_loss.float() / n_valid
    scratch_loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    dx, dweight = _grad_buffers(x, weight)
    _sweep_chunks(x, weight, targets, ignore_index, chunk_tokens, scratch_loss, grad_scale, (dx, dweight))
    return dx, dweight.to(weight.dtype)


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------
# Both ops check their own inputs, real and fake alike, so a direct torch.ops.kernels.* call fails
# as the reference does instead of reading past a tensor.


@torch.library.custom_op("kernels::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_tokens: int,
    needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked Triton forward. Returns (loss, dx, dweight): with `needs_grad` and x not fp16 the
    gradients are computed here and only scaled in the backward, so no logits are kept between
    forward and backward. Otherwise dx and dweight are empty (0,) tensors and the forward does the
    loss's work only (fp16's backward recomputes; see the module docstring)."""
    _check_inputs(x, weight, targets)
    grads_in_forward = needs_grad and not _recomputes_in_backward(x.dtype)
    return _fused_forward(x, weight, targets, ignore_index, chunk_tokens, grads_in_forward)


@_linear_cross_entropy_op.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_tokens: int,
    needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_inputs(x, weight, targets)
    grads_in_forward = needs_grad and not _recomputes_in_backward(x.dtype)
    dx_shape, dweight_shape = _grad_shapes(x, weight, grads_in_forward)
    return (torch.empty((), dtype=torch.float32, device=x.device),
            torch.empty(dx_shape, dtype=x.dtype, device=x.device),
            torch.empty(dweight_shape, dtype=weight.dtype, device=weight.device))


@torch.library.custom_op("kernels::linear_cross_entropy_bwd", mutates_args=())
def _linear_cross_entropy_bwd_op(
    grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recomputing backward (fp16): (dx, dweight) in x's and weight's dtypes for a 0-d grad_loss."""
    _check_inputs(x, weight, targets)
    return _recomputed_backward(grad_loss, x, weight, targets, ignore_index, chunk_tokens)


@_linear_cross_entropy_bwd_op.register_fake
def _(
    grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(x, weight, targets)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device))


def _setup_context(ctx: Any, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Save the forward's gradients, or (fp16) what the backward recomputes them from."""
    x, weight, targets, ignore_index, chunk_tokens, _ = inputs
    _, dx, dweight = output
    ctx.mark_non_differentiable(dx, dweight)
    ctx.recompute = _recomputes_in_backward(x.dtype)
    if ctx.recompute:
        ctx.save_for_backward(x, weight, targets)
        ctx.ignore_index, ctx.chunk_tokens = ignore_index, chunk_tokens
    else:
        ctx.save_for_backward(dx, dweight)


def _backward(ctx: Any, grad_loss: torch.Tensor, _grad_dx: torch.Tensor, _grad_dweight: torch.Tensor) -> tuple:
    """Scale the gradients saved by the forward (always multiplied: a check for 1.0 would sync), or recompute."""
    if ctx.recompute:
        x, weight, targets = ctx.saved_tensors
        dx, dweight = _linear_cross_entropy_bwd_op(grad_loss, x, weight, targets, ctx.ignore_index, ctx.chunk_tokens)
    else:
        dx, dweight = (g * grad_loss for g in ctx.saved_tensors)
    return dx, dweight, None, None, None, None


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` (x (..., d), weight (V, d), targets (...)) in chunks.

    x and weight must share a dtype; autocast is not consulted here (`kernels.linear_cross_entropy`
    applies it for both backends). `chunk_tokens` 0 picks the chunk so that its logits take about
    CHUNK_BYTES. Targets must lie in [0, V) or equal `ignore_index`. When no gradient will be taken
    (grad mode off, or neither x nor weight requires one) the gradient work is skipped.
    """
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must match x's leading dims {tuple(x.shape[:-1])}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss, _, _ = _linear_cross_entropy_op(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1),
                                          ignore_index, chunk_tokens, needs_grad)
    return loss
