"""Rotate-half rotary embeddings on q and k, alone or after a per-head RMSNorm (QK-norm)."""

from __future__ import annotations

import torch

from .rmsnorm import rms_norm_reference


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, T, H, D); cos, sin (T, D/2) in fp32
    half = x.shape[-1] // 2
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, D) and k (B, T, Hkv, D) by the angles of positions offset..offset+T-1.

    cos and sin are tables (max_positions, D/2) of cos/sin(position * inv_freq), fp32.
    """
    T = q.shape[1]
    cos, sin = cos[offset : offset + T].float(), sin[offset : offset + T].float()
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offset: int = 0,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over head_dim (weights (D,)) of q and k, then RoPE."""
    return rope_reference(
        rms_norm_reference(q, q_weight, eps), rms_norm_reference(k, k_weight, eps), cos, sin, offset
    )


def rope(q, k, cos, sin, offset=0):
    raise NotImplementedError("Triton rope lands with issue 6")


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, offset=0, eps=1e-6):
    raise NotImplementedError("Triton qk_norm_rope lands with issue 6")
