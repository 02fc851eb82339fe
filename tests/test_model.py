"""The reference model's architecture: init, causality, GQA, routing, aux losses, shared expert, learning."""

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from tachyon.config import PRESETS
from tachyon.layers import _attend
from tachyon.model import TachyonLM
from tachyon.moe import MoE, router_losses

SMALL = PRESETS["nano"].replace(vocab_size=256, n_layers=2, max_seq_len=64)
NORM_SCALES = {"attn_norm", "ffn_norm", "norm", "q_norm", "k_norm"}
RESIDUAL_OUTPUTS = {"proj", "w2"}  # attn.proj, moe.w2 (routed experts), moe.shared.w2


def _documented_init_std(name: str, n_layers: int) -> float | None:
    """The README's init for a parameter: None for norm scales (ones), else the normal std.

    0.02 everywhere except the matrices that write into the residual stream, 0.02 / sqrt(2 n_layers).
    """
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if module in NORM_SCALES:
        return None
    return 0.02 / math.sqrt(2 * n_layers) if module in RESIDUAL_OUTPUTS else 0.02


def _assert_documented_init(module: torch.nn.Module, n_layers: int) -> None:
    """Every parameter: ones for norm scales; else mean 0 and the documented std within 4 sigma of sampling."""
    for name, p in module.named_parameters():
        std = _documented_init_std(name, n_layers)
        if std is None:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        n = p.numel()
        assert abs(p.mean().item()) < 4 * std / math.sqrt(n), name
        assert p.std().item() == pytest.approx(std, rel=4 / math.sqrt(2 * n)), name


@pytest.fixture(autouse=True)
def _reference_kernels():
    with kernels.use("reference"):
        yield


def test_fresh_model_has_the_documented_init() -> None:
    model = TachyonLM(SMALL)
    _assert_documented_init(model, SMALL.n_layers)


def test_moe_reset_parameters_restores_the_documented_init() -> None:
    moe = MoE(SMALL)
    with torch.no_grad():
        for p in moe.parameters():
            p.fill_(float("nan"))
    moe.reset_parameters()
    _assert_documented_init(moe, SMALL.n_layers)


def test_causal_future_tokens_do_not_change_earlier_logits() -> None:
    model = TachyonLM(SMALL).eval()
    idx = torch.randint(0, SMALL.vocab_size, (2, 24))
    changed = idx.clone()
    changed[:, 16:] = torch.randint(0, SMALL.vocab_size, (2, 8))
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :16], b[:, :16], rtol=0, atol=1e-5)
    assert (a[:, 16:] - b[:, 16:]).abs().max() > 1e-3


def test_gqa_equals_explicitly_repeated_kv() -> None:
    B, T, H, Hkv, D = 2, 10, 8, 2, 16
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    ours = _attend(q, k, v, 0.0, None)
    rep = lambda t: t.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), rep(k), rep(v), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(ours, expected)


def test_router_weights_sum_to_one_and_ids_are_distinct() -> None:
    weights, ids, counts, lse = kernels.router_topk(torch.randn(50, 8), 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    assert all(len(set(row.tolist())) == 3 for row in ids)
    assert ids.dtype == torch.int32
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=8).tolist()


def test_aux_losses_match_a_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    weights, ids, counts, lse = kernels.router_topk(logits, 1)
    stats = router_losses(logits, lse, counts, top_k=1, z_coef=1e-3, balance_coef=1e-2)
    lse_hand = [math.log(math.exp(2) + 2), math.log(math.e + 2)]
    assert stats.z_loss.item() == pytest.approx(1e-3 * (lse_hand[0] ** 2 + lse_hand[1] ** 2) / 2, rel=1e-6)
    p0 = [math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2), 1 / (math.exp(2) + 2)]
    p1 = [1 / (math.e + 2), math.e / (math.e + 2), 1 / (math.e + 2)]
    mean_prob = [(a + b) / 2 for a, b in zip(p0, p1, strict=True)]
    fraction = [0.5, 0.5, 0.0]  # token 0 -> expert 0, token 1 -> expert 1
    expected = 1e-2 * 3 * sum(m * f for m, f in zip(mean_prob, fraction, strict=True))
    assert stats.balance_loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats.expert_fraction.tolist() == fraction


def test_shared_expert_is_always_applied() -> None:
    moe = MoE(SMALL)
    x = torch.randn(1, 5, SMALL.d_model)
    with torch.no_grad():
        moe.w2.zero_()  # routed experts now contribute nothing
        out, _ = moe(x)
    gate, up = (x @ moe.shared.w13.weight.T).chunk(2, dim=-1)
    torch.testing.assert_close(out, (F.silu(gate) * up) @ moe.shared.w2.weight.T)


def test_moe_layer_matches_a_dense_per_token_loop() -> None:
    moe = MoE(SMALL)
    x = torch.randn(1, 6, SMALL.d_model)
    out, _ = moe(x)
    probs = torch.softmax(moe.router(x[0]).float(), -1)
    f = SMALL.d_ff
    expected = []
    for t in range(6):
        top = probs[t].topk(SMALL.top_k)
        w = top.values / top.values.sum()
        y = moe.shared(x[0, t])
        for weight, e in zip(w, top.indices, strict=True):
            h = x[0, t] @ moe.w13[e]
            y = y + weight * ((F.silu(h[:f]) * h[f:]) @ moe.w2[e])
        expected.append(y)
    torch.testing.assert_close(out[0], torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_loss_breakdown_adds_up_and_ignores_padding() -> None:
    model = TachyonLM(SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    targets = idx.roll(-1, 1)
    out = model(idx, targets, return_logits=True)
    assert model(idx, targets).logits is None  # training needs no full-vocab logits
    torch.testing.assert_close(out.loss, out.ce + out.z_loss + out.balance_loss)
    assert out.expert_fraction.shape == (SMALL.n_layers, SMALL.n_routed_experts)
    masked = targets.clone()
    masked[:, 8:] = -100
    expected = F.cross_entropy(out.logits[:, :8].flatten(0, 1), targets[:, :8].flatten())
    torch.testing.assert_close(model(idx, masked).ce, expected)


def test_nano_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = TachyonLM(SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(idx[:, :-1], idx[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(idx[:, :-1], idx[:, 1:]).ce.item() < 0.5
