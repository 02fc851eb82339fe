"""Triton moe_experts (sort, grouped GEMMs, fused SwiGLU, combine) against its reference loop."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernels import moe as moe_mod
from tests.kernels.correctness import DEVICE, check_against_truth


def _inputs(tokens: int, experts: int, top_k: int, d_model: int, d_ff: int, dtype: torch.dtype,
            ids: torch.Tensor | None = None, device: str = DEVICE) -> list[torch.Tensor]:
    """x (T, d), ids (T, k) int32 (distinct per token unless given), weights (T, k) fp32, w13, w2."""
    if ids is None:
        ids = torch.rand(tokens, experts).argsort(-1)[:, :top_k].to(torch.int32)
    weights = torch.softmax(torch.randn(tokens, top_k), -1)
    x = torch.randn(tokens, d_model)
    w13 = torch.randn(experts, d_model, 2 * d_ff) / d_model**0.5
    w2 = torch.randn(experts, d_ff, d_model) / d_ff**0.5
    return [x.to(device, dtype), ids.to(device), weights.to(device), w13.to(device, dtype), w2.to(device, dtype)]


def _check(inputs: list[torch.Tensor]) -> None:
    check_against_truth(moe_mod.moe_experts, moe_mod.moe_experts_reference, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_random_routing(dtype: torch.dtype) -> None:
    # 37 tokens, d 40, f 24: no size is a multiple of the interpreter's 32-wide tiles.
    _check(_inputs(37, 4, 2, 40, 24, dtype))


@pytest.mark.parametrize(("experts", "top_k"), [(4, 1), (4, 4)])
def test_moe_k_one_and_k_all(experts: int, top_k: int) -> None:
    _check(_inputs(21, experts, top_k, 24, 16, torch.float32))


def test_moe_empty_experts_and_one_token() -> None:
    ids = torch.tensor([[0, 2]] * 9, dtype=torch.int32)  # experts 1, 3, 4, 5 get nothing
    _check(_inputs(9, 6, 2, 16, 24, torch.float32, ids=ids))
    _check(_inputs(1, 4, 2, 16, 8, torch.float16))


def test_moe_all_tokens_on_one_expert() -> None:
    ids = torch.full((45, 1), 3, dtype=torch.int32)  # two row tiles of one expert, the second partial
    _check(_inputs(45, 4, 1, 16, 24, torch.float32, ids=ids))


def test_moe_skewed_routing_drops_nothing() -> None:
    tokens, experts = 60, 8
    ids = torch.rand(tokens, experts).argsort(-1)[:, :2].to(torch.int32)
    heavy = torch.rand(tokens) < 0.9
    ids[heavy, 0] = 5
    ids[heavy, 1] = torch.where(ids[heavy, 1] == 5, 6, ids[heavy, 1])  # keep each token's two experts distinct
    inputs = _inputs(tokens, experts, 2, 24, 16, torch.float32, ids=ids)
    _check(inputs)
    order, pos, offsets = moe_mod.sort_by_expert(inputs[1].reshape(-1).contiguous(), experts)
    assert torch.equal(offsets.diff().cpu(), torch.bincount(ids.reshape(-1).long(), minlength=experts).int())
    assert torch.equal(order.sort().values.cpu(), torch.arange(tokens * 2, dtype=torch.int32))
    assert torch.equal(order[pos.long()].cpu(), torch.arange(tokens * 2, dtype=torch.int32))


def test_moe_sort_is_stable() -> None:
    ids = torch.randint(0, 5, (3000,), dtype=torch.int32)  # several counting-sort blocks
    order, _, offsets = moe_mod.sort_by_expert(ids.to(DEVICE), 5)
    expected = torch.sort(ids, stable=True).indices.int()
    assert torch.equal(order.cpu(), expected)
    assert offsets.tolist() == [0, *torch.bincount(ids.long(), minlength=5).cumsum(0).tolist()]


def test_moe_strided_x_and_int64_ids() -> None:
    x, ids, weights, w13, w2 = _inputs(19, 4, 2, 16, 8, torch.float32)
    wide = torch.randn(19, 40, device=DEVICE)
    x = wide[:, 3:19]  # (19, 16) with row stride 40
    _check([x, ids.long(), weights, w13, w2])


def test_moe_ids_outside_the_experts_add_nothing() -> None:
    """A bad id (-1, E = 3, 9 past E's power of two) is masked out of the sort instead of writing out of
    bounds: that slot adds nothing and gets no weight gradient, exactly as in the reference loop."""
    ids = torch.rand(13, 3).argsort(-1)[:, :2].to(torch.int32)
    ids[2, 0], ids[7, 1], ids[11, 0] = -1, 3, 9
    inputs = _inputs(13, 3, 2, 16, 8, torch.float32, ids=ids)
    _check(inputs)
    order, pos, offsets = moe_mod.sort_by_expert(inputs[1].reshape(-1).contiguous(), 3)
    assert int(offsets[-1]) == 26 - 3 and pos.view(13, 2)[[2, 7, 11], [0, 1, 0]].tolist() == [-1, -1, -1]
    routed = (pos >= 0).nonzero().view(-1)
    assert torch.equal(order[pos[routed].long()].cpu(), routed.int().cpu())


BAD_SHAPES = {  # (T, d, d_ff, E, k) = (5, 8, 6, 3, 2); each case breaks one input of moe_experts
    "x not 2-D": lambda x, i, w, a, b: (x[None], i, w, a, b),
    "ids rows != T": lambda x, i, w, a, b: (x, i[:4], w[:4], a, b),
    "ids not 2-D": lambda x, i, w, a, b: (x, i[:, 0], w, a, b),
    "weights != ids": lambda x, i, w, a, b: (x, i, w[:, :1], a, b),
    "w13 wrong d": lambda x, i, w, a, b: (x, i, w, a[:, :7], b),
    "w13 odd width": lambda x, i, w, a, b: (x, i, w, a[..., :11], b),
    "w13 not 3-D": lambda x, i, w, a, b: (x, i, w, a[0], b),
    "w2 wrong E": lambda x, i, w, a, b: (x, i, w, a, b[:2]),
    "w2 wrong d_ff": lambda x, i, w, a, b: (x, i, w, a, b[:, :5]),
    "w2 wrong d": lambda x, i, w, a, b: (x, i, w, a, b[..., :7]),
    "float ids": lambda x, i, w, a, b: (x, i.float(), w, a, b),
    "integer x": lambda x, i, w, a, b: (x.long(), i, w, a, b),
}


@pytest.mark.parametrize("case", BAD_SHAPES)
@pytest.mark.parametrize("impl", [moe_mod.moe_experts, moe_mod.moe_experts_reference,
                                  lambda *a: torch.ops.kernels.moe_experts(*a)],
                         ids=["triton", "reference", "custom-op"])
def test_moe_rejects_bad_shapes(case: str, impl: Callable[..., torch.Tensor]) -> None:
    inputs = _inputs(5, 3, 2, 8, 6, torch.float32)
    with pytest.raises(ValueError, match="^moe_experts: "):
        impl(*BAD_SHAPES[case](*inputs))


ROLES = ("gate_up", "down", "down_dgrad", "gate_up_dgrad", "w13_grad", "w2_grad")
MM_ROLES = ROLES[:4]


def _tiles(configs: list, variant: str | None = None) -> list[tuple[int, ...]]:
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            for c in configs if variant is None or moe_mod._variant(c) == variant]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("interpret", [False, True], ids=["gpu", "interpreter"])
def test_moe_autotune_configs_follow_dtype_and_gpu(monkeypatch: pytest.MonkeyPatch, role: str, interpret: bool) -> None:
    """Each GEMM role's configs are built without a GPU too. Pruning keeps, on Hopper, the role's 16-bit
    tiles in both variants (pointer loads and TMA) for bf16/fp16 and the fp32 tiles for fp32; on Ampere
    the pointer tiles that do not spill there; under the interpreter its one small tile."""
    monkeypatch.setattr(moe_mod, "INTERPRET", interpret)
    configs = moe_mod.role_configs(role)
    def args(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors = {"a_ptr": torch.empty(8, 8, dtype=dtype), "b_ptr": torch.empty(2, 8, 8, dtype=dtype)}
        if role in MM_ROLES:  # the grouped-GEMM kernel also gets the permuted-A buffer
            tensors["a_sorted_ptr"] = torch.empty(8, 8, dtype=dtype)
        else:  # the weight-gradient kernel: only B is read by TMA
            tensors["num_splits"] = 1
        return tensors

    fp32 = moe_mod._keep_dtype_configs(configs, args(torch.float32))
    bf16 = moe_mod._keep_dtype_configs(configs, args(torch.bfloat16))
    if interpret:
        assert _tiles(fp32) == _tiles(bf16) == [moe_mod._INTERPRETER_TILE] and _tiles(bf16, "pointer")
        return
    assert _tiles(fp32) == moe_mod._FP32_ROLE_TILES.get(role, moe_mod._FP32_TILES)
    assert _tiles(bf16, "pointer") == moe_mod._ROLE_TILES[role]
    assert _tiles(bf16, "tma") == moe_mod._ROLE_TILES[role]
    assert _tiles(bf16, "tma-permuted") == (moe_mod._ROLE_TILES[role] if role == "gate_up" else [])
    assert all(t[2] == 64 and t[0] * t[1] >= 64 * 64 for t in _tiles(bf16))
    monkeypatch.setattr(moe_mod, "NO_GPU_CAPABILITY", (8, 0))  # an A100: no TMA, no tile that spills there
    ampere = moe_mod._keep_dtype_configs(configs, args(torch.bfloat16))
    assert _tiles(ampere) == [t for t in moe_mod._ROLE_TILES[role] if t not in moe_mod._HOPPER_ONLY.get(role, ())]
    assert not _tiles(ampere, "tma")


def test_moe_tma_needs_aligned_operands(monkeypatch: pytest.MonkeyPatch) -> None:
    """TMA descriptors need 16-byte aligned rows: a 12-column bf16 operand (24 B rows) keeps only pointer
    tiles, except that a gathered A is read by pointers anyway and only B counts."""
    monkeypatch.setattr(moe_mod, "INTERPRET", False)
    configs = moe_mod.role_configs("gate_up")
    bf16 = lambda *shape: torch.empty(shape, dtype=torch.bfloat16)
    tma = lambda a, b, gather: _tiles(moe_mod._keep_dtype_configs(configs, {"a_ptr": a, "b_ptr": b},
                                                                  GATHER_A=gather), "tma")
    assert tma(bf16(8, 16), bf16(2, 16, 32), gather=False)
    assert not tma(bf16(8, 12), bf16(2, 12, 32), gather=False)
    assert tma(bf16(8, 12), bf16(2, 12, 32), gather=True)
    assert not tma(bf16(8, 16), bf16(2, 16, 12), gather=True)
    wgrad = moe_mod.role_configs("w2_grad")  # reads A (here 24 B rows) by pointers: only B's rows count
    kept = moe_mod._keep_dtype_configs(wgrad, {"a_ptr": bf16(8, 12), "b_ptr": bf16(8, 16), "num_splits": 1})
    assert _tiles(kept, "tma") and not _tiles(moe_mod._keep_dtype_configs(
        wgrad, {"a_ptr": bf16(8, 16), "b_ptr": bf16(8, 12), "num_splits": 1}), "tma")


@pytest.fixture(params=["tma", "tma-permuted"])
def tma_variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Run the grouped GEMMs' TMA variant under the interpreter (or, for gate_up, the one that permutes x
    first), with 2 persistent programs so that each walks several tiles; yields a check that they ran."""
    variant = request.param
    tuners = {**moe_mod._TUNED_MM, **moe_mod._TUNED_WGRAD}
    monkeypatch.setattr(moe_mod, "INTERPRETER_VARIANTS", (variant,))
    monkeypatch.setattr(moe_mod, "_num_sms", lambda device: 2)
    for tuner in tuners.values():  # choices made for the pointer variant must not be reused
        tuner.cache.clear()

    def ran() -> bool:
        roles = ROLES if variant == "tma" else ("gate_up",)  # only gate_up gathers, so only it permutes
        return all(tuners[role].cache and all(moe_mod._variant(c) == variant for c in tuners[role].cache.values())
                   for role in roles)

    yield ran
    for tuner in tuners.values():
        tuner.cache.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d_model, d_ff", [(40, 24), (32, 32)], ids=["ragged-K", "even-K"])
def test_moe_tma_variant(tma_variant, dtype: torch.dtype, d_model: int, d_ff: int) -> None:
    _check(_inputs(37, 4, 2, d_model, d_ff, dtype))
    assert tma_variant()


def test_moe_tma_variant_empty_experts_and_one_expert(tma_variant) -> None:
    _check(_inputs(9, 6, 2, 16, 24, torch.float32, ids=torch.tensor([[0, 2]] * 9, dtype=torch.int32)))
    _check(_inputs(45, 4, 1, 16, 24, torch.float32, ids=torch.full((45, 1), 3, dtype=torch.int32)))
    assert tma_variant()


def _sorted_problem(tokens: int, experts: int, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    ids = torch.rand(tokens, experts).argsort(-1)[:, :top_k].to(torch.int32).to(DEVICE)
    order, _, offsets = moe_mod.sort_by_expert(ids.reshape(-1).contiguous(), experts)
    return ids, order, offsets


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_moe_weight_gradient_split_over_tokens_matches_the_per_expert_sum(splits: int) -> None:
    """dW2 and dW13 reduced in `splits` partial sums per expert (more splits than one expert has row
    tiles, too) equal the per-expert sums, and the single pass, to fp32 rounding."""
    tokens, experts, top_k, d, f = 50, 3, 2, 16, 24
    ids, order, offsets = _sorted_problem(tokens, experts, top_k, torch.float32)
    rows = order.numel()
    x = torch.randn(tokens, d, device=DEVICE)
    act, dy, dh = (torch.randn(rows, n, device=DEVICE) for n in (f, d, 2 * f))
    token_of = order.long() // top_k
    for grad, args, a_rows, b in (
        (moe_mod.w2_grad, (act, dy, order, offsets, experts, torch.float32), act, dy),
        (moe_mod.w13_grad, (x, dh, order, offsets, top_k, experts, torch.float32), x[token_of], dh),
    ):
        expected = torch.stack([a_rows[offsets[e]:offsets[e + 1]].double().T @ b[offsets[e]:offsets[e + 1]].double()
                                for e in range(experts)])
        split = grad(*args, num_splits=splits)
        single = grad(*args, num_splits=1)
        torch.testing.assert_close(split.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(split, single, rtol=1e-5, atol=1e-5)
        assert torch.equal(grad(*args, num_splits=splits), split)  # deterministic


@pytest.mark.parametrize("d_model, d_ff", [(32, 32), (64, 48)], ids=["even-K", "even-K-gate-up-only"])
def test_moe_reduction_multiple_of_the_tile(d_model: int, d_ff: int) -> None:
    """K a multiple of BLOCK_K (32 under the interpreter) takes the unmasked main loop."""
    _check(_inputs(23, 4, 2, d_model, d_ff, torch.float32))


def test_moe_64_bit_tile_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The INDEX_64 path (operands of 2^31+ elements) computes the same op, forced here on small shapes."""
    monkeypatch.setattr(moe_mod, "_needs_64bit_offsets", lambda *tensors: True)
    _check(_inputs(19, 4, 2, 40, 24, torch.float32))


def test_moe_saves_no_activation() -> None:
    """Between forward and backward the op keeps h (S, 2 d_ff) but not act = silu(gate) * up (S, d_ff):
    the backward's dSwiGLU epilogue recomputes act from h."""
    tokens, top_k, d_ff = 5, 2, 6
    x, ids, weights, w13, w2 = _inputs(tokens, 3, top_k, 8, d_ff, torch.float32)
    for t in (x, weights, w13, w2):
        t.requires_grad_()
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = moe_mod.moe_experts(x, ids, weights, w13, w2)
    rows = tokens * top_k
    assert (rows, 2 * d_ff) in saved and (rows, d_ff) not in saved, saved
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, weights, w13, w2), dout)
    expected = torch.autograd.grad(moe_mod.moe_experts_reference(x, ids, weights, w13, w2), (x, weights, w13, w2), dout)
    for got, want in zip(grads, expected, strict=True):  # the recomputed activation gives the same gradients
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_backward_recomputes_act_bit_exactly(dtype: torch.dtype) -> None:
    """The act the dSwiGLU GEMM writes for dW2 is bitwise the one the forward fed the down GEMM."""
    x, ids, _, w13, w2 = _inputs(11, 3, 2, 8, 40, dtype)
    order, _, offsets = moe_mod.sort_by_expert(ids.reshape(-1).contiguous(), 3)
    h = torch.empty(order.numel(), 80, dtype=dtype, device=DEVICE)
    act = moe_mod.gate_up(x, w13, order, offsets, 2, h)
    dy = torch.randn(order.numel(), 8, dtype=dtype, device=DEVICE)
    recomputed = torch.full_like(act, float("nan"))
    moe_mod.down_dgrad(dy, w2, order, offsets, h, recomputed)
    assert torch.equal(recomputed, act)


def test_moe_opcheck() -> None:
    x, ids, weights, w13, w2 = _inputs(7, 3, 2, 8, 8, torch.float32)
    for t in (x, weights, w13, w2):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.kernels.moe_experts.default, (x, ids, weights, w13, w2))


@pytest.mark.gpu
@pytest.mark.parametrize(("experts", "d_model", "d_ff", "skewed"),
                         [(4, 512, 1408, False), (8, 768, 896, True), (8, 1280, 2368, False)])
def test_moe_bf16_real_size_gpu(experts: int, d_model: int, d_ff: int, skewed: bool) -> None:
    tokens = 4096
    ids = torch.rand(tokens, experts).argsort(-1)[:, :2].to(torch.int32)
    if skewed:
        heavy = torch.rand(tokens) < 0.9
        ids[heavy, 0] = 0
        ids[heavy, 1] = torch.where(ids[heavy, 1] == 0, 1, ids[heavy, 1])
    _check(_inputs(tokens, experts, 2, d_model, d_ff, torch.bfloat16, ids=ids, device="cuda"))


@pytest.mark.gpu
def test_moe_bf16_ragged_tokens_and_empty_experts_gpu() -> None:
    """T = 4093 (a multiple of no tile), top-2 over 8 experts of which 2, 5 and the last, 7, get no token:
    output and the x, weights, w13 and w2 gradients (zero for the empty experts) under the correctness rule."""
    tokens, used = 4093, torch.tensor([0, 1, 3, 4, 6])
    ids = used[torch.rand(tokens, len(used)).argsort(-1)[:, :2]].to(torch.int32)
    _check(_inputs(tokens, 8, 2, 768, 896, torch.bfloat16, ids=ids, device="cuda"))


@pytest.mark.gpu
def test_moe_layer_compiles_fullgraph_gpu() -> None:
    import kernels
    from tachyon.config import ModelConfig
    from tachyon.moe import MoE

    torch._dynamo.reset()
    config = ModelConfig(d_model=256, d_ff=512, d_shared_ff=256, n_heads=4, n_kv_heads=2)
    layer = MoE(config).cuda()
    x = torch.randn(2, 64, 256, device="cuda", requires_grad=True)
    params = (x, layer.w13, layer.w2)

    def loss_and_grads(fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with kernels.use("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
            out, stats = fn(x)
            loss = out.float().sum() + stats.z_loss + stats.balance_loss
        return out, list(torch.autograd.grad(loss, params))

    eager, eager_grads = loss_and_grads(layer)
    out, grads = loss_and_grads(torch.compile(layer, fullgraph=True))
    torch.testing.assert_close(out, eager)
    for got, want in zip(grads, eager_grads, strict=True):  # same kernels, so only reduction order may differ
        assert (got - want).norm() <= 2e-2 * want.norm()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_moe_autocast_casts_the_gemm_operands(backend: str) -> None:
    """The one autocast rule (kernels/__init__.py): under autocast the op's GEMM operands (x, w13, w2) run in
    the autocast dtype, as F.linear's would; the router weights keep theirs. Same for both backends."""
    import kernels

    x, ids, weights, w13, w2 = _inputs(7, 3, 2, 8, 8, torch.float32)
    with kernels.use(backend), torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = kernels.moe_experts(x, ids, weights, w13, w2)
    expected = moe_mod.moe_experts_reference(x.bfloat16(), ids, weights, w13.bfloat16(), w2.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
