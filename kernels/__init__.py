"""Tachyon's fused ops: each runs a hand-written Triton kernel or its PyTorch reference.

`from kernels import rms_norm, qk_norm_rope, swiglu, router_topk, moe_experts` works without
importing `tachyon`. The backend is chosen here and only here: `auto` (Triton for CUDA tensors,
the reference otherwise), `triton` or `reference`, from $TACHYON_KERNELS or `kernels.use(...)`.

Autocast is applied here too, once, the same for both backends (torch does not autocast custom
ops, and a Triton op that consulted autocast itself would differ from its reference). The rule
follows what autocast does to the aten ops each op replaces: an op built on matmuls casts its
matmul operands to the autocast dtype, as F.linear would (linear_cross_entropy: x and weight);
every other op runs in its inputs' dtypes, as pointwise and normalisation ops do under autocast
(rms_norm, rope, qk_norm_rope, swiglu, router_topk). The ops in kernels/<op>.py never consult
autocast: they take the dtypes they are given.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run through Triton's interpreter; it must be chosen
    # before `triton` is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import cross_entropy as _cross_entropy  # noqa: E402
from . import glu as _swiglu  # noqa: E402
from . import moe as _moe  # noqa: E402
from . import rmsnorm as _rmsnorm  # noqa: E402
from . import rotary as _rope  # noqa: E402
from . import router as _router  # noqa: E402
from ._backend import BACKENDS, get_backend, set_backend, use, use_triton  # noqa: E402
from .cross_entropy import linear_cross_entropy_reference  # noqa: E402
from .glu import swiglu_reference  # noqa: E402
from .modules import RMSNorm, SwiGLU  # noqa: E402
from .moe import moe_experts_reference  # noqa: E402
from .rmsnorm import rms_norm_reference  # noqa: E402
from .rotary import qk_norm_rope_reference, rope_reference  # noqa: E402
from .router import router_topk_reference  # noqa: E402


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A matmul op's operands cast to the autocast dtype when autocast is on for their device, as
    F.linear casts its own; unchanged otherwise."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x * rsqrt(mean(x^2) + eps) * weight` over the last dim, statistics in fp32."""
    if use_triton(x):
        return _rmsnorm.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE on q (B, T, H, D) and k (B, T, Hkv, D) at positions offset..offset+T-1."""
    if use_triton(q):
        return _rope.rope(q, k, cos, sin, offset)
    return rope_reference(q, k, cos, sin, offset)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offset: int = 0,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k over head_dim, then RoPE: what attention uses."""
    if use_triton(q):
        return _rope.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, offset, eps)
    return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, offset, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, elementwise."""
    if use_triton(gate):
        return _swiglu.swiglu(gate, up)
    return swiglu_reference(gate, up)


def router_topk(
    logits: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over experts, top-k, renormalise.

    Returns (weights fp32 (T, k), ids int32 (T, k), counts int32 (E,), logsumexp fp32 (T,)).
    """
    if use_triton(logits):
        return _router.router_topk(logits, k)
    return router_topk_reference(logits, k)


def moe_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Dropless routed-expert SwiGLU FFN: x (T, d), ids/weights (T, k), w13 (E, d, 2f), w2 (E, f, d).

    Under autocast x, w13 and w2 (the GEMM operands) are cast to its dtype; the router weights are not."""
    x, w13, w2 = _autocast(x, w13, w2)
    if use_triton(x):
        return _moe.moe_experts(x, ids, weights, w13, w2)
    return moe_experts_reference(x, ids, weights, w13, w2)


__all__ = [
    "BACKENDS",
    "RMSNorm",
    "SwiGLU",
    "get_backend",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "moe_experts",
    "moe_experts_reference",
    "qk_norm_rope",
    "qk_norm_rope_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "router_topk",
    "router_topk_reference",
    "set_backend",
    "swiglu",
    "swiglu_reference",
    "use",
    "use_triton",
]


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` over targets != ignore_index; x (..., d), weight (V, d).

    Under autocast x and weight are cast to the autocast dtype first, on both backends (the module's
    autocast rule). The Triton path never holds the whole batch's full-vocab logits (see
    kernels/cross_entropy.py).
    """
    x, weight = _autocast(x, weight)
    if use_triton(x):
        return _cross_entropy.linear_cross_entropy(x, weight, targets, ignore_index)
    return linear_cross_entropy_reference(x, weight, targets, ignore_index)
