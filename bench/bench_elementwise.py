"""Micro-benchmarks of the memory-bound ops: RMSNorm, RoPE, QK-norm + RoPE and SwiGLU.

Each op runs forward and forward + backward as Triton, the eager reference, torch.compile of the
reference and Liger-Kernel's equivalent (when `liger_kernel` imports; Liger has no fused QK-norm +
RoPE, so its case chains LigerRMSNorm and liger_rotary_pos_emb). Every record carries the achieved
bandwidth, counted as the bytes an ideal fused kernel reads and writes, and its ratio to the
device's copy bandwidth measured at that same byte count and timed the same way. On the CPU the
shapes are tiny smoke sizes and the compiled and Liger cases are skipped, so the harness keeps
running in the normal suite.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

from bench.harness import bench, copy_bandwidth_gbps, pick_shape, run_benchmark, shape_indices

rmsnorm = importlib.import_module("kernels.rmsnorm")
rope = importlib.import_module("kernels.rotary")
swiglu = importlib.import_module("kernels.glu")

EPS = 1e-6
IMPLS = ["triton", "reference", "compiled", "liger"]
PASSES = ["fwd", "fwd+bwd"]


@dataclass
class Case:
    """One op at one shape: its inputs (the differentiable ones first), output gradients, ideal bytes."""

    inputs: list[torch.Tensor]  # what every implementation is called with
    n_diff: int  # inputs[:n_diff] get gradients in the fwd+bwd pass
    fwd_bytes: int  # bytes an ideal fused forward reads + writes
    bwd_bytes: int  # bytes an ideal fused backward reads + writes
    label: str


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- the ops' cases -------------------------------------------------------------------------------


def _rms_norm_case(shape: tuple[int, int], dtype: torch.dtype, device: str) -> Case:
    rows, width = shape
    x = torch.randn(rows, width, device=device, dtype=dtype)
    w = torch.ones(width, device=device)  # fp32, as the model's parameter under autocast
    # fwd: read x, w; write y.  bwd: read dy, x, w; write dx, dw.
    return Case([x, w], 2, 2 * _nbytes(x) + _nbytes(w), 3 * _nbytes(x) + 2 * _nbytes(w), f"{rows}x{width}")


def _swiglu_case(shape: tuple[int, int], dtype: torch.dtype, device: str) -> Case:
    rows, width = shape
    gate, up = torch.randn(rows, 2 * width, device=device, dtype=dtype).chunk(2, dim=-1)  # one GEMM's halves
    # fwd: read gate, up; write y.  bwd: read dy, gate, up; write d gate, d up.
    return Case([gate, up], 2, 3 * _nbytes(gate), 5 * _nbytes(gate), f"{rows}x{width}")


def _qk(shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: str):
    B, T, H, Hkv, D = shape
    qkv = torch.randn(B, T, H + 2 * Hkv, D, device=device, dtype=dtype)
    q, k, _ = qkv.split((H, Hkv, Hkv), dim=2)  # strided views, as attention makes them
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32),
                         1.0 / 10000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    return q, k, angles.cos(), angles.sin(), f"B={B},T={T},H={H},Hkv={Hkv},D={D}"


def _rope_case(shape, dtype: torch.dtype, device: str) -> Case:
    q, k, cos, sin, label = _qk(shape, dtype, device)
    qk_bytes, tables = _nbytes(q, k), _nbytes(cos, sin)
    # fwd: read q, k, tables; write q', k'.  bwd: the same with gradients.
    return Case([q, k, cos, sin], 2, 2 * qk_bytes + tables, 2 * qk_bytes + tables, label)


def _qk_norm_rope_case(shape, dtype: torch.dtype, device: str) -> Case:
    q, k, cos, sin, label = _qk(shape, dtype, device)
    D = q.shape[-1]
    wq, wk = torch.ones(D, device=device), torch.ones(D, device=device)
    qk_bytes, small = _nbytes(q, k), _nbytes(cos, sin, wq, wk)
    # fwd: read q, k; write q', k'.  bwd: read dq', dk', q, k; write dq, dk (and the tiny dw).
    return Case([q, k, wq, wk, cos, sin], 4, 2 * qk_bytes + small, 3 * qk_bytes + 2 * small, label)


# --- implementations ------------------------------------------------------------------------------


def _liger(op: str) -> Callable:
    """Liger-Kernel's equivalent of `op`, taking the same arguments as our reference."""
    if op == "rms_norm":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)  # offset, casting, in_place
    if op == "swiglu":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def rotate(q, k, cos, sin):
        # Liger takes (B, H, T, D) and HF-style (1, T, D) tables holding both halves.
        c, s = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]
        qo, ko = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), c, s)
        return qo.transpose(1, 2), ko.transpose(1, 2)

    if op == "rope":
        return rotate

    def norm(x, w):
        # Liger views its input as rows, which strided q/k views of a fused qkv do not allow: reshape copies.
        return LigerRMSNormFunction.apply(x.reshape(-1, x.shape[-1]), w, EPS, 0.0, "llama", False).view(x.shape)

    def norm_rotate(q, k, wq, wk, cos, sin):
        return rotate(norm(q, wq), norm(k, wk), cos, sin)

    return norm_rotate


OPS: dict[str, tuple[Callable, Callable, Callable]] = {
    # op: (case builder, Triton op, reference), with the fixed scalars bound.
    "rms_norm": (_rms_norm_case, lambda x, w: rmsnorm.rms_norm(x, w, EPS),
                 lambda x, w: rmsnorm.rms_norm_reference(x, w, EPS)),
    "swiglu": (_swiglu_case, swiglu.swiglu, swiglu.swiglu_reference),
    "rope": (_rope_case, lambda q, k, c, s: rope.rope(q, k, c, s, 0),
             lambda q, k, c, s: rope.rope_reference(q, k, c, s, 0)),
    "qk_norm_rope": (_qk_norm_rope_case, lambda q, k, wq, wk, c, s: rope.qk_norm_rope(q, k, wq, wk, c, s, 0, EPS),
                     lambda q, k, wq, wk, c, s: rope.qk_norm_rope_reference(q, k, wq, wk, c, s, 0, EPS)),
}

GPU_SHAPES = {
    "rms_norm": [(16384, 1024), (16384, 2048), (16384, 4096)],
    "swiglu": [(16384, 1024), (16384, 2048), (16384, 4096)],
    "rope": [(4, 4096, 16, 4, 128)],
    "qk_norm_rope": [(4, 4096, 16, 4, 128)],
}
CPU_SHAPES = {
    "rms_norm": [(8, 96)], "swiglu": [(8, 96)], "rope": [(1, 4, 2, 1, 16)], "qk_norm_rope": [(1, 4, 2, 1, 16)],
}
_COMPILED: dict[str, Callable] = {}


def _implementation(op: str, impl: str, on_gpu: bool) -> Callable:
    _, fused, reference = OPS[op]
    if impl == "triton":
        return fused
    if impl == "reference":
        return reference
    if not on_gpu:
        pytest.skip(f"{impl} runs on the GPU only (the CPU smoke run stays fast)")
    if impl == "compiled":
        return _COMPILED.setdefault(op, torch.compile(reference))
    pytest.importorskip("liger_kernel")
    return _liger(op)


def _runner(fn: Callable, case: Case, pass_: str) -> Callable[[], None]:
    """A closure running one forward, or one forward + backward with fixed output gradients."""
    if pass_ == "fwd":
        def forward() -> None:
            with torch.no_grad():
                fn(*case.inputs)
        return forward

    leaves = [t.detach().requires_grad_() for t in case.inputs[: case.n_diff]]
    inputs = leaves + case.inputs[case.n_diff:]
    outs = fn(*inputs)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    grads = [torch.randn_like(o) for o in outs]

    def forward_backward() -> None:
        result = fn(*inputs)
        result = (result,) if isinstance(result, torch.Tensor) else tuple(result)
        torch.autograd.grad(result, leaves, grads)

    return forward_backward


def _all_shapes() -> Sequence[tuple[str, int]]:
    """(op, index) over each op's longer shape list, so parametrisation does not depend on the device."""
    return [(op, i) for op in OPS for i in shape_indices(GPU_SHAPES[op], CPU_SHAPES[op])]


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op, index", _all_shapes(), ids=lambda v: str(v))
def test_elementwise(benchmark, record, device: str, on_gpu: bool, op: str, index: int, impl: str,
                     pass_: str) -> None:
    shape = pick_shape(GPU_SHAPES[op], CPU_SHAPES[op], index, on_gpu)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    case = OPS[op][0](shape, dtype, device)
    run = _runner(_implementation(op, impl, on_gpu), case, pass_)
    timing = bench(run, device)
    nbytes = case.fwd_bytes + (case.bwd_bytes if pass_ == "fwd+bwd" else 0)
    gbps = nbytes / timing.median_s / 1e9
    copy_gbps = copy_bandwidth_gbps(device, nbytes)
    record(op=op, impl=impl, **{"pass": pass_}, shape=case.label, dtype=str(dtype).removeprefix("torch."),
           **timing.fields(), gbps=gbps, copy_gbps=copy_gbps, copy_ratio=gbps / copy_gbps)
    run_benchmark(benchmark, run, device, on_gpu, gpu_rounds=20)
