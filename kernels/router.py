"""Router: softmax over experts, top-k, renormalised weights, per-expert counts, logsumexp."""

from __future__ import annotations

import torch


def router_topk_reference(
    logits: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition, in fp32: logits (T, E) -> weights (T, k) fp32, ids (T, k) int32,
    counts (E,) int32 (tokens routed to each expert), logsumexp (T,) fp32 for the z-loss.

    Ties between equal probabilities go to the lower expert id (a stable descending sort).
    """
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"top-k must be in [1, {num_experts}], got {k}")
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse[:, None])
    order = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    top = probs.gather(-1, order)
    weights = top / top.sum(-1, keepdim=True)
    counts = torch.bincount(order.flatten(), minlength=num_experts).to(torch.int32)
    return weights, order.to(torch.int32), counts, lse


def router_topk(logits, k):
    raise NotImplementedError("Triton router_topk lands with issue 7")
