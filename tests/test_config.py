"""Presets hit the original table; parameter counts match the built model; FLOPs match a count."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import kernels
from tachyon.config import (
    PRESETS,
    TABLE_TARGETS,
    ModelConfig,
    UnknownPresetError,
    active_params,
    flops_per_token,
    get_preset,
    total_params,
)
from tachyon.model import TachyonLM


def test_tiny_is_the_original_110m_75m() -> None:
    c = PRESETS["tiny"]
    assert (c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.d_ff, c.d_shared_ff) == (512, 8, 8, 4, 1408, 704)
    assert total_params(c) == pytest.approx(110e6, rel=0.01)
    assert active_params(c) == pytest.approx(75e6, rel=0.01)


@pytest.mark.parametrize("name", sorted(TABLE_TARGETS))
def test_presets_within_5_percent_of_the_table(name: str) -> None:
    c = PRESETS[name]
    total, active = TABLE_TARGETS[name]
    assert abs(total_params(c) / total - 1) < 0.05
    assert abs(active_params(c) / active - 1) < 0.05
    assert c.d_model % 64 == 0 and c.d_ff % 64 == 0 and c.d_shared_ff % 64 == 0
    assert c.head_dim in (64, 128)


@pytest.mark.parametrize("name", ["nano", "tiny"])
def test_counts_match_the_built_model(name: str) -> None:
    with torch.device("meta"):
        model = TachyonLM(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == total_params(PRESETS[name])


def _counted_training_flops(config: ModelConfig, batch: int, seq_len: int) -> tuple[int, int]:
    """(matmul, attention-product) FLOPs FlopCounterMode sees in one forward + backward of the loss.

    The reference kernels keep every matmul a plain aten op the counter knows; SDPA's math
    backend computes q k^T and p v as batched matmuls (the CPU's fused SDPA kernel is not in
    the counter's table), and they are the model's only aten.bmm calls.
    """
    model = TachyonLM(config)
    idx = torch.randint(0, config.vocab_size, (batch, seq_len + 1))
    with kernels.use("reference"), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx[:, :-1], idx[:, 1:]).loss.backward()
    by_op = counter.get_flop_counts()["Global"]
    attention = by_op.pop(torch.ops.aten.bmm, 0)
    return sum(by_op.values()), attention


@pytest.mark.parametrize("config", [
    PRESETS["nano"].replace(vocab_size=320, n_layers=2),  # GQA 4 (2), top-2 of 4 + 1 shared
    PRESETS["nano"].replace(vocab_size=192, n_layers=1, d_model=128, n_heads=4, n_kv_heads=1,
                            top_k=1, n_shared_experts=2, d_shared_ff=192),
], ids=["nano-2-layers", "top1-two-shared"])
@pytest.mark.parametrize("seq_len", [16, 48])
def test_flops_per_token_matches_a_flop_counter(config: ModelConfig, seq_len: int) -> None:
    """flops_per_token counts training (forward + backward) FLOPs; so does the counter here.

    Both count 2 FLOPs per multiply-add and only matmuls (norms, softmax and SwiGLU's
    elementwise work are in neither). The counter's attention products are dense: it has no
    notion of the causal mask, so it counts every (query, key) pair, 12 L T d_attn per token,
    where flops_per_token counts a causal query's average half of them; hence the halving.
    Routed experts count exactly top_k per token whatever the routing, since no token is dropped.
    """
    batch = 2
    matmul, attention = _counted_training_flops(config, batch, seq_len)
    d_attn = config.n_heads * config.head_dim
    assert attention == 12 * config.n_layers * seq_len * d_attn * batch * seq_len
    assert matmul + attention // 2 == flops_per_token(config, seq_len) * batch * seq_len


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownPresetError, match="nano, tiny, small, medium, large"):
        get_preset("huge")


def test_invalid_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig(top_k=5, n_routed_experts=4)
