"""TachyonLM: token embedding, pre-norm blocks (GQA attention + MoE FFN), tied output head, loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels

from .config import INIT_STD, ModelConfig
from .data.loader import IGNORE_INDEX  # the loader's target for positions not scored
from .layers import Attention, KVCache, RMSNorm, RotaryEmbedding, allowed_keys
from .moe import MoE, RouterStats


class ModelOutput(NamedTuple):
    """Logits and the loss broken into its parts (losses are None without targets)."""

    logits: torch.Tensor | None  # (B, T, V), (B, 1, V) with last_only; None with targets unless return_logits
    loss: torch.Tensor | None  # ce + z_loss + balance_loss
    ce: torch.Tensor | None
    z_loss: torch.Tensor | None
    balance_loss: torch.Tensor | None
    expert_fraction: torch.Tensor  # (n_layers, E): share of routed assignments per expert


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + moe(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.moe = MoE(config)  # initialises its own weights (MoE.reset_parameters)
        self.dropout = nn.Dropout(config.dropout)
        self._init_attention(config.residual_init_std)

    def _init_attention(self, residual_std: float) -> None:
        """Normal init of attention's projections: INIT_STD for qkv, residual_std for the output
        projection (it writes into the residual stream). QK-norm and RMSNorm scales stay ones."""
        nn.init.normal_(self.attn.qkv.weight, std=INIT_STD)
        nn.init.normal_(self.attn.proj.weight, std=residual_std)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, cache: KVCache | None = None,
                allowed: torch.Tensor | None = None, input_pos: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RouterStats]:
        x = x + self.dropout(self.attn(self.attn_norm(x), rotary, cache, allowed, input_pos))
        ffn, stats = self.moe(self.ffn_norm(x))
        return x + self.dropout(ffn), stats


class TachyonLM(nn.Module):
    """The Tachyon MoE decoder. `model(idx, targets)` returns a ModelOutput."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        nn.init.normal_(self.embed.weight, std=INIT_STD)  # also the tied output head

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, mask: torch.Tensor | None = None,
                return_logits: bool = False, input_pos: torch.Tensor | None = None,
                last_only: bool = False) -> ModelOutput:
        """idx (B, T) token ids; targets (B, T) with IGNORE_INDEX for positions not scored.

        With targets the loss comes from the fused LM head + cross-entropy, which never holds
        the batch's full-vocab logits; they are returned only without targets or when
        `return_logits` is set. With `caches` (one KVCache per layer) idx holds the tokens at
        cache positions input_pos (T,) int64, a tensor so that a compiled decode step serves every
        position. mask marks attendable key positions when prompts are padded: (B, T) without
        caches, (B, max_len) over the whole cache with them. last_only computes the logits of the last
        position alone, (B, 1, V): all that generation needs, without a (B, T, V) tensor for a long prompt.
        """
        self._check_positions(idx.shape[1], caches, input_pos)
        x = self.embed(idx)  # (B, T, d)
        stats = []
        allowed = allowed_keys(idx.shape[1], mask, caches, input_pos)  # once, for every layer
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            if self.gradient_checkpointing and self.training:
                x, s = checkpoint(block, x, self.rotary, cache, allowed, input_pos, use_reentrant=False)
            else:
                x, s = block(x, self.rotary, cache, allowed, input_pos)
            stats.append(s)
        x = self.norm(x)  # (B, T, d)
        fraction = torch.stack([s.expert_fraction for s in stats])
        if targets is None or return_logits:
            logits = F.linear(x[:, -1:] if last_only else x, self.embed.weight)  # (B, T or 1, V), tied head
        else:
            logits = None
        if targets is None:
            return ModelOutput(logits, None, None, None, None, fraction)
        ce = kernels.linear_cross_entropy(x, self.embed.weight, targets, IGNORE_INDEX)
        z_loss = torch.stack([s.z_loss for s in stats]).sum()
        balance = torch.stack([s.balance_loss for s in stats]).sum()
        return ModelOutput(logits, ce + z_loss + balance, ce, z_loss, balance, fraction)

    def _check_positions(self, T: int, caches: list[KVCache] | None, input_pos: torch.Tensor | None) -> None:
        """Raise ValueError for a sequence longer than the context or cache, or caches without input_pos.

        Only shapes are read (positions are on the device; reading them would sync every step).
        """
        if caches is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.config.max_seq_len}")
            return
        if input_pos is None or input_pos.shape != (T,):
            raise ValueError(f"with caches, input_pos must be the ({T},) cache positions of idx's tokens")
        if T > caches[0].max_len:
            raise ValueError(f"{T} new tokens exceed the cache's {caches[0].max_len} positions")

    def new_caches(self, batch: int, max_len: int, static_address: bool = False) -> list[KVCache]:
        """Empty static-shape KV caches, one per layer, for `batch` sequences of up to `max_len` positions.

        static_address marks the buffers for torch.compile's CUDA graphs (it imports dynamo, ~1 s).
        """
        c, p = self.config, self.embed.weight
        if max_len > c.max_seq_len:
            raise ValueError(f"a cache of {max_len} positions exceeds max_seq_len {c.max_seq_len}")
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        return [KVCache(batch, max_len, c.n_kv_heads, c.head_dim, p.device, dtype, static_address)
                for _ in range(c.n_layers)]
