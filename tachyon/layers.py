"""The dense building blocks: rotary tables, grouped-query attention with QK-norm, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import RMSNorm, SwiGLU

from .config import ModelConfig

try:  # flash-attn is optional (the `flash` extra); SDPA is the fallback.
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None

__all__ = ["Attention", "KVCache", "RMSNorm", "RotaryEmbedding", "SwiGLU"]


class RotaryEmbedding(nn.Module):
    """cos/sin tables (max_seq_len, head_dim/2) in fp32 for rotate-half RoPE."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)


class KVCache:
    """Per-layer key/value cache for decoding: (B, max_len, n_kv_heads, head_dim) each."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.k = torch.zeros(batch, max_len, n_kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # positions filled so far

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, T, Hkv, D) after the filled positions; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Causal GQA attention on (B, T, H, D) q and (B, S, Hkv, D) k/v -> (B, T, H, D).

    Query i sits at key position S - T + i (bottom-right causal alignment), so the same call
    serves training (S == T) and cached decoding (S > T). K/V are never repeated per head.
    With a key mask every query may also see its own key: a left-pad query would otherwise have
    no key at all, its softmax would be NaN, and the NaN would leak into later layers through
    the pad's K/V (0 * NaN is NaN even where the mask gives it weight 0).
    """
    T, S = q.shape[1], k.shape[1]
    if mask is None and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, dropout_p=dropout, causal=True)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if mask is None and T == S:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=True)
    elif mask is None and T == 1:  # one decoded token sees every cached key: no mask to build
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=True)
    else:
        query_pos = torch.arange(S - T, S, device=q.device)[:, None]  # (T, 1)
        key_pos = torch.arange(S, device=q.device)[None, :]  # (1, S)
        allowed = key_pos <= query_pos  # (T, S) causal
        if mask is not None:
            allowed = (allowed & mask[:, None, None, :]) | (key_pos == query_pos)  # (B, 1, T, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, enable_gqa=True)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Grouped-query attention with QK-norm (RMSNorm over head_dim) and rotate-half RoPE."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.eps = config.norm_eps
        self.dropout = config.dropout
        qkv_width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_width, bias=False)
        self.proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)
        self.q_norm = nn.Parameter(torch.ones(self.head_dim))
        self.k_norm = nn.Parameter(torch.ones(self.head_dim))

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model); with a cache, x holds the positions after it.

        mask (B, S) marks the key positions (cached + new) that may be attended (False = padding).
        """
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, D)
        q, k, v = qkv.split((H, Hkv, Hkv), dim=2)  # views: (B, T, H, D), (B, T, Hkv, D) x 2
        offset = 0 if cache is None else cache.length
        q, k = kernels.qk_norm_rope(q, k, self.q_norm, self.k_norm, rotary.cos, rotary.sin, offset, self.eps)
        if cache is not None:
            k, v = cache.append(k, v)
        out = _attend(q, k, v, self.dropout if self.training else 0.0, mask)  # (B, T, H, D)
        return self.proj(out.reshape(B, T, H * D))
