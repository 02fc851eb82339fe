"""Fused linear cross-entropy against its reference under the correctness rule (loss, dx, dweight)."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import cross_entropy as ce_mod
from tests.kernels.correctness import DEVICE, FLOOR, check_against_truth

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


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_casts_like_f_linear(backend: str) -> None:
    """Under CPU bf16 autocast kernels.linear_cross_entropy casts x and weight to bf16 on either backend
    (the package's autocast rule), and an fp32 weight gets an fp32 grad."""
    x, w, t = _inputs(16, 32, 300, torch.float32)
    w.requires_grad_(True)
    with kernels.use(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kernels.linear_cross_entropy(x, w, t)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    expected = ce_mod.linear_cross_entropy_reference(x.bfloat16(), w.detach().bfloat16(), t)
    torch.testing.assert_close(loss, expected, atol=1e-2, rtol=1e-2)


def test_the_triton_function_takes_the_dtypes_it_is_given() -> None:
    """kernels.cross_entropy.linear_cross_entropy itself does not consult autocast: fp32 in, fp32 math."""
    x, w, t = _inputs(16, 32, 300, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ce_mod.linear_cross_entropy(x, w, t)
    assert torch.equal(loss, ce_mod.linear_cross_entropy(x, w, t))


def test_dispatcher_follows_backend() -> None:
    x, w, t = _inputs(8, 16, 100, torch.float32)
    with kernels.use("triton"):
        fused = kernels.linear_cross_entropy(x, w, t)
    with kernels.use("reference"):
        reference = kernels.linear_cross_entropy(x, w, t)
    torch.testing.assert_close(fused, reference)


def test_rejects_mismatched_inputs() -> None:
    """Bad dtypes and shapes are errors, also for the ops called directly (they check their own inputs)."""
    x, w, t = _inputs(8, 16, 100, torch.float32)
    with pytest.raises(TypeError):
        ce_mod.linear_cross_entropy(x.half(), w, t)
    with pytest.raises(ValueError):
        ce_mod.linear_cross_entropy(x, w, t[:4])
    op, bwd = torch.ops.kernels.linear_cross_entropy, torch.ops.kernels.linear_cross_entropy_bwd
    with pytest.raises(ValueError, match="targets"):
        op(x, w, t[:4], IGNORE, 0, True)
    with pytest.raises(ValueError, match="weight"):
        op(x, w[:, :8], t, IGNORE, 0, True)
    with pytest.raises(ValueError, match="targets"):
        bwd(torch.ones(()), x, w, t.float(), IGNORE, 0)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("needs_grad", [True, False])
def test_opcheck(needs_grad: bool, dtype: torch.dtype) -> None:
    """The fake's outputs match the real op's exactly, also for a transposed (column-major) x; fp16's
    forward returns no gradients and its backward op recomputes them."""
    x, w, t = _inputs(9, 16, 100, dtype)
    x = x.t().contiguous().t()  # (9, 16) with strides (1, 9): empty_like(x) would copy them
    torch.library.opcheck(torch.ops.kernels.linear_cross_entropy.default,
                          (x.requires_grad_(needs_grad), w.requires_grad_(needs_grad), t, IGNORE, 0, needs_grad))
    if dtype == torch.float16 and needs_grad:
        torch.library.opcheck(torch.ops.kernels.linear_cross_entropy_bwd.default,
                              (torch.tensor(3.0), x.detach(), w.detach(), t, IGNORE, 0))


GRAD_SCALE = 65536.0  # torch.amp.GradScaler's initial scale


def _scaled_weight_grad(loss_fn, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d(GRAD_SCALE * loss)/d(weight) with x and w in `dtype`, as float64."""
    w = w.detach().to(dtype).requires_grad_(True)
    (GRAD_SCALE * loss_fn(x.to(dtype), w, t)).backward()
    return w.grad.double()


@pytest.mark.parametrize("chunk_tokens", [0, 64])
def test_fp16_under_loss_scaling_keeps_small_gradients(chunk_tokens: int) -> None:
    """fp16 with the loss scaled by 65536, as GradScaler trains. A flat softmax over 2000 ids and 256
    tokens makes softmax / n_valid about 2e-6, in fp16's subnormal range before the scale: a gradient
    stored in fp16 then loses most of its bits (5x the reference's max error on the rows below). The
    weight rows of ids that are never a target get those gradients alone, so the correctness rule
    must hold for those rows on their own, not only next to the much larger target rows."""
    x = (0.5 * torch.randn(256, 16, device=DEVICE)).half()
    w = (torch.randn(2000, 16, device=DEVICE) / 4).half()
    t = torch.randint(0, 100, (256,), device=DEVICE)  # targets among the first 100 ids only
    t[::5] = IGNORE
    fused, reference = _fused(chunk_tokens), _reference()
    truth = _scaled_weight_grad(reference, x, w, t, torch.float64)[100:]
    fused_err = (_scaled_weight_grad(fused, x, w, t, torch.float16)[100:] - truth).abs().max().item()
    ref_err = (_scaled_weight_grad(reference, x, w, t, torch.float16)[100:] - truth).abs().max().item()
    assert fused_err <= 2 * ref_err + FLOOR[torch.float16], f"never-target rows: {fused_err:.3g} vs {ref_err:.3g}"
    scaled = lambda loss_fn: lambda x, w, t: GRAD_SCALE * loss_fn(x, w, t)
    check_against_truth(scaled(fused), scaled(reference), [x, w, t], grad_mask=[True, True, False])
