"""Presets hit the original table; parameter counts match the built model; FLOPs are sane."""

import pytest
import torch

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


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    c = PRESETS["tiny"]
    assert flops_per_token(c, 2048) == 6 * active_params(c) + 6 * c.n_layers * 2048 * c.d_model
    assert flops_per_token(c, 4096) > flops_per_token(c, 2048)


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownPresetError, match="nano, tiny, small, medium, large"):
        get_preset("huge")


def test_invalid_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig(top_k=5, n_routed_experts=4)
