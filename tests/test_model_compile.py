"""The model's own blocks under torch.compile(fullgraph=True) on the Triton backend (GPU only).

They compile whole model blocks (Inductor, bf16 autocast), so they live with the model tests; the
kernel-level CPU compile test of the elementwise ops is tests/kernels/test_rope.py's.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from tachyon.config import get_preset
from tachyon.layers import Attention, RotaryEmbedding
from tachyon.model import TachyonLM


@pytest.mark.gpu
def test_gpu_compiled_block_fullgraph() -> None:
    """A pre-norm block of the model's own layers (RMSNorm, QK-norm+RoPE attention, SwiGLU) compiled
    with fullgraph=True on the Triton backend: no graph break, and loss and grads match eager."""
    config = get_preset("tiny")

    class DenseBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_norm = kernels.RMSNorm(config.d_model, config.norm_eps)
            self.attn = Attention(config)
            self.ffn_norm = kernels.RMSNorm(config.d_model, config.norm_eps)
            self.mlp = kernels.SwiGLU(config.d_model, config.d_ff)
            self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.attn_norm(x), self.rotary)
            return x + self.mlp(self.ffn_norm(x))

    block = DenseBlock().cuda()
    x = torch.randn(4, 512, config.d_model, device="cuda")
    with kernels.use("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        compiled = torch.compile(block, fullgraph=True)
        loss_c = compiled(x).float().pow(2).mean()
        grads_c = torch.autograd.grad(loss_c, list(block.parameters()))
        loss_e = block(x).float().pow(2).mean()
        grads_e = torch.autograd.grad(loss_e, list(block.parameters()))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-2, atol=0)
    for gc, ge in zip(grads_c, grads_e, strict=True):  # bf16 matmuls fuse differently: compare norms
        assert (gc - ge).norm() <= 2e-2 * ge.norm(), "compiled and eager gradients differ"


def _block_loss_and_grads(block: torch.nn.Module, rotary: torch.nn.Module, x: torch.Tensor) -> tuple:
    """A model Block's output, router stats, loss (output + aux losses) and the loss's parameter grads."""
    out, stats = block(x, rotary)
    loss = out.float().pow(2).mean() + stats.z_loss + stats.balance_loss
    return out, stats, loss, torch.autograd.grad(loss, list(block.parameters()))


@pytest.mark.gpu
def test_gpu_compiled_model_block_fullgraph() -> None:
    """tachyon.model.Block (attention + router + MoE) compiled with fullgraph=True on the Triton backend:
    no graph break, the same routing, and output, loss and every parameter's grad match eager."""
    model = TachyonLM(get_preset("tiny").replace(n_layers=1)).cuda()  # a Block initialised as for training
    block, rotary = model.blocks[0], model.rotary
    x = torch.randn(2, 256, model.config.d_model, device="cuda")
    with kernels.use("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        out_c, stats_c, loss_c, grads_c = _block_loss_and_grads(torch.compile(block, fullgraph=True), rotary, x)
        out_e, stats_e, loss_e, grads_e = _block_loss_and_grads(block, rotary, x)
    # The router's fp32 logits see the same inputs, so routing must not change; a routing difference
    # would move whole tokens between experts and show up below as a large w13/w2 gradient error.
    assert torch.equal(stats_c.expert_fraction, stats_e.expert_fraction), "compiled routing differs from eager"
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-2, atol=0)
    assert (out_c.float() - out_e.float()).norm() <= 2e-2 * out_e.float().norm(), "compiled and eager outputs differ"
    for gc, ge in zip(grads_c, grads_e, strict=True):  # bf16 matmuls fuse differently: compare norms
        assert (gc - ge).norm() <= 2e-2 * ge.norm(), "compiled and eager gradients differ"
