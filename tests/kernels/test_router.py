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


def test_router_rejects_bad_k() -> None:
    with pytest.raises(ValueError):
        router_mod.router_topk(torch.randn(4, 8, device=DEVICE), 9)


def test_router_opcheck() -> None:
    logits = torch.randn(9, 8, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.kernels.router_topk.default, (logits, 2))


@pytest.mark.gpu
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (64, 6), (128, 8)])
def test_router_real_size_gpu(num_experts: int, top_k: int) -> None:
    logits = torch.randn(16384, num_experts, device="cuda")
    check_against_truth(_fused(top_k), _reference(top_k), [logits])
