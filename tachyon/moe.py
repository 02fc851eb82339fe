"""The MoE feed-forward: a top-k router over stacked routed experts plus an always-on shared expert."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import SwiGLU

from .config import INIT_STD, ModelConfig


class RouterStats(NamedTuple):
    """What one MoE layer reports besides its output."""

    z_loss: torch.Tensor  # scalar, already scaled by z_loss_coef
    balance_loss: torch.Tensor  # scalar, already scaled by balance_loss_coef
    expert_fraction: torch.Tensor  # (E,) fp32, share of routed assignments each expert got


def router_losses(logits: torch.Tensor, lse: torch.Tensor, counts: torch.Tensor, top_k: int,
                  z_coef: float, balance_coef: float) -> RouterStats:
    """z-loss `coef * mean(lse^2)` and balance loss `coef * E * sum_e(mean_prob_e * fraction_e)`.

    logits (T, E) fp32; lse (T,); counts (E,) tokens routed to each expert. Fractions are
    counted in fp32 and carry no gradient; the balance gradient flows through mean_prob.
    """
    num_tokens, num_experts = logits.shape
    z_loss = z_coef * lse.pow(2).mean()
    mean_prob = torch.exp(logits - lse[:, None]).mean(0)  # (E,) softmax from the router's own logsumexp
    fraction = counts.float() / (num_tokens * top_k)  # (E,)
    balance = balance_coef * num_experts * (mean_prob * fraction).sum()
    return RouterStats(z_loss, balance, fraction.detach())


class MoE(nn.Module):
    """Top-k routed SwiGLU experts stored stacked (w13 (E, d, 2f), w2 (E, f, d)) + a shared expert."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, d, f = config.n_routed_experts, config.d_model, config.d_ff
        self.top_k = config.top_k
        self.z_coef, self.balance_coef = config.z_loss_coef, config.balance_loss_coef
        self.residual_std = config.residual_init_std
        self.router = nn.Linear(d, E, bias=False)
        self.w13 = nn.Parameter(torch.empty(E, d, 2 * f))  # gate in [..., :f], up in [..., f:]
        self.w2 = nn.Parameter(torch.empty(E, f, d))
        self.shared = SwiGLU(d, config.n_shared_experts * config.d_shared_ff)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init: INIT_STD for the router and the experts' input matrices (w13), the
        residual std for their output matrices (w2), which write into the residual stream."""
        for weight in (self.router.weight, self.w13, self.shared.w13.weight):
            nn.init.normal_(weight, std=INIT_STD)
        for weight in (self.w2, self.shared.w2.weight):
            nn.init.normal_(weight, std=self.residual_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        """x (B, T, d) -> (B, T, d) and the router's losses and expert fractions."""
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(flat.float(), self.router.weight.float())  # (N, E) in fp32
        weights, ids, counts, lse = kernels.router_topk(logits, self.top_k)  # (N, k), (N, k), (E,), (N,)
        stats = router_losses(logits, lse, counts, self.top_k, self.z_coef, self.balance_coef)
        routed = kernels.moe_experts(flat, ids, weights, self.w13, self.w2)  # (N, d); autocast casts the GEMM operands
        return routed.view(B, T, d) + self.shared(x), stats
