"""Model configuration, the presets, and parameter / FLOP counts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import TachyonError

INIT_STD = 0.02  # std of the normal init of every weight matrix (the original's value everywhere)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and loss coefficients of a Tachyon MoE decoder (field names follow the original)."""

    vocab_size: int = 50258
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 4
    d_ff: int = 1408  # hidden width of each routed expert
    d_shared_ff: int = 704  # hidden width of each shared expert
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    top_k: int = 2
    max_seq_len: int = 2048
    dropout: float = 0.0
    rope_theta: float = 10000.0
    z_loss_coef: float = 1e-3
    balance_loss_coef: float = 1e-2
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if not 1 <= self.top_k <= self.n_routed_experts:
            problems.append(f"top_k {self.top_k} must be in [1, n_routed_experts={self.n_routed_experts}]")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def residual_init_std(self) -> float:
        """Init std of the matrices that write into the residual stream (attention and expert outputs).

        INIT_STD / sqrt(2 n_layers), as in GPT-2: the 2 n_layers branches (attention and MoE in
        every block) add up in the residual stream, so their sum starts with about the variance
        of one branch at INIT_STD. The original Tachyon 2 used INIT_STD for these too.
        """
        return INIT_STD / (2 * self.n_layers) ** 0.5

    def replace(self, **changes: object) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Ours: a few million parameters that learn visibly on a laptop CPU in minutes.
    "nano": ModelConfig(
        vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
        d_ff=512, d_shared_ff=256, n_routed_experts=4, max_seq_len=512,
    ),
    # The original Tachyon 2 dims: 110M total / 75M active.
    "tiny": ModelConfig(),
    # Chosen to hit the original README table (350M/150M, 1B/400M, 2B/700M) within 5%.
    "small": ModelConfig(
        d_model=768, n_layers=16, n_heads=12, n_kv_heads=6,
        d_ff=896, d_shared_ff=448, n_routed_experts=8,
    ),
    "medium": ModelConfig(
        d_model=1280, n_layers=20, n_heads=20, n_kv_heads=5,
        d_ff=1280, d_shared_ff=640, n_routed_experts=8,
    ),
    "large": ModelConfig(
        d_model=1280, n_layers=24, n_heads=20, n_kv_heads=5,
        d_ff=2368, d_shared_ff=1152, n_routed_experts=8,
    ),
}

# The original README's table: preset -> (total, active) parameters.
TABLE_TARGETS: dict[str, tuple[float, float]] = {
    "tiny": (110e6, 75e6),
    "small": (350e6, 150e6),
    "medium": (1e9, 400e6),
    "large": (2e9, 700e6),
}


class UnknownPresetError(TachyonError, ValueError):
    """A preset name that is not in PRESETS."""


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`, or a clear error listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}"
        ) from None


def _attention_matmul_params(c: ModelConfig) -> int:
    q_and_o = 2 * c.d_model * c.n_heads * c.head_dim
    k_and_v = 2 * c.d_model * c.n_kv_heads * c.head_dim
    return q_and_o + k_and_v


def _layer_matmul_params(c: ModelConfig, experts_used: int) -> int:
    """One block's weight matrices when `experts_used` routed experts count: attention, experts, router."""
    routed = experts_used * 3 * c.d_model * c.d_ff
    shared = c.n_shared_experts * 3 * c.d_model * c.d_shared_ff
    router = c.d_model * c.n_routed_experts
    return _attention_matmul_params(c) + routed + shared + router


def _layer_norm_params(c: ModelConfig) -> int:
    """One block's norm scales: the attention and FFN RMSNorms, and QK-norm's two head_dim weights."""
    return 2 * c.d_model + 2 * c.head_dim


def total_params(c: ModelConfig) -> int:
    """Every parameter (the output head is tied to the embedding, so counted once)."""
    per_layer = _layer_matmul_params(c, c.n_routed_experts) + _layer_norm_params(c)
    return c.vocab_size * c.d_model + c.n_layers * per_layer + c.d_model


def active_params(c: ModelConfig) -> int:
    """Parameters one token touches: all but the routed experts it was not sent to."""
    per_layer = _layer_matmul_params(c, c.top_k) + _layer_norm_params(c)
    return c.vocab_size * c.d_model + c.n_layers * per_layer + c.d_model


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, matmuls only.

    6 x the weight-matrix entries one token meets (2 per multiply-add in the forward, 4 in the
    backward for the input and weight gradients): attention projections, router, shared expert,
    top_k routed experts, and the tied LM head's vocab x d_model (the embedding lookup itself is
    free). Norm scales are left out: they do no matmul. Plus attention scores and values:
    6 x n_layers x seq_len x d_attn, half of the dense 12 L T d_attn since a causal query sees
    on average half the keys (the convention FlashAttention's benchmarks use).
    """
    d_attn = c.n_heads * c.head_dim
    matmul_weights = c.vocab_size * c.d_model + c.n_layers * _layer_matmul_params(c, c.top_k)
    return 6 * matmul_weights + 6 * c.n_layers * seq_len * d_attn


def preset_table() -> str:
    """A markdown table of every preset: shape, total and active parameters, table target."""
    lines = [
        "| preset | layers | d_model | heads (kv) | experts (top-k) | d_ff / shared | total | active | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in PRESETS.items():
        total, active = total_params(c), active_params(c)
        target = TABLE_TARGETS.get(name)
        goal = f"{target[0] / 1e6:,.0f}M / {target[1] / 1e6:,.0f}M" if target else "(ours)"
        lines.append(
            f"| {name} | {c.n_layers} | {c.d_model} | {c.n_heads} ({c.n_kv_heads}) | "
            f"{c.n_routed_experts} (top-{c.top_k}) + {c.n_shared_experts} shared | "
            f"{c.d_ff} / {c.d_shared_ff} | {total / 1e6:,.1f}M | {active / 1e6:,.1f}M | {goal} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(preset_table())
