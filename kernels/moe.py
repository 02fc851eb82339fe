"""Dropless routed-expert SwiGLU FFN: permute by expert, grouped GEMMs, weighted unpermute."""

from __future__ import annotations

import torch

from .swiglu import swiglu_reference


def moe_experts_reference(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """The definition, one expert at a time (readable, not fast).

    x (T, d); ids, weights (T, k); w13 (E, d, 2f) with gate in [..., :f] and up in [..., f:];
    w2 (E, f, d). Returns sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) as (T, d) in x's dtype.
    """
    d_ff = w2.shape[1]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in range(w13.shape[0]):
        token, slot = torch.where(ids == expert)
        h = x[token] @ w13[expert].to(x.dtype)  # (n, 2f)
        y = swiglu_reference(h[:, :d_ff], h[:, d_ff:]) @ w2[expert].to(x.dtype)  # (n, d)
        out = out.index_add(0, token, y.float() * weights[token, slot, None].float())
    return out.to(x.dtype)


def moe_experts(x, ids, weights, w13, w2):
    raise NotImplementedError("Triton moe_experts lands with issue 7")
