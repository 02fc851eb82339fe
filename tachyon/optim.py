"""AdamW with the usual decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and stacked expert weights), not on norms, biases or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                   fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over decay_groups; fused (one kernel for all parameters) on CUDA by default."""
    if fused is None:
        fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)


def lr_at(step: int, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from max_lr down to min_lr at `total` steps."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of every optimizer step: linear warmup, then cosine from `lr` to `min_lr` (see lr_at)."""

    lr: float
    min_lr: float
    warmup: int
    max_steps: int

    def __call__(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        return lr_at(step, self.lr, self.min_lr, self.warmup, self.max_steps)
