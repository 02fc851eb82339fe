"""Linear cross-entropy micro-benchmark: fused chunked Triton vs eager and compiled reference, time and memory.

One training-shaped call: loss = CE(x @ W.T, targets) forward and backward into x and W. The
floor is the three matmuls, 6 N d V FLOPs (2 N d V for the logits, 4 N d V for dx and dW): at
64k tokens x d 512 x V 50258 that is 10 TFLOP, about 10 ms at an H100's ~1000 TFLOP/s dense bf16
peak. The reference also moves its full-vocab logits through memory several times (bf16, fp32
upcast, log-softmax, gradient: about 40 GB at that size); the fused op keeps one chunk of them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bench.harness import bench, pick_shape, run_benchmark, shape_indices, sync
from kernels import cross_entropy as ce_mod

GPU_SHAPES = [(65536, 512, 50258, torch.bfloat16), (16384, 768, 50258, torch.bfloat16)]  # (tokens, d, V, dtype)
CPU_SHAPES = [(64, 32, 1000, torch.float32)]
IMPLS = ("triton", "reference", "compiled")  # compiled: torch.compile(reference), GPU only


def _step(fn: Callable, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> Callable[[], None]:
    """One loss forward + backward into x and W, as the LM head runs in training."""

    def run() -> None:
        fn(x, w, t).backward()
        x.grad = None
        w.grad = None

    return run


def _peak_extra_gb(run: Callable[[], None], device: str) -> float | None:
    """Peak CUDA memory one call allocates beyond what was live before it (None on the CPU)."""
    if device != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    sync(device)
    return (torch.cuda.max_memory_allocated() - before) / 1e9


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("index", shape_indices(GPU_SHAPES, CPU_SHAPES))
def test_linear_cross_entropy(benchmark, record, device: str, on_gpu: bool, index: int, impl: str) -> None:
    tokens, dim, vocab, dtype = pick_shape(GPU_SHAPES, CPU_SHAPES, index, on_gpu)
    if impl == "compiled" and not on_gpu:
        pytest.skip("torch.compile takes ~20 s on the CPU: GPU only")
    x = (torch.randn(tokens, dim, device=device) * 2).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, dim, device=device) / dim**0.5).to(dtype).requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,), device=device)
    t[torch.rand(tokens, device=device) < 0.05] = -100  # a few padded positions
    fn = {"triton": ce_mod.linear_cross_entropy, "reference": ce_mod.linear_cross_entropy_reference,
          "compiled": torch.compile(ce_mod.linear_cross_entropy_reference)}[impl]
    run = _step(fn, x, w, t)
    timing = bench(run, device)
    extra_gb = _peak_extra_gb(run, device)
    record(op="linear_cross_entropy", impl=impl, **{"pass": "fwd+bwd"}, shape=f"N={tokens},d={dim},V={vocab}",
           dtype=str(dtype).removeprefix("torch."), **timing.fields(),
           tflops=6 * tokens * dim * vocab / timing.median_s / 1e12, peak_extra_gb=extra_gb)
    run_benchmark(benchmark, run, device, on_gpu, gpu_rounds=10)
