"""kernels.rope and kernels.qk_norm_rope against their references under the correctness rule of docs/design.md.

q and k come in as the model makes them: strided views of one fused qkv projection. Also holds the
one CPU torch.compile test of the three elementwise ops; the compiled model blocks are in
tests/test_model_compile.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.kernels.correctness import DEVICE, check_against_truth

rope = importlib.import_module("kernels.rotary")
rmsnorm = importlib.import_module("kernels.rmsnorm")
swiglu = importlib.import_module("kernels.glu")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6
MAX_POSITIONS = 64


def _tables(head_dim: int, device: str = DEVICE, positions: int = MAX_POSITIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables (positions, head_dim/2), built as tachyon.layers.RotaryEmbedding does."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _qk(batch: int, tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
        device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, H, D) and k (B, T, Hkv, D) as strided views of one (B, T, H + 2 Hkv, D) projection."""
    qkv = 2 * torch.randn(batch, tokens, heads + 2 * kv_heads, head_dim, device=device, dtype=dtype)
    q, k, _ = qkv.split((heads, kv_heads, kv_heads), dim=2)
    return q, k


def _weight(head_dim: int, dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    return (1 + 0.5 * torch.randn(head_dim, device=device)).to(dtype)


def _check_rope(q: torch.Tensor, k: torch.Tensor, offset: int) -> None:
    cos, sin = _tables(q.shape[-1], q.device.type, max(MAX_POSITIONS, offset + q.shape[1]))
    check_against_truth(
        lambda q, k, c, s: rope.rope(q, k, c, s, offset),
        lambda q, k, c, s: rope.rope_reference(q, k, c, s, offset),
        [q, k, cos, sin], grad_mask=[True, True, False, False], dtype=q.dtype,
    )


def _check_qk_norm_rope(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, offset: int) -> None:
    cos, sin = _tables(q.shape[-1], q.device.type, max(MAX_POSITIONS, offset + q.shape[1]))
    check_against_truth(
        lambda q, k, wq, wk, c, s: rope.qk_norm_rope(q, k, wq, wk, c, s, offset, EPS),
        lambda q, k, wq, wk, c, s: rope.qk_norm_rope_reference(q, k, wq, wk, c, s, offset, EPS),
        [q, k, wq, wk, cos, sin], grad_mask=[True, True, True, True, False, False], dtype=q.dtype,
    )


# (B, T, H, Hkv, D, offset): training shapes, odd head_dims, decoding one token after a cache.
CASES = [(2, 5, 4, 2, 64, 0), (1, 3, 2, 1, 128, 7), (2, 3, 3, 1, 48, 0), (1, 4, 4, 4, 80, 11), (3, 1, 2, 2, 96, 40)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, T, H, Hkv, D, offset", CASES)
def test_rope_matches_reference(dtype: torch.dtype, B: int, T: int, H: int, Hkv: int, D: int, offset: int) -> None:
    _check_rope(*_qk(B, T, H, Hkv, D, dtype), offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, T, H, Hkv, D, offset", CASES)
def test_qk_norm_rope_matches_reference(dtype: torch.dtype, B: int, T: int, H: int, Hkv: int, D: int,
                                        offset: int) -> None:
    q, k = _qk(B, T, H, Hkv, D, dtype)
    _check_qk_norm_rope(q, k, _weight(D, dtype), _weight(D, dtype), offset)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_qk_norm_rope_fp32_weights(dtype: torch.dtype) -> None:
    """The model under autocast: low-precision q/k, fp32 norm weights whose gradients stay fp32."""
    q, k = _qk(2, 3, 4, 2, 64, dtype)
    _check_qk_norm_rope(q, k, _weight(64, torch.float32), _weight(64, torch.float32), 5)


def test_contiguous_separate_q_and_k() -> None:
    q = torch.randn(2, 5, 4, 32, device=DEVICE)
    k = torch.randn(2, 5, 2, 32, device=DEVICE)
    _check_rope(q, k, 2)
    _check_qk_norm_rope(q, k, _weight(32, torch.float32), _weight(32, torch.float32), 2)


def test_outputs_are_contiguous_and_inputs_not_copied() -> None:
    q, k = _qk(2, 3, 4, 2, 64, torch.float32)
    cos, sin = _tables(64)
    qo, ko = rope.qk_norm_rope(q, k, _weight(64, torch.float32), _weight(64, torch.float32), cos, sin, 0, EPS)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.is_contiguous() and ko.is_contiguous()
    assert rope._unit_last(q) is q  # strided views go to the kernel as they are


def test_positions_past_the_table_are_an_error() -> None:
    q, k = _qk(1, 4, 2, 1, 64, torch.float32)
    cos, sin = _tables(64)
    with pytest.raises(ValueError, match="exceed"):
        rope.rope(q, k, cos, sin, MAX_POSITIONS - 3)


@pytest.mark.parametrize("shape", [(63,), (65,), (1, 64)], ids=["short", "long", "2-d"])
def test_qk_norm_rope_rejects_norm_weights_not_head_dim(shape: tuple[int, ...]) -> None:
    """A norm weight of any shape but (head_dim,) is a ValueError, from the op called directly too;
    a short one was read past its end."""
    q, k = _qk(1, 3, 2, 1, 64, torch.float32)
    cos, sin = _tables(64)
    good, bad = _weight(64, torch.float32), torch.ones(shape, device=DEVICE)
    for wq, wk in ((bad, good), (good, bad)):
        with pytest.raises(ValueError, match="head_dim is 64"):
            rope.qk_norm_rope(q, k, wq, wk, cos, sin, 0, EPS)
        with pytest.raises(ValueError, match="head_dim is 64"):
            torch.ops.kernels.qk_norm_rope(q, k, wq, wk, cos, sin, 0, EPS)
        with pytest.raises(ValueError, match="head_dim is 64"):
            torch.ops.kernels.qk_norm_rope_bwd(q, k, q, k, wq, wk, cos, sin, 0, EPS)


def test_rope_ops_check_their_own_inputs() -> None:
    """The backward op, called directly, checks what the forward checks."""
    q, k = _qk(1, 4, 2, 1, 64, torch.float32)
    cos, sin = _tables(64)
    with pytest.raises(ValueError, match="exceed"):
        torch.ops.kernels.rope_bwd(q, k, cos, sin, MAX_POSITIONS - 3)
    with pytest.raises(ValueError, match="tables"):
        torch.ops.kernels.rope_bwd(q, k, cos, sin[:, :8], 0)
    with pytest.raises(ValueError, match="must match"):
        torch.ops.kernels.qk_norm_rope_bwd(q[:, :2], k, q, k, _weight(64, torch.float32), _weight(64, torch.float32),
                                           cos, sin, 0, EPS)


def test_opcheck() -> None:
    q, k = _qk(2, 3, 4, 2, 48, torch.float32)
    wq, wk = _weight(48, torch.float32), _weight(48, torch.float32)
    cos, sin = _tables(48)
    dq, dk = torch.randn(2, 3, 4, 48, device=DEVICE), torch.randn(2, 3, 2, 48, device=DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, wq, wk)]
    torch.library.opcheck(rope.rope, (*leaves[:2], cos, sin, 3))
    torch.library.opcheck(rope.rope_bwd, (dq, dk, cos, sin, 3))
    torch.library.opcheck(rope.qk_norm_rope, (*leaves, cos, sin, 3, EPS))
    torch.library.opcheck(rope.qk_norm_rope_bwd, (dq, dk, q, k, wq, wk, cos, sin, 3, EPS))


def _norm_attend_mlp(x, w, q, k, wq, wk, cos, sin, gate, up):
    """A slice of a block: every op of this issue in one graph, forward and backward."""
    qo, ko = rope.qk_norm_rope(q, k, wq, wk, cos, sin, 2, EPS)
    return rmsnorm.rms_norm(x, w, EPS).sum() + (qo * ko.repeat(1, 1, 2, 1)).sum() + swiglu.swiglu(gate, up).sum()


def test_compile_fullgraph_cpu() -> None:
    """The one CPU compile: the custom ops trace through their fake and autograd registrations with no
    graph break and give eager's grads. aot_eager skips Inductor's C++ build (a minute on two cores);
    the Inductor path over a whole block is test_gpu_compiled_block_fullgraph."""
    q, k = _qk(1, 3, 2, 1, 16, torch.float32)
    h = torch.randn(3, 2 * 24, device=DEVICE)
    args = [torch.randn(3, 24, device=DEVICE), _weight(24, torch.float32), q, k, _weight(16, torch.float32),
            _weight(16, torch.float32), *_tables(16), *h.chunk(2, dim=-1)]
    leaves = [a.detach().clone().requires_grad_(i not in (6, 7)) for i, a in enumerate(args)]
    compiled = torch.compile(_norm_attend_mlp, fullgraph=True, backend="aot_eager")
    compiled(*leaves).backward()
    got = [leaves[i].grad for i in (0, 1, 2, 3, 4, 5, 8, 9)]
    eager = [a.detach().clone().requires_grad_(i not in (6, 7)) for i, a in enumerate(args)]
    _norm_attend_mlp(*eager).backward()
    for g, e in zip(got, [eager[i].grad for i in (0, 1, 2, 3, 4, 5, 8, 9)], strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.gpu
@pytest.mark.parametrize("H, Hkv, D", [(16, 4, 128), (16, 4, 64), (12, 4, 80), (32, 8, 96)])
@pytest.mark.parametrize("offset", [0, 1000])
def test_gpu_bf16_real_sizes(H: int, Hkv: int, D: int, offset: int) -> None:
    q, k = _qk(4, 1024, H, Hkv, D, torch.bfloat16, "cuda")
    _check_rope(q, k, offset)
    _check_qk_norm_rope(q, k, _weight(D, torch.float32, "cuda"), _weight(D, torch.float32, "cuda"), offset)
    _check_qk_norm_rope(q, k, _weight(D, torch.bfloat16, "cuda"), _weight(D, torch.bfloat16, "cuda"), offset)
