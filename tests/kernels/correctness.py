"""The correctness rule of docs/design.md ("Numerics and the correctness rule"), shared by every kernel test.

A fused op is correct when, against a float64 ground truth (the reference run in float64 on
the same input values), its max error is at most twice the reference's own error at the same
input dtype, plus a small absolute floor, for the output and for every gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Absolute floor added to 2x the reference's error, per input dtype (about one ulp near 1).
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _as_tuple(x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _arg_grad(leaf: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """The gradient of the argument `arg` that was built on `leaf`: leaf.grad itself, or for a strided view of
    the leaf, the same view of leaf.grad laid out like the leaf (autograd may hand a leaf a slice of a larger
    gradient, whose own strides must not be reused)."""
    if arg is leaf:
        return leaf.grad
    return leaf.grad.contiguous().as_strided(arg.shape, arg.stride(), arg.storage_offset())


def _run(fn: Callable, inputs: Sequence[torch.Tensor], grad_mask: Sequence[bool],
         dtype: torch.dtype | None, grad_outs: Sequence[torch.Tensor] | None):
    """Call fn on copies of `inputs` (floats cast to `dtype`), backprop grad_outs, return outputs + grads."""
    leaves, args = [], []
    for t, needs_grad in zip(inputs, grad_mask, strict=True):
        cast = (lambda u: u.detach().to(dtype)) if t.is_floating_point() and dtype else (lambda u: u.detach())
        if t._base is not None and not t.is_contiguous():
            # A strided view (e.g. q sliced out of a fused qkv): rebuild the same view on a leaf base.
            leaf = cast(t._base).clone().requires_grad_(needs_grad)
            arg = leaf.as_strided(t.shape, t.stride(), t.storage_offset())
        else:
            leaf = cast(t).clone().requires_grad_(needs_grad)
            arg = leaf
        leaves.append((leaf, arg))
        args.append(arg)
    outs = _as_tuple(fn(*args))
    grads: tuple[torch.Tensor, ...] = ()
    if any(grad_mask):
        diff_outs = [o for o in outs if o.is_floating_point() and o.requires_grad]
        gos = [g.to(o.dtype) for g, o in zip(grad_outs or (), diff_outs, strict=False)]
        torch.autograd.backward(diff_outs, gos)
        grads = tuple(_arg_grad(leaf, arg) for (leaf, arg), needs in zip(leaves, grad_mask, strict=True) if needs)
    return outs, grads


def check_against_truth(
    fused: Callable,
    reference: Callable,
    inputs: Sequence[torch.Tensor],
    grad_mask: Sequence[bool] | None = None,
    floor: float | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Assert the correctness rule for every floating output and every gradient.

    `inputs` are already in the dtype under test (non-contiguous views are kept as given);
    the truth runs `reference` on the same values in float64. `grad_mask` says which inputs
    get gradients (default: every floating input). Integer outputs must match exactly.
    """
    dtype = dtype or next(t.dtype for t in inputs if t.is_floating_point())
    if grad_mask is None:
        grad_mask = [t.is_floating_point() for t in inputs]
    floor = FLOOR[dtype] if floor is None else floor

    probe, _ = _run(reference, inputs, [False] * len(inputs), None, None)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    grad_outs = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
                 for o in probe if o.is_floating_point()]
    # Keep non-contiguous views for the ops under test by passing the inputs as they are.
    fused_outs, fused_grads = _run(fused, inputs, grad_mask, None, grad_outs)
    ref_outs, ref_grads = _run(reference, inputs, grad_mask, None, grad_outs)
    true_outs, true_grads = _run(reference, inputs, grad_mask, torch.float64, grad_outs)

    names = [f"output {i}" for i in range(len(true_outs))] + [
        f"grad of input {i}" for i, needs in enumerate(grad_mask) if needs
    ]
    for name, f, r, t in zip(names, fused_outs + fused_grads, ref_outs + ref_grads,
                             true_outs + true_grads, strict=True):
        assert f.shape == t.shape, f"{name}: shape {tuple(f.shape)} != {tuple(t.shape)}"
        if not t.is_floating_point():
            assert torch.equal(f.cpu(), t.cpu()), f"{name}: integer results differ"
            continue
        assert f.dtype == r.dtype, f"{name}: dtype {f.dtype} != reference's {r.dtype}"
        fused_err = (f.double() - t).abs().max().item() if t.numel() else 0.0
        ref_err = (r.double() - t).abs().max().item() if t.numel() else 0.0
        bound = 2 * ref_err + floor
        assert fused_err <= bound, (
            f"{name}: fused max error {fused_err:.3g} > 2 x reference error {ref_err:.3g} + floor {floor:g}"
        )
