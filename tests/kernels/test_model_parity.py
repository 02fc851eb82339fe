"""A whole model with every fused op (kernels=triton) matches the pure PyTorch path (kernels=reference)."""

import pytest
import torch

import kernels
from tachyon.config import PRESETS
from tachyon.model import TachyonLM

CONFIG = PRESETS["nano"].replace(vocab_size=320, n_layers=2, max_seq_len=64)


def loss_and_grads(model: TachyonLM, idx: torch.Tensor, backend: str) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    with kernels.use(backend):
        out = model(idx[:, :-1], idx[:, 1:])
    out.loss.backward()
    parts = {k: getattr(out, k).detach() for k in ("loss", "ce", "z_loss", "balance_loss", "expert_fraction")}
    return parts, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("top_k", [1, 2])
def test_triton_model_matches_reference_in_loss_and_gradients(top_k: int) -> None:
    torch.manual_seed(0)
    model = TachyonLM(CONFIG.replace(top_k=top_k))
    idx = torch.randint(0, CONFIG.vocab_size, (2, 17))  # 16 positions: not a multiple of any tile
    ref, ref_grads = loss_and_grads(model, idx, "reference")
    fused, fused_grads = loss_and_grads(model, idx, "triton")
    for key in ref:
        torch.testing.assert_close(fused[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
    for name, grad in ref_grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        err = (fused_grads[name] - grad).abs().max() / scale
        assert err < 1e-4, f"{name}: relative gradient difference {err:.2e}"
