"""Router micro-benchmark: the Triton router_topk (forward + backward) against the eager reference."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bench.harness import sync, time_fn
from kernels import router as router_mod

GPU_SHAPES = [(16384, 8, 2), (65536, 8, 2), (65536, 4, 2), (65536, 128, 8)]  # (tokens, experts, top-k)
CPU_SHAPES = [(64, 8, 2)]


def _step(fn: Callable, logits: torch.Tensor, k: int) -> Callable[[], None]:
    """One router forward + backward through the weights and the z-loss, as training runs it."""

    def run() -> None:
        weights, _, _, lse = fn(logits, k)
        (weights.sum() + lse.pow(2).mean()).backward()
        logits.grad = None

    return run


@pytest.fixture(params=[0, 1, 2, 3])
def shape(request: pytest.FixtureRequest, on_gpu: bool) -> tuple[int, int, int]:
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    if request.param >= len(shapes):
        pytest.skip("GPU-only shape")
    return shapes[request.param]


def test_router_topk(benchmark, record, device: str, on_gpu: bool, shape: tuple[int, int, int]) -> None:
    tokens, experts, k = shape
    logits = torch.randn(tokens, experts, device=device, requires_grad=True)
    fused = _step(router_mod.router_topk, logits, k)
    eager = _step(router_mod.router_topk_reference, logits, k)
    iters = 50 if on_gpu else 1
    fused_s = time_fn(fused, device, warmup=3 if on_gpu else 0, iters=iters)
    eager_s = time_fn(eager, device, warmup=3 if on_gpu else 0, iters=iters)
    label = f"T={tokens},E={experts},k={k}"
    record(op="router_topk_fwd_bwd", impl="triton", shape=label, ms=fused_s * 1e3)
    record(op="router_topk_fwd_bwd", impl="reference", shape=label, ms=eager_s * 1e3,
           triton_speedup=eager_s / fused_s)

    def timed() -> None:
        fused()
        sync(device)

    benchmark.pedantic(timed, rounds=20 if on_gpu else 1, iterations=1)
