"""Router: softmax over experts, top-k, renormalised weights, per-expert counts, logsumexp.

Ranking rule (both backends): experts are ranked by their logits, largest first, equal logits to
the lower expert id. Softmax is monotone, so this is the order of the exact probabilities; ranking
the fp32-rounded probabilities instead would tie experts whose logits differ (by one ulp, or by
thousands once exp underflows to 0) and the tie would go to the lower id although the other expert
is likelier. A row holding a NaN logit takes experts 0..k-1, so every id stays in [0, E).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _check(logits: torch.Tensor, k: int) -> None:
    """The shape rules of every router op, real and fake: logits (T, E) and 1 <= k <= E."""
    if logits.dim() != 2:
        raise ValueError(f"router_topk: logits must be (tokens, experts), got shape {tuple(logits.shape)}")
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"top-k must be in [1, {num_experts}], got {k}")


def _ranking_key(logits: torch.Tensor) -> torch.Tensor:
    """What the experts are sorted by: the logits, or zeros for a row holding a NaN (so it takes 0..k-1)."""
    key = logits.detach()
    return torch.where(key.isnan().any(-1, keepdim=True), torch.zeros_like(key), key)


def router_topk_reference(
    logits: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition, in fp32: logits (T, E) -> weights (T, k) fp32, ids (T, k) int32,
    counts (E,) int32 (tokens routed to each expert), logsumexp (T,) fp32 for the z-loss.

    Experts are ranked by logit, equal logits to the lower id (a stable descending sort of the
    logits, not of the rounded probabilities: see the module's ranking rule). A row holding a NaN
    logit has all-NaN weights and takes experts 0..k-1 (ids stay valid).
    """
    _check(logits, k)
    num_experts = logits.shape[-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[:, None])
    order = torch.sort(_ranking_key(logits), dim=-1, descending=True, stable=True).indices[:, :k]
    top = probs.gather(-1, order)
    weights = top / top.sum(-1, keepdim=True)
    counts = torch.bincount(order.flatten(), minlength=num_experts).to(torch.int32)
    return weights, order.to(torch.int32), counts, lse


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
# The logits are read as a contiguous (T, E) matrix with E and k known at compile time: a
# program's (BLOCK_T, E) tile is then one contiguous span whose rows start 16-byte aligned, so
# each thread reads and writes whole 128-bit vectors (E = 4 or 8 fp32: one or two per row) instead
# of one element at a time, and the (T, k) outputs go out as k-wide vectors.


@triton.jit
def _router_topk_fwd_kernel(
    logits_ptr,  # (T, E) router logits, any float dtype, contiguous
    weights_ptr,  # (T, k) fp32 out: renormalised top-k probabilities, best first
    ids_ptr,  # (T, k) int32 out: the chosen expert ids, best first
    counts_ptr,  # (E,) int32 in/out: zero-initialised histogram of chosen ids, atomically added
    lse_ptr,  # (T,) fp32 out: logsumexp of each row (for the z-loss and the backward)
    num_tokens,  # T
    E: tl.constexpr,  # experts (the row length)
    TOP_K: tl.constexpr,  # k, 1 <= k <= E
    BLOCK_T: tl.constexpr,  # rows per program
    BLOCK_E: tl.constexpr,  # next power of two >= E: one program holds whole rows
    BLOCK_K: tl.constexpr,  # next power of two >= k: the (BLOCK_T, BLOCK_K) output tile
):
    """Softmax statistics, k rounds of arg-max of the logits (ties to the lower id), renormalise, histogram.

    A row with a NaN logit matches no maximum; it takes the lowest untaken experts instead (0..k-1,
    as the reference's ranking does), so every id is in [0, E).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < num_tokens
    valid = row_ok[:, None] & (cols < E)[None, :]
    logit = tl.load(logits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :],
                    mask=valid, other=float("-inf")).to(tl.float32)
    logit = tl.where(row_ok[:, None], logit, 0.0)  # padded rows: keep the arithmetic finite

    row_max = tl.max(logit, axis=1)
    lse = row_max + tl.log(tl.sum(tl.exp(logit - row_max[:, None]), axis=1))
    prob = tl.exp(logit - lse[:, None])

    # k rounds of "largest remaining logit, lowest id among equals" (the module's ranking rule).
    nan_row = tl.max((logit != logit).to(tl.int32), axis=1) > 0  # every untaken expert is a hit
    taken = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32) != 0  # experts already chosen per row
    top_p = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_id = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in range(TOP_K):
        cand = valid & ~taken
        best = tl.max(tl.where(cand, logit, float("-inf")), axis=1)
        hit = cand & ((logit == best[:, None]) | nan_row[:, None])
        idx = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)
        sel = cols[None, :] == idx[:, None]
        p_j = tl.sum(tl.where(sel, prob, 0.0), axis=1)
        top_p = tl.where(kcols[None, :] == j, p_j[:, None], top_p)
        top_id = tl.where(kcols[None, :] == j, idx[:, None], top_id)
        taken = taken | sel

    weights = top_p / tl.where(row_ok, tl.sum(top_p, axis=1), 1.0)[:, None]
    out_ok = row_ok[:, None] & (kcols[None, :] < TOP_K)
    out_off = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    tl.store(weights_ptr + out_off, weights, mask=out_ok)
    tl.store(ids_ptr + out_off, top_id, mask=out_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    hist = tl.sum((taken & valid).to(tl.int32), axis=0)  # this block's share of each expert
    tl.atomic_add(counts_ptr + cols, hist, mask=cols < E)


@triton.jit
def _router_topk_bwd_kernel(
    logits_ptr,  # (T, E) router logits, contiguous (recomputes the softmax instead of saving it)
    lse_ptr,  # (T,) fp32 logsumexp saved by the forward
    weights_ptr,  # (T, k) fp32 renormalised weights saved by the forward
    ids_ptr,  # (T, k) int32 chosen ids saved by the forward
    dweights_ptr,  # (T, k) fp32 gradient of the weights
    dlse_ptr,  # (T,) fp32 gradient of the logsumexp
    dlogits_ptr,  # (T, E) out, contiguous, in the logits' dtype
    num_tokens,  # T
    E: tl.constexpr,  # experts
    TOP_K: tl.constexpr,  # k
    BLOCK_T: tl.constexpr,  # rows per program
    BLOCK_E: tl.constexpr,  # next power of two >= E
    BLOCK_K: tl.constexpr,  # next power of two >= k
):
    """dlogits = dlse * softmax + scatter(ids, w * (dw - sum(w * dw))).

    The renormalised weights are a softmax over the chosen logits alone (the full softmax's
    normaliser cancels), so their Jacobian only touches the k chosen columns.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < num_tokens
    valid = row_ok[:, None] & (cols < E)[None, :]
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    logit = tl.load(logits_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    dlse = tl.load(dlse_ptr + rows, mask=row_ok, other=0.0)
    grad = dlse[:, None] * tl.exp(logit - lse[:, None])

    k_ok = row_ok[:, None] & (kcols[None, :] < TOP_K)
    k_off = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    w = tl.load(weights_ptr + k_off, mask=k_ok, other=0.0)
    dw = tl.load(dweights_ptr + k_off, mask=k_ok, other=0.0)
    ids = tl.load(ids_ptr + k_off, mask=k_ok, other=-1)
    g = w * (dw - tl.sum(w * dw, axis=1)[:, None])
    for j in range(TOP_K):
        id_j = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
        g_j = tl.sum(tl.where(kcols[None, :] == j, g, 0.0), axis=1)
        grad += tl.where(cols[None, :] == id_j[:, None], g_j[:, None], 0.0)
    tl.store(dlogits_ptr + offs, grad.to(dlogits_ptr.dtype.element_ty), mask=valid)


def _meta(num_experts: int, top_k: int) -> dict:
    """The kernels' compile-time sizes: whole rows per program, about 4k elements per tile."""
    block_e = triton.next_power_of_2(num_experts)
    return {"E": num_experts, "TOP_K": top_k, "BLOCK_T": max(1, min(128, 4096 // block_e)), "BLOCK_E": block_e,
            "BLOCK_K": triton.next_power_of_2(top_k)}


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------
# Both ops check their own inputs, real and fake alike, so a direct torch.ops.kernels.* call
# with a bad k fails as the reference does instead of reading or writing past a tensor.


@torch.library.custom_op("kernels::router_topk", mutates_args=())
def _router_topk_op(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton forward: one launch computes weights, ids, counts and logsumexp."""
    _check(logits, k)
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, k, dtype=torch.int32, device=logits.device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=logits.device)
    lse = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
    if num_tokens:
        meta = _meta(num_experts, k)
        _router_topk_fwd_kernel[(triton.cdiv(num_tokens, meta["BLOCK_T"]),)](
            logits.contiguous(), weights, ids, counts, lse, num_tokens, **meta)  # (T, E) is small: copy a strided one
    return weights, ids, counts, lse


@_router_topk_op.register_fake
def _(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(logits, k)
    num_tokens, num_experts = logits.shape
    return (logits.new_empty(num_tokens, k, dtype=torch.float32), logits.new_empty(num_tokens, k, dtype=torch.int32),
            logits.new_empty(num_experts, dtype=torch.int32), logits.new_empty(num_tokens, dtype=torch.float32))


def _check_bwd(dweights: torch.Tensor, dlse: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor,
               ids: torch.Tensor, lse: torch.Tensor) -> None:
    """The backward's tensors have the shapes the forward gave them."""
    _check(logits, ids.shape[-1] if ids.dim() == 2 else 0)
    num_tokens, k = logits.shape[0], ids.shape[1]
    rows = {"dweights": (dweights, (num_tokens, k)), "weights": (weights, (num_tokens, k)),
            "dlse": (dlse, (num_tokens,)), "lse": (lse, (num_tokens,))}
    for name, (t, shape) in rows.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"router_topk_bwd: {name} has shape {tuple(t.shape)}, expected {shape}")


@torch.library.custom_op("kernels::router_topk_bwd", mutates_args=())
def _router_topk_bwd_op(dweights: torch.Tensor, dlse: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor,
                        ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The Triton backward: gradient of the logits from the weights' and logsumexp's gradients."""
    _check_bwd(dweights, dlse, logits, weights, ids, lse)
    num_tokens, num_experts = logits.shape
    k = ids.shape[1]
    dlogits = torch.empty(num_tokens, num_experts, dtype=logits.dtype, device=logits.device)
    if num_tokens:
        meta = _meta(num_experts, k)
        _router_topk_bwd_kernel[(triton.cdiv(num_tokens, meta["BLOCK_T"]),)](
            logits.contiguous(), lse.contiguous(), weights.contiguous(), ids.contiguous(),
            dweights.float().contiguous(), dlse.float().contiguous(), dlogits, num_tokens, **meta,
        )
    return dlogits


@_router_topk_bwd_op.register_fake
def _(dweights: torch.Tensor, dlse: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor,
      ids: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    _check_bwd(dweights, dlse, logits, weights, ids, lse)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    """Save what the backward kernel reads; ids and counts carry no gradient."""
    logits, _ = inputs
    weights, ids, counts, lse = output
    ctx.mark_non_differentiable(ids, counts)
    ctx.save_for_backward(logits, weights, ids, lse)


def _backward(ctx, dweights, dids, dcounts, dlse):
    """dlogits from the weights' and logsumexp's gradients (autograd passes zeros for an unused output)."""
    logits, weights, ids, lse = ctx.saved_tensors
    return _router_topk_bwd_op(dweights, dlse, logits, weights, ids, lse), None


_router_topk_op.register_autograd(_backward, setup_context=_setup_context)


def router_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `router_topk`: logits (T, E) -> weights (T, k) fp32, ids (T, k) int32, counts (E,) int32,
    logsumexp (T,) fp32; differentiable through the weights and the logsumexp. Experts are ranked by
    logit, equal logits to the lower id (the module's ranking rule, the reference's too)."""
    return _router_topk_op(logits, k)
