"""Router micro-benchmark: the Triton router_topk (forward + backward) against the eager reference."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bench.harness import bench, pick_shape, run_benchmark, shape_indices
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


@pytest.mark.parametrize("index", shape_indices(GPU_SHAPES, CPU_SHAPES))
def test_router_topk(benchmark, record, device: str, on_gpu: bool, index: int) -> None:
    tokens, experts, k = pick_shape(GPU_SHAPES, CPU_SHAPES, index, on_gpu)
    logits = torch.randn(tokens, experts, device=device, requires_grad=True)
    fused = _step(router_mod.router_topk, logits, k)
    eager = _step(router_mod.router_topk_reference, logits, k)
    fused_t, eager_t = bench(fused, device), bench(eager, device)
    label = f"T={tokens},E={experts},k={k}"
    record(op="router_topk_fwd_bwd", impl="triton", shape=label, **fused_t.fields())
    record(op="router_topk_fwd_bwd", impl="reference", shape=label, **eager_t.fields(),
           triton_speedup=eager_t.median_s / fused_t.median_s)
    run_benchmark(benchmark, fused, device, on_gpu, gpu_rounds=20)
