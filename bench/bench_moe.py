"""MoE micro-benchmarks: the grouped GEMM alone (TFLOP/s vs dense cuBLAS and torch._grouped_mm) and the
whole routed-expert layer forward + backward (Triton vs the reference loop vs a sort + index_add baseline)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from bench.harness import sync, time_fn
from kernels import moe as moe_mod

# name -> (experts, d_model, d_ff): the tiny, small and large presets' routed experts.
PRESETS = {"tiny": (4, 512, 1408), "small": (8, 768, 896), "large": (8, 1280, 2368)}
GPU_TOKENS = [16384, 65536]
TOP_K = 2
SMOKE = ("smoke", 4, 32, 48, 64)  # CPU: (name, experts, d_model, d_ff, tokens) through the interpreter


def _cases(on_gpu: bool) -> list[tuple[str, int, int, int, int]]:
    if not on_gpu:
        return [SMOKE]
    return [(name, *dims, tokens) for name, dims in PRESETS.items() for tokens in GPU_TOKENS]


@pytest.fixture(params=range(len(PRESETS) * len(GPU_TOKENS)))
def case(request: pytest.FixtureRequest, on_gpu: bool) -> tuple[str, int, int, int, int]:
    cases = _cases(on_gpu)
    if request.param >= len(cases):
        pytest.skip("GPU-only shape")
    return cases[request.param]


def routing(tokens: int, experts: int, skewed: bool, device: str) -> torch.Tensor:
    """(T, 2) distinct expert ids per token: uniform, or 90% of tokens' first choice on expert 0."""
    ids = torch.rand(tokens, experts, device=device).argsort(-1)[:, :TOP_K]
    if skewed:
        heavy = torch.rand(tokens, device=device) < 0.9
        second = torch.where(ids[:, 1] == 0, ids[:, 0], ids[:, 1])  # keep the pair distinct
        ids = torch.where(heavy[:, None], torch.stack([torch.zeros_like(second), second], 1), ids)
    return ids.to(torch.int32)


def sort_index_add_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                       w2: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch baseline: one stable sort by expert, per-expert matmuls on contiguous slices,
    SwiGLU, then a weighted index_add back to the tokens (one host sync for the split sizes)."""
    num_tokens, top_k = ids.shape
    d_ff = w2.shape[1]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    sizes = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    h = torch.cat([chunk @ w13[e] for e, chunk in enumerate(x[token].split(sizes))])
    act = F.silu(h[:, :d_ff]) * h[:, d_ff:]
    y = torch.cat([chunk @ w2[e] for e, chunk in enumerate(act.split(sizes))])
    scaled = y.float() * weights.reshape(-1)[order, None].float()
    return torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device).index_add(0, token, scaled).to(
        x.dtype)


def _timer(on_gpu: bool, device: str) -> Callable[[Callable[[], object]], float]:
    return lambda fn: time_fn(fn, device, warmup=3 if on_gpu else 0, iters=20 if on_gpu else 1)


def _pedantic(benchmark, fn: Callable[[], object], device: str, on_gpu: bool) -> None:
    def timed() -> None:
        fn()
        sync(device)

    benchmark.pedantic(timed, rounds=10 if on_gpu else 1, iterations=1)


@pytest.mark.parametrize("which", ["up", "down"])
@pytest.mark.parametrize("skewed", [False, True], ids=["balanced", "skewed"])
def test_grouped_gemm(benchmark, record, device: str, on_gpu: bool, case, which: str, skewed: bool) -> None:
    """One grouped GEMM over expert-sorted rows (up: d -> 2f, down: f -> d) in TFLOP/s."""
    if not on_gpu and (skewed or which == "down"):
        pytest.skip("one smoke shape on the CPU")
    name, experts, d_model, d_ff, tokens = case
    dtype = torch.bfloat16 if on_gpu else torch.float32
    k_dim, n_dim = (d_model, 2 * d_ff) if which == "up" else (d_ff, d_model)
    ids = routing(tokens, experts, skewed, device)
    order, _, offsets = moe_mod.sort_by_expert(ids.reshape(-1).contiguous(), experts)
    rows = order.numel()
    a = torch.randn(rows, k_dim, device=device, dtype=dtype)
    b = torch.randn(experts, k_dim, n_dim, device=device, dtype=dtype) / k_dim**0.5
    dense_b = b[0].contiguous()
    flops = 2.0 * rows * k_dim * n_dim
    timer = _timer(on_gpu, device)
    triton_fn = lambda: moe_mod.down(a, b, order, offsets)  # the plain (no-epilogue) grouped GEMM
    label = f"{name},T={tokens},E={experts},K={k_dim},N={n_dim},{'skewed' if skewed else 'balanced'}"
    results = {"triton": timer(triton_fn), "dense_matmul": timer(lambda: a @ dense_b)}
    if hasattr(torch, "_grouped_mm") and on_gpu:
        ends = offsets[1:].contiguous()
        try:
            results["torch_grouped_mm"] = timer(lambda: torch._grouped_mm(a, b, offs=ends))
        except (RuntimeError, NotImplementedError) as err:  # older GPUs or dtypes it does not take
            record(op="grouped_gemm", impl="torch_grouped_mm", shape=label, skipped=str(err)[:120])
    for impl, seconds in results.items():
        record(op=f"grouped_gemm_{which}", impl=impl, shape=label, ms=seconds * 1e3, tflops=flops / seconds / 1e12,
               triton_vs_this=seconds / results["triton"])
    _pedantic(benchmark, triton_fn, device, on_gpu)


@pytest.mark.parametrize("skewed", [False, True], ids=["balanced", "skewed"])
def test_moe_layer_fwd_bwd(benchmark, record, device: str, on_gpu: bool, case, skewed: bool) -> None:
    """The routed-expert layer forward + backward (dx, d(weights), dw13, dw2) under each implementation."""
    if not on_gpu and skewed:
        pytest.skip("one smoke shape on the CPU")
    name, experts, d_model, d_ff, tokens = case
    dtype = torch.bfloat16 if on_gpu else torch.float32
    ids = routing(tokens, experts, skewed, device)
    weights = torch.softmax(torch.randn(tokens, TOP_K, device=device), -1).requires_grad_()
    x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
    w13 = (torch.randn(experts, d_model, 2 * d_ff, device=device) / d_model**0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(experts, d_ff, d_model, device=device) / d_ff**0.5).to(dtype).requires_grad_()
    grad = torch.randn(tokens, d_model, device=device, dtype=dtype)
    leaves = (x, weights, w13, w2)

    def step(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            fn(x, ids, weights, w13, w2).backward(grad)
            for t in leaves:
                t.grad = None

        return run

    impls = {"triton": moe_mod.moe_experts, "reference": moe_mod.moe_experts_reference,  # the per-expert loop
             "sort_index_add": sort_index_add_moe}
    timer = _timer(on_gpu, device)
    results = {impl: timer(step(fn)) for impl, fn in impls.items()}
    flops = 3 * 6.0 * tokens * TOP_K * d_model * d_ff  # fwd 6*S*d*f, bwd twice that
    label = f"{name},T={tokens},E={experts},d={d_model},f={d_ff},{'skewed' if skewed else 'balanced'}"
    for impl, seconds in results.items():
        record(op="moe_layer_fwd_bwd", impl=impl, shape=label, ms=seconds * 1e3, tflops=flops / seconds / 1e12,
               triton_speedup=seconds / results["triton"])
    _pedantic(benchmark, step(moe_mod.moe_experts), device, on_gpu)
