"""Fused linear cross-entropy against its reference under the correctness rule (loss, dx, dweight)."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import cross_entropy as ce_mod
from tests.kernels.correctness import DEVICE, check_against_truth

IGNORE = -100


def _fused(chunk_tokens: int = 0, ignore_index: int = IGNORE):
    return lambda x, w, t: ce_mod.linear_cross_entropy(x, w, t, ignore_index, chunk_tokens)


def _reference(ignore_index: int = IGNORE):
    return lambda x, w, t: ce_mod.linear_cross_entropy_reference(x, w, t, ignore_index)


def _inputs(tokens: int, dim: int, vocab: int, dtype: torch.dtype, ignored: float = 0.2):
    """x scaled so the logits have a spread of a few units (a peaked softmax, like a trained head)."""
    x = (torch.randn(tokens, dim, device=DEVICE) * 2).to(dtype)
    w = (torch.randn(vocab, dim, device=DEVICE) / dim**0.5).to(dtype)
    t = torch.randint(0, vocab, (tokens,), device=DEVICE)
    t[torch.rand(tokens, device=DEVICE) < ignored] = IGNORE
    return x, w, t


@pytest.mark.parametrize("vocab", [1000, 8192, 50258])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(vocab: int, dtype: torch.dtype) -> None:
    """37 tokens (no block multiple); vocab 8192 is a multiple of the 4096 sweep, 1000 and 50258 are not."""
    x, w, t = _inputs(37, 64, vocab, dtype)
    check_against_truth(_fused(), _reference(), [x, w, t], grad_mask=[True, True, False])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunks_add_up(dtype: torch.dtype) -> None:
    """Several chunks, the last one partial: dweight sums over chunks, dx is written per chunk.

    bf16 runs on the CPU too: the kernel has no tl.dot, the interpreter's weak spot."""
    x, w, t = _inputs(37, 64, 1000, dtype)
    check_against_truth(_fused(chunk_tokens=8), _reference(), [x, w, t], grad_mask=[True, True, False])


def test_batched_leading_dims_and_one_token() -> None:
    x, w, t = _inputs(2 * 9, 32, 515, torch.float32)
    check_against_truth(_fused(), _reference(), [x.view(2, 9, 32), w, t.view(2, 9)], grad_mask=[True, True, False])
    x, w, t = _inputs(1, 32, 515, torch.float32, ignored=0.0)
    check_against_truth(_fused(), _reference(), [x, w, t], grad_mask=[True, True, False])


def test_all_ignored_gives_zero_loss_and_grads() -> None:
    x, w, _ = _inputs(11, 32, 300, torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    t = torch.full((11,), IGNORE, device=DEVICE)
    loss = ce_mod.linear_cross_entropy(x, w, t)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(w.grad) == 0
    check_against_truth(_fused(), _reference(), [x.detach(), w.detach(), t], grad_mask=[True, True, False])


def test_other_ignore_index_and_grad_scale() -> None:
    """A pad id as ignore_index; a loss scaled by 0.25 (grad accumulation) scales both gradients."""
    x, w, t = _inputs(23, 32, 300, torch.float32, ignored=0.0)
    t[::3] = 1
    check_against_truth(_fused(ignore_index=1), _reference(ignore_index=1), [x, w, t], grad_mask=[True, True, False])
    check_against_truth(lambda a, b, c: 0.25 * _fused()(a, b, c), lambda a, b, c: 0.25 * _reference()(a, b, c),
                        [x, w, t], grad_mask=[True, True, False])


def test_autocast_casts_like_f_linear() -> None:
    """Under CPU bf16 autocast the fused op gets bf16 x and weight, and fp32 weight gets an fp32 grad."""
    x, w, t = _inputs(16, 32, 300, torch.float32)
    w.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ce_mod.linear_cross_entropy(x, w, t)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    expected = ce_mod.linear_cross_entropy_reference(x.bfloat16(), w.detach().bfloat16(), t)
    torch.testing.assert_close(loss, expected, atol=1e-2, rtol=1e-2)


def test_dispatcher_follows_backend() -> None:
    x, w, t = _inputs(8, 16, 100, torch.float32)
    with kernels.use("triton"):
        fused = kernels.linear_cross_entropy(x, w, t)
    with kernels.use("reference"):
        reference = kernels.linear_cross_entropy(x, w, t)
    torch.testing.assert_close(fused, reference)


def test_rejects_mismatched_inputs() -> None:
    x, w, t = _inputs(8, 16, 100, torch.float32)
    with pytest.raises(TypeError):
        ce_mod.linear_cross_entropy(x.half(), w, t)
    with pytest.raises(ValueError):
        ce_mod.linear_cross_entropy(x, w, t[:4])


def test_no_grad_skips_the_gradients_and_gives_the_same_loss() -> None:
    """Under torch.no_grad, or with inputs that need no gradient, the forward skips the gradient sweep
    and matmuls (dx and dweight come back empty) and the loss is bit-for-bit the training one."""
    x, w, t = _inputs(37, 64, 1000, torch.float32)
    loss = ce_mod.linear_cross_entropy(x.requires_grad_(True), w, t, chunk_tokens=8)
    with torch.no_grad():
        assert torch.equal(ce_mod.linear_cross_entropy(x, w, t, chunk_tokens=8), loss.detach())
    assert torch.equal(ce_mod.linear_cross_entropy(x.detach(), w, t, chunk_tokens=8), loss.detach())
    _, dx, dweight = torch.ops.kernels.linear_cross_entropy(x.detach(), w, t, IGNORE, 8, False)
    assert dx.numel() == 0 and dweight.numel() == 0
    check_against_truth(_fused(chunk_tokens=8), _reference(), [x.detach(), w, t], grad_mask=[False, False, False])


@pytest.mark.parametrize("needs_grad", [True, False])
def test_opcheck(needs_grad: bool) -> None:
    """The fake's outputs match the real op's exactly, also for a transposed (column-major) x."""
    x, w, t = _inputs(9, 16, 100, torch.float32)
    x = x.t().contiguous().t()  # (9, 16) with strides (1, 9): empty_like(x) would copy them
    torch.library.opcheck(torch.ops.kernels.linear_cross_entropy.default,
                          (x.requires_grad_(needs_grad), w.requires_grad_(needs_grad), t, IGNORE, 0, needs_grad))


@pytest.mark.gpu
@pytest.mark.parametrize(("tokens", "vocab"), [(16384, 50258), (4099, 8192)])
def test_real_size_bf16_gpu(tokens: int, vocab: int) -> None:
    x, w, t = _inputs(tokens, 512, vocab, torch.bfloat16)
    check_against_truth(_fused(), _reference(), [x, w, t], grad_mask=[True, True, False])
    check_against_truth(_fused(chunk_tokens=1024), _reference(), [x, w, t], grad_mask=[True, True, False])
