"""Triton router_topk against its reference under the correctness rule (outputs, ids, counts, dlogits)."""

from __future__ import annotations

import pytest
import torch

from kernels import router as router_mod
from tests.kernels.correctness import DEVICE, check_against_truth


def _fused(k: int):
    return lambda logits: router_mod.router_topk(logits, k)


def _reference(k: int):
    return lambda logits: router_mod.router_topk_reference(logits, k)


@pytest.mark.parametrize("num_experts", [4, 8, 128])
@pytest.mark.parametrize("top_k", [1, 2, "E"])
def test_router_matches_reference_fp32(num_experts: int, top_k: int | str) -> None:
    k = num_experts if top_k == "E" else top_k
    logits = torch.randn(37, num_experts, device=DEVICE) * 2  # 37 rows: not a multiple of any block
    check_against_truth(_fused(k), _reference(k), [logits])


@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (128, 128)])
def test_router_matches_reference_fp16(num_experts: int, top_k: int) -> None:
    logits = torch.randn(29, num_experts, device=DEVICE).half()
    check_against_truth(_fused(top_k), _reference(top_k), [logits])


def test_router_ties_go_to_the_lower_id() -> None:
    logits = torch.randint(0, 3, (40, 16), device=DEVICE).float()  # many exact ties per row
    check_against_truth(_fused(5), _reference(5), [logits])
    _, ids, _, _ = router_mod.router_topk(torch.zeros(3, 8, device=DEVICE), 3)
    assert ids.tolist() == [[0, 1, 2]] * 3


def _fp32_probability_ties(case: str) -> torch.Tensor:
    """(64, 8) logits whose fp32 probabilities tie although the logits differ."""
    logits = torch.randn(64, 8, device=DEVICE)
    if case == "one-ulp":  # each odd expert one ulp above its even neighbour: equal probabilities in fp32
        logits[:, 1::2] = torch.nextafter(logits[:, ::2], torch.tensor(float("inf"), device=DEVICE))
        return logits
    return logits * 1e4  # every probability but the largest underflows to 0, in fp32 and in fp64


@pytest.mark.parametrize("case", ["one-ulp", "scaled-1e4"])
def test_router_ranks_by_logit_where_fp32_probabilities_tie(case: str) -> None:
    """Both backends rank by logit (equal logits to the lower id), so they agree with each other and
    with the rule even where the rounded probabilities tie; counts follow the ids."""
    logits = _fp32_probability_ties(case)
    by_logit = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :4].int()
    for topk in (router_mod.router_topk, router_mod.router_topk_reference):
        _, ids, counts, _ = topk(logits, 4)
        assert torch.equal(ids, by_logit), f"{topk.__name__} does not rank by logit"
        assert torch.equal(counts, torch.bincount(by_logit.flatten(), minlength=8).int())
    check_against_truth(_fused(4), _reference(4), [logits])


def test_router_one_token_and_strided_logits() -> None:
    check_against_truth(_fused(2), _reference(2), [torch.randn(1, 8, device=DEVICE)])
    strided = torch.randn(8, 33, device=DEVICE).t()  # (33, 8) with stride (1, 33)
    check_against_truth(_fused(2), _reference(2), [strided])


def test_router_counts_cover_every_choice() -> None:
    logits = torch.randn(300, 8, device=DEVICE)
    logits[:270, 3] += 20  # 90% of tokens prefer expert 3
    weights, ids, counts, lse = router_mod.router_topk(logits, 2)
    assert counts.dtype == torch.int32 and int(counts.sum()) == 600
    assert torch.equal(counts, torch.bincount(ids.flatten().long(), minlength=8).int())
    assert torch.allclose(weights.sum(-1), torch.ones(300, device=DEVICE))


def _with_nan_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits` with two rows inserted: all NaN at row 5, one NaN logit at row 20."""
    nan_row = torch.full_like(logits[:1], float("nan"))
    partial = logits[:1].detach().clone()
    partial[0, 3] = float("nan")
    return torch.cat([logits[:5], nan_row, logits[5:19], partial, logits[19:]])


_CLEAN = [i for i in range(39) if i not in (5, 20)]  # the rows of _with_nan_rows(37 rows) that came from logits


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy under the interpreter
@pytest.mark.parametrize("top_k", [2, 8])
def test_router_nan_rows_get_valid_ids_and_leave_the_rest_alone(top_k: int) -> None:
    """A row with a NaN logit routes to experts 0..k-1 (as the reference does), never to an id >= E;
    the other rows' outputs and dlogits are the clean-logits result under the correctness rule."""
    logits = torch.randn(37, 8, device=DEVICE) * 2
    weights, ids, counts, _ = router_mod.router_topk(_with_nan_rows(logits), top_k)
    assert int(ids.min()) >= 0 and int(ids.max()) < 8
    assert ids[[5, 20]].tolist() == [list(range(top_k))] * 2
    assert torch.equal(ids, router_mod.router_topk_reference(_with_nan_rows(logits), top_k)[1])
    assert torch.equal(counts, torch.bincount(ids.flatten().long(), minlength=8).int())
    assert weights[[5, 20]].isnan().all()

    def fused(clean: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w, i, _, lse = router_mod.router_topk(_with_nan_rows(clean), top_k)
        return w[_CLEAN], i[_CLEAN], lse[_CLEAN]

    def reference(clean: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w, i, _, lse = router_mod.router_topk_reference(clean, top_k)
        return w, i, lse

    check_against_truth(fused, reference, [logits])


@pytest.mark.parametrize("k", [0, 9, 99])
def test_router_rejects_bad_k(k: int) -> None:
    """Out-of-range k is a ValueError on every path: the Triton function, the op called directly, the reference."""
    logits = torch.randn(4, 8, device=DEVICE)
    for topk in (router_mod.router_topk, torch.ops.kernels.router_topk, router_mod.router_topk_reference):
        with pytest.raises(ValueError, match="top-k"):
            topk(logits, k)


def test_router_ops_check_their_shapes() -> None:
    with pytest.raises(ValueError, match="tokens, experts"):
        torch.ops.kernels.router_topk(torch.randn(2, 4, 8, device=DEVICE), 2)
    logits = torch.randn(4, 8, device=DEVICE)
    weights, ids, _, lse = router_mod.router_topk(logits, 2)
    with pytest.raises(ValueError, match="dweights"):
        torch.ops.kernels.router_topk_bwd(weights[:3], lse, logits, weights, ids, lse)


def test_router_opcheck() -> None:
    logits = torch.randn(9, 8, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.kernels.router_topk.default, (logits, 2))


@pytest.mark.gpu
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (64, 6), (128, 8)])
def test_router_real_size_gpu(num_experts: int, top_k: int) -> None:
    logits = torch.randn(16384, num_experts, device="cuda")
    check_against_truth(_fused(top_k), _reference(top_k), [logits])
