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

__all__ = ["Attention", "KVCache", "RMSNorm", "RotaryEmbedding", "SwiGLU", "allowed_keys", "attention_mask"]


class RotaryEmbedding(nn.Module):
    """cos/sin tables (max_seq_len, head_dim/2) in fp32 for rotate-half RoPE."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)


class KVCache:
    """Per-layer static-shape key/value cache: (B, max_len, n_kv_heads, head_dim) buffers each.

    The buffers never change shape and writes go to positions given as a tensor, so a compiled
    decode step is one graph for every position (as in gpt-fast) instead of one per length.
    """

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, static_address: bool = False) -> None:
        self.k = torch.zeros(batch, max_len, n_kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        if static_address:  # for torch.compile: CUDA graphs may then update the buffers in place
            for buffer in (self.k, self.v):
                torch._dynamo.mark_static_address(buffer)

    @property
    def max_len(self) -> int:
        """Positions the cache holds (its fixed length)."""
        return self.k.shape[1]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, Hkv, D) at positions input_pos (T,); return the whole buffers (B, max_len, Hkv, D)."""
        self.k.index_copy_(1, input_pos, k)
        self.v.index_copy_(1, input_pos, v)
        return self.k, self.v


def attention_mask(query_pos: torch.Tensor, key_len: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Which keys each query may see: query positions (T,), keys 0..key_len-1 -> (B or 1, 1, T, S) bool.

    Causal by absolute position: the query at p sees keys 0..p, so a fixed-length cache's unwritten
    slots stay hidden. key_mask (B, S) is False at padding. With a key mask every query may also
    see its own key: a left-pad query would otherwise have no key at all, its softmax would be NaN,
    and the NaN would leak into later layers through the pad's K/V (0 * NaN is NaN even where the
    mask gives it weight 0).
    """
    key_pos = torch.arange(key_len, device=query_pos.device)  # (S,)
    causal = key_pos <= query_pos[:, None]  # (T, S)
    if key_mask is None:
        return causal[None, None]  # (1, 1, T, S)
    own = key_pos == query_pos[:, None]  # (T, S)
    return ((causal & key_mask[:, None, :]) | own)[:, None]  # (B, 1, T, S)


def allowed_keys(num_tokens: int, key_mask: torch.Tensor | None, caches: list[KVCache] | None,
                 input_pos: torch.Tensor | None) -> torch.Tensor | None:
    """The keys each query may see, for every layer of one forward (see attention_mask): None for causal
    attention over unpadded tokens (the training path), else a (B or 1, 1, T, S) bool mask over the
    tokens themselves, or over the whole cache when decoding (key_mask (B, max_len) then)."""
    if caches is None:
        if key_mask is None:
            return None
        return attention_mask(torch.arange(num_tokens, device=key_mask.device), num_tokens, key_mask)
    return attention_mask(input_pos, caches[0].max_len, key_mask)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
            allowed: torch.Tensor | None) -> torch.Tensor:
    """GQA attention on (B, T, H, D) q and (B, S, Hkv, D) k/v -> (B, T, H, D).

    allowed (B or 1, 1, T, S) bool marks the keys each query sees (see attention_mask); None is
    plain causal attention with S == T, the training path (flash-attn for CUDA half precision).
    K/V are never repeated per head.
    """
    if allowed is None and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, dropout_p=dropout, causal=True)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                         is_causal=allowed is None, enable_gqa=True)
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
                allowed: torch.Tensor | None = None, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model); with a cache, x holds positions input_pos (T,) of it.

        allowed (B or 1, 1, T, S) marks the keys each query sees (see allowed_keys, built once per forward
        for all layers); None is plain causal attention over x itself. RoPE uses the absolute positions:
        0..T-1, or input_pos.
        """
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, D)
        q, k, v = qkv.split((H, Hkv, Hkv), dim=2)  # views: (B, T, H, D), (B, T, Hkv, D) x 2
        cos, sin = (rotary.cos, rotary.sin) if cache is None else (rotary.cos[input_pos], rotary.sin[input_pos])
        q, k = kernels.qk_norm_rope(q, k, self.q_norm, self.k_norm, cos, sin, 0, self.eps)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, max_len, Hkv, D) each
        out = _attend(q, k, v, self.dropout if self.training else 0.0, allowed)  # (B, T, H, D)
        return self.proj(out.reshape(B, T, H * D))
