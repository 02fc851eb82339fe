"""Rotate-half rotary embeddings on q and k, alone or after a per-head RMSNorm (QK-norm)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton_utils import cast_out, warps_for
from .rmsnorm import rms_norm_reference


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, T, H, D); cos, sin (T, D/2) in fp32
    half = x.shape[-1] // 2
    xf = x.to(torch.promote_types(x.dtype, cos.dtype))
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, D) and k (B, T, Hkv, D) by the angles of positions offset..offset+T-1.

    cos and sin are tables (max_positions, D/2) of cos/sin(position * inv_freq), fp32.
    """
    T = q.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for the ground truth
    cos, sin = cos[offset : offset + T].to(acc), sin[offset : offset + T].to(acc)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offset: int = 0,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over head_dim (weights (D,)) of q and k, then RoPE."""
    return rope_reference(
        rms_norm_reference(q, q_weight, eps), rms_norm_reference(k, k_weight, eps), cos, sin, offset
    )


# --- Triton kernels ---------------------------------------------------------------------------------
# One program per token rotates all of its q heads and k heads (one launch for both) and reads
# cos/sin once. Rotate-half pairs element d with element d + D/2, so every head is loaded as two
# (heads, D/2) tiles. The transpose of a rotation is the rotation by minus the angle, so the
# backward of RoPE is RoPE with sin negated.


@triton.jit
def _cos_sin(
    COS,  # pointer to the cos table (max_positions, D/2)
    SIN,  # pointer to the sin table (max_positions, D/2)
    stride_cos,  # row stride of COS
    stride_sin,  # row stride of SIN
    pos,  # the position whose angles are read
    HALF: tl.constexpr,  # D / 2
    BLOCK_D2: tl.constexpr,  # power of two >= HALF
):
    """cos and sin of position `pos` as (1, BLOCK_D2) fp32 rows (zero past HALF)."""
    d = tl.arange(0, BLOCK_D2)
    mask = d < HALF
    c = tl.load(COS + pos * stride_cos + d, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + pos * stride_sin + d, mask=mask, other=0.0).to(tl.float32)
    return c[None, :], s[None, :]


@triton.jit
def _rotate_heads(
    X,  # pointer to the input heads (q or k, or the gradients of their outputs)
    Y,  # pointer to the output, contiguous (B, T, heads, D)
    x_base,  # offset of this token's first head in X
    y_base,  # offset of this token's first head in Y
    stride_xh,  # elements between heads in X
    n_heads,  # heads per token
    c,  # (1, BLOCK_D2) fp32 cos of this token's angles
    s,  # (1, BLOCK_D2) fp32 sin of this token's angles (negated for the backward)
    HALF: tl.constexpr,  # D / 2
    BLOCK_H: tl.constexpr,  # power of two >= n_heads
    BLOCK_D2: tl.constexpr,  # power of two >= HALF
):
    """Rotate the n_heads heads of one token: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    x1, x2, h, d, mask = _load_halves(X, x_base, stride_xh, n_heads, HALF, BLOCK_H, BLOCK_D2)
    _store_rotated(Y, y_base, h, d, mask, x1, x2, c, s, HALF)


@triton.jit
def _load_halves(X, x_base, stride_xh, n_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_D2: tl.constexpr):
    """One token's heads as fp32 halves (x1, x2), each (BLOCK_H, BLOCK_D2), with their head and
    column indices and mask."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D2)[None, :]
    mask = (h < n_heads) & (d < HALF)
    xp = X + x_base + h * stride_xh + d
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1, x2, h, d, mask


@triton.jit
def _store_rotated(Y, y_base, h, d, mask, x1, x2, c, s, HALF: tl.constexpr):
    """Store the rotate-half rotation of (x1, x2) to one token's heads of the contiguous Y."""
    yp = Y + y_base + h * (2 * HALF) + d
    tl.store(yp, cast_out(x1 * c - x2 * s, Y.dtype.element_ty), mask=mask)
    tl.store(yp + HALF, cast_out(x2 * c + x1 * s, Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["offset"])
def _rope_kernel(
    X,  # pointer to q (B, T, H, D), or to the gradient of the rotated q; unit stride over D
    Y,  # pointer to k (B, T, HKV, D), or to the gradient of the rotated k; unit stride over D
    XO,  # pointer to the rotated q (or the q gradient), contiguous (B, T, H, D)
    YO,  # pointer to the rotated k (or the k gradient), contiguous (B, T, HKV, D)
    COS,  # pointer to the cos table (max_positions, D/2)
    SIN,  # pointer to the sin table (max_positions, D/2)
    stride_xb, stride_xt, stride_xh,  # strides of X over B, T and heads
    stride_yb, stride_yt, stride_yh,  # strides of Y over B, T and heads
    stride_cos, stride_sin,  # row strides of the tables
    T,  # tokens per sequence
    H,  # q heads
    HKV,  # k heads
    offset,  # position of token 0 (the KV-cache length when decoding)
    INVERSE: tl.constexpr,  # rotate by minus the angle: the backward, whose matrix is the transpose
    HALF: tl.constexpr,  # D / 2
    BLOCK_H: tl.constexpr,  # power of two >= H
    BLOCK_HKV: tl.constexpr,  # power of two >= HKV
    BLOCK_D2: tl.constexpr,  # power of two >= HALF
):
    """Rotate every q and k head of the token this program owns, forward or (INVERSE) backward."""
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    t = tok % T
    c, s = _cos_sin(COS, SIN, stride_cos, stride_sin, t + offset, HALF, BLOCK_D2)
    if INVERSE:
        s = -s
    _rotate_heads(X, XO, b * stride_xb + t * stride_xt, tok * H * 2 * HALF, stride_xh, H, c, s,
                  HALF, BLOCK_H, BLOCK_D2)
    _rotate_heads(Y, YO, b * stride_yb + t * stride_yt, tok * HKV * 2 * HALF, stride_yh, HKV, c, s,
                  HALF, BLOCK_HKV, BLOCK_D2)


@triton.jit
def _norm_rotate_heads(
    X,  # pointer to the input heads (q or k)
    Y,  # pointer to the output, contiguous (B, T, heads, D)
    x_base,  # offset of this token's first head in X
    y_base,  # offset of this token's first head in Y
    stride_xh,  # elements between heads in X
    n_heads,  # heads per token
    w1, w2,  # (1, BLOCK_D2) fp32 halves of the norm weight
    c, s,  # (1, BLOCK_D2) fp32 cos and sin of this token's angles
    eps,  # added to mean(x^2) before the rsqrt
    HALF: tl.constexpr,  # D / 2
    BLOCK_H: tl.constexpr,  # power of two >= n_heads
    BLOCK_D2: tl.constexpr,  # power of two >= HALF
):
    """RMSNorm each head over D in fp32, scale by the weight, rotate, store once."""
    x1, x2, h, d, mask = _load_halves(X, x_base, stride_xh, n_heads, HALF, BLOCK_H, BLOCK_D2)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
    _store_rotated(Y, y_base, h, d, mask, x1 * rstd * w1, x2 * rstd * w2, c, s, HALF)


@triton.jit(do_not_specialize=["offset"])
def _qk_norm_rope_fwd_kernel(
    Q,  # pointer to q (B, T, H, D), any strides with a unit stride over D
    K,  # pointer to k (B, T, HKV, D), any strides with a unit stride over D
    WQ,  # pointer to the q norm weight (D,)
    WK,  # pointer to the k norm weight (D,)
    QO,  # pointer to the output q, contiguous (B, T, H, D)
    KO,  # pointer to the output k, contiguous (B, T, HKV, D)
    COS,  # pointer to the cos table (max_positions, D/2)
    SIN,  # pointer to the sin table (max_positions, D/2)
    stride_qb, stride_qt, stride_qh,  # strides of q over B, T and heads
    stride_kb, stride_kt, stride_kh,  # strides of k over B, T and heads
    stride_cos, stride_sin,  # row strides of the tables
    T,  # tokens per sequence
    H,  # q heads
    HKV,  # k heads
    offset,  # position of token 0 (the KV-cache length when decoding)
    eps,  # added to mean(x^2) before the rsqrt
    HALF: tl.constexpr,  # D / 2
    BLOCK_H: tl.constexpr,  # power of two >= H
    BLOCK_HKV: tl.constexpr,  # power of two >= HKV
    BLOCK_D2: tl.constexpr,  # power of two >= HALF
):
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    t = tok % T
    c, s = _cos_sin(COS, SIN, stride_cos, stride_sin, t + offset, HALF, BLOCK_D2)
    d = tl.arange(0, BLOCK_D2)[None, :]
    dmask = d < HALF
    wq1 = tl.load(WQ + d, mask=dmask, other=0.0).to(tl.float32)
    wq2 = tl.load(WQ + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    wk1 = tl.load(WK + d, mask=dmask, other=0.0).to(tl.float32)
    wk2 = tl.load(WK + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    _norm_rotate_heads(Q, QO, b * stride_qb + t * stride_qt, tok * H * 2 * HALF, stride_qh, H, wq1, wq2, c, s,
                       eps, HALF, BLOCK_H, BLOCK_D2)
    _norm_rotate_heads(K, KO, b * stride_kb + t * stride_kt, tok * HKV * 2 * HALF, stride_kh, HKV, wk1, wk2, c, s,
                       eps, HALF, BLOCK_HKV, BLOCK_D2)


@triton.jit
def _norm_rotate_heads_bwd(
    DY,  # pointer to the gradient of the output heads
    X,  # pointer to the forward's input heads
    DX,  # pointer to the input gradient, contiguous (B, T, heads, D)
    dy_base,  # offset of this token's first head in DY
    x_base,  # offset of this token's first head in X
    dx_base,  # offset of this token's first head in DX
    stride_dyh,  # elements between heads in DY
    stride_xh,  # elements between heads in X
    n_heads,  # heads per token
    w1, w2,  # (1, BLOCK_D2) fp32 halves of the norm weight
    c, s,  # (1, BLOCK_D2) fp32 cos and sin of this token's angles
    eps,  # the forward's eps (rstd is recomputed from x)
    HALF: tl.constexpr,  # D / 2
    BLOCK_H: tl.constexpr,  # power of two >= n_heads
    BLOCK_D2: tl.constexpr,  # power of two >= HALF
):
    """Rotate the gradient back, then RMSNorm's backward; store dx, return this token's dw halves."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D2)[None, :]
    mask = (h < n_heads) & (d < HALF)
    dyp = DY + dy_base + h * stride_dyh + d
    dy1 = tl.load(dyp, mask=mask, other=0.0).to(tl.float32)
    dy2 = tl.load(dyp + HALF, mask=mask, other=0.0).to(tl.float32)
    dn1 = dy1 * c + dy2 * s
    dn2 = dy2 * c - dy1 * s
    xp = X + x_base + h * stride_xh + d
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
    xh1 = x1 * rstd
    xh2 = x2 * rstd
    g1 = dn1 * w1
    g2 = dn2 * w2
    m = ((tl.sum(g1 * xh1, axis=1) + tl.sum(g2 * xh2, axis=1)) / (2 * HALF))[:, None]
    dxp = DX + dx_base + h * (2 * HALF) + d
    tl.store(dxp, cast_out(rstd * (g1 - xh1 * m), DX.dtype.element_ty), mask=mask)
    tl.store(dxp + HALF, cast_out(rstd * (g2 - xh2 * m), DX.dtype.element_ty), mask=mask)
    return tl.sum(dn1 * xh1, axis=0), tl.sum(dn2 * xh2, axis=0)


@triton.jit(do_not_specialize=["offset"])
def _qk_norm_rope_bwd_kernel(
    DQO,  # pointer to the gradient of the output q (B, T, H, D), unit stride over D
    DKO,  # pointer to the gradient of the output k (B, T, HKV, D), unit stride over D
    Q,  # pointer to the forward's q (B, T, H, D), unit stride over D
    K,  # pointer to the forward's k (B, T, HKV, D), unit stride over D
    WQ,  # pointer to the q norm weight (D,)
    WK,  # pointer to the k norm weight (D,)
    DQ,  # pointer to the q gradient, contiguous (B, T, H, D)
    DK,  # pointer to the k gradient, contiguous (B, T, HKV, D)
    DWQ_PARTIAL,  # pointer to fp32 (num_programs, D): this program's share of d q_weight
    DWK_PARTIAL,  # pointer to fp32 (num_programs, D): this program's share of d k_weight
    COS,  # pointer to the cos table (max_positions, D/2)
    SIN,  # pointer to the sin table (max_positions, D/2)
    stride_dqb, stride_dqt, stride_dqh,  # strides of DQO over B, T and heads
    stride_dkb, stride_dkt, stride_dkh,  # strides of DKO over B, T and heads
    stride_qb, stride_qt, stride_qh,  # strides of Q over B, T and heads
    stride_kb, stride_kt, stride_kh,  # strides of K over B, T and heads
    stride_cos, stride_sin,  # row strides of the tables
    n_tokens,  # B * T
    T,  # tokens per sequence
    H,  # q heads
    HKV,  # k heads
    offset,  # position of token 0
    eps,  # the forward's eps
    HALF: tl.constexpr,  # D / 2
    BLOCK_H: tl.constexpr,  # power of two >= H
    BLOCK_HKV: tl.constexpr,  # power of two >= HKV
    BLOCK_D2: tl.constexpr,  # power of two >= HALF
):
    pid = tl.program_id(0)
    d = tl.arange(0, BLOCK_D2)
    dmask = d < HALF
    wq1 = tl.load(WQ + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    wq2 = tl.load(WQ + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    wk1 = tl.load(WK + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    wk2 = tl.load(WK + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    dwq1 = tl.zeros((BLOCK_D2,), dtype=tl.float32)
    dwq2 = tl.zeros((BLOCK_D2,), dtype=tl.float32)
    dwk1 = tl.zeros((BLOCK_D2,), dtype=tl.float32)
    dwk2 = tl.zeros((BLOCK_D2,), dtype=tl.float32)
    # Persistent programs stride over tokens so each keeps its weight-gradient partials in registers.
    for tok in range(pid, n_tokens, tl.num_programs(0)):
        tok64 = tl.cast(tok, tl.int64)
        b = tok64 // T
        t = tok64 % T
        c, s = _cos_sin(COS, SIN, stride_cos, stride_sin, t + offset, HALF, BLOCK_D2)
        a1, a2 = _norm_rotate_heads_bwd(DQO, Q, DQ, b * stride_dqb + t * stride_dqt, b * stride_qb + t * stride_qt,
                                        tok64 * H * 2 * HALF, stride_dqh, stride_qh, H, wq1, wq2, c, s, eps,
                                        HALF, BLOCK_H, BLOCK_D2)
        dwq1 += a1
        dwq2 += a2
        a1, a2 = _norm_rotate_heads_bwd(DKO, K, DK, b * stride_dkb + t * stride_dkt, b * stride_kb + t * stride_kt,
                                        tok64 * HKV * 2 * HALF, stride_dkh, stride_kh, HKV, wk1, wk2, c, s, eps,
                                        HALF, BLOCK_HKV, BLOCK_D2)
        dwk1 += a1
        dwk2 += a2
    row = pid * 2 * HALF
    tl.store(DWQ_PARTIAL + row + d, dwq1, mask=dmask)
    tl.store(DWQ_PARTIAL + row + HALF + d, dwq2, mask=dmask)
    tl.store(DWK_PARTIAL + row + d, dwk1, mask=dmask)
    tl.store(DWK_PARTIAL + row + HALF + d, dwk2, mask=dmask)


# --- launchers ---------------------------------------------------------------------------------------

# The backward's launch size, from a model of the bytes it moves. It is memory-bound: per token it
# reads dy and x of every q and k head and writes dx. A persistent program works on one token at a
# time, so it has about one token's dy and x in flight; an SM covers DRAM latency at full bandwidth
# with about BYTES_IN_FLIGHT_PER_SM outstanding (Little's law: an H100 moves ~25 GB/s per SM, ~1 us
# latency under load, with margin), so it gets that many programs, as far as its registers allow:
# the kernel holds two (heads, D/2) fp32 tiles of dy and x per head set and needs up to about
# REGS_PER_THREAD registers (94 at the tiny/small shapes with 2 warps on sm_90).
BYTES_IN_FLIGHT_PER_SM = 32 * 1024
REGISTERS_PER_SM = 65536  # sm_80 and sm_90
REGS_PER_THREAD = 128


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int) -> None:
    """Shape rules shared by the ops and their fake implementations."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, T, H, D) and (B, T, Hkv, D)")
    D = q.shape[-1]
    if D % 2 or cos.dim() != 2 or cos.shape[-1] != D // 2 or sin.shape != cos.shape:
        raise ValueError(f"rope: head_dim {D} must be even and the tables (positions, {D // 2}), "
                         f"got cos {tuple(cos.shape)} and sin {tuple(sin.shape)}")
    if offset < 0 or offset + q.shape[1] > cos.shape[0]:
        raise ValueError(f"rope: positions {offset}..{offset + q.shape[1] - 1} exceed the table's {cos.shape[0]}")


def _check_norm_weights(q_weight: torch.Tensor, k_weight: torch.Tensor, head_dim: int) -> None:
    """The kernels read head_dim weights for each norm: any other shape is an error (the reference's too)."""
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if tuple(w.shape) != (head_dim,):
            raise ValueError(f"qk_norm_rope: {name} has shape {tuple(w.shape)}, but head_dim is {head_dim}: "
                             f"it must be ({head_dim},)")


def _check_grads(dqo: torch.Tensor, dko: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    """The backward ops' output gradients have their outputs' shapes."""
    if dqo.shape != q.shape or dko.shape != k.shape:
        raise ValueError(f"rope: gradients {tuple(dqo.shape)}, {tuple(dko.shape)} must match q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim has unit stride (any other strides are passed to the kernel)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _blocks(q: torch.Tensor, k: torch.Tensor) -> dict:
    """The kernels' compile-time sizes from the head counts and head_dim."""
    half = q.shape[-1] // 2
    block_h, block_hkv, block_d2 = (triton.next_power_of_2(n) for n in (q.shape[2], k.shape[2], half))
    return {"HALF": half, "BLOCK_H": block_h, "BLOCK_HKV": block_hkv, "BLOCK_D2": block_d2}


def _fwd_meta(q: torch.Tensor, k: torch.Tensor, tensors: int = 1) -> dict:
    """Block sizes and warps from the head counts and head_dim: about 16 elements per thread of the
    `tensors` (heads, D) tiles a program holds at once (the backward holds dy and x: 2)."""
    blocks = _blocks(q, k)
    return {**blocks, "num_warps": warps_for(2 * blocks["BLOCK_H"] * blocks["BLOCK_D2"] * tensors)}


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _bwd_launch(dqo: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[int, dict]:
    """(programs, meta) of the persistent qk_norm_rope backward, from the bytes-in-flight model above."""
    meta = _fwd_meta(q, k, tensors=2)
    n_tokens = q.shape[0] * q.shape[1]
    if q.device.type != "cuda":
        return max(1, min(4, n_tokens)), meta  # the interpreter runs programs one after the other
    read_per_token = (q.shape[2] + k.shape[2]) * q.shape[3] * (dqo.element_size() + q.element_size())
    by_bytes = -(-BYTES_IN_FLIGHT_PER_SM // read_per_token)
    by_registers = max(1, REGISTERS_PER_SM // (REGS_PER_THREAD * 32 * meta["num_warps"]))
    return max(1, min(min(by_bytes, by_registers) * _sm_count(q.device), n_tokens)), meta


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _empty_like_bthd(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _unit_last(cos), _unit_last(sin)


def _rope_launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int,
                 inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (or, inverse, their output gradients) by the angles of their positions."""
    q, k = _unit_last(q), _unit_last(k)
    cos, sin = _tables(cos, sin)
    qo, ko = _empty_like_bthd(q), _empty_like_bthd(k)
    B, T = q.shape[:2]
    if B * T:
        _rope_kernel[(B * T,)](q, k, qo, ko, cos, sin, *_strides(q), *_strides(k), cos.stride(0), sin.stride(0),
                               T, q.shape[2], k.shape[2], offset, INVERSE=inverse, **_fwd_meta(q, k))
    return qo, ko


def _qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, offset, eps):
    q, k = _unit_last(q), _unit_last(k)
    cos, sin = _tables(cos, sin)
    qo, ko = _empty_like_bthd(q), _empty_like_bthd(k)
    B, T = q.shape[:2]
    if B * T:
        _qk_norm_rope_fwd_kernel[(B * T,)](
            q, k, q_weight.contiguous(), k_weight.contiguous(), qo, ko, cos, sin, *_strides(q), *_strides(k),
            cos.stride(0), sin.stride(0), T, q.shape[2], k.shape[2], offset, eps, **_fwd_meta(q, k),
        )
    return qo, ko


def _qk_norm_rope_bwd(dqo, dko, q, k, q_weight, k_weight, cos, sin, offset, eps):
    dqo, dko, q, k = (_unit_last(t) for t in (dqo, dko, q, k))
    cos, sin = _tables(cos, sin)
    dq, dk = _empty_like_bthd(q), _empty_like_bthd(k)
    B, T, _, D = q.shape
    programs, meta = _bwd_launch(dqo, q, k)
    dwq = torch.zeros(programs, D, dtype=torch.float32, device=q.device)
    dwk = torch.zeros(programs, D, dtype=torch.float32, device=q.device)
    if B * T:
        _qk_norm_rope_bwd_kernel[(programs,)](
            dqo, dko, q, k, q_weight.contiguous(), k_weight.contiguous(), dq, dk, dwq, dwk, cos, sin,
            *_strides(dqo), *_strides(dko), *_strides(q), *_strides(k), cos.stride(0), sin.stride(0),
            B * T, T, q.shape[2], k.shape[2], offset, eps, **meta,
        )
    return dq, dk, dwq.sum(0).to(q_weight.dtype), dwk.sum(0).to(k_weight.dtype)


# --- the public ops ----------------------------------------------------------------------------------
# Each op checks its own inputs, in its real and its fake implementation alike, so a direct
# torch.ops.kernels.* call and a traced one fail as the reference would instead of reading past a tensor.


@torch.library.custom_op("kernels::rope", mutates_args=())
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused rotate-half RoPE of q (B, T, H, D) and k (B, T, Hkv, D) in one launch; contiguous outputs.

    q and k may be strided views (e.g. of one fused qkv projection); positions start at `offset`.
    """
    _check(q, k, cos, sin, offset)
    return _rope_launch(q, k, cos, sin, offset, inverse=False)


@rope.register_fake
def _(q, k, cos, sin, offset=0):
    _check(q, k, cos, sin, offset)
    return _empty_like_bthd(q), _empty_like_bthd(k)


@torch.library.custom_op("kernels::rope_bwd", mutates_args=())
def rope_bwd(dqo: torch.Tensor, dko: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk) of rope: the output gradients rotated back by the same angles."""
    _check(dqo, dko, cos, sin, offset)
    return _rope_launch(dqo, dko, cos, sin, offset, inverse=True)


@rope_bwd.register_fake
def _(dqo, dko, cos, sin, offset):
    _check(dqo, dko, cos, sin, offset)
    return _empty_like_bthd(dqo), _empty_like_bthd(dko)


def _rope_setup_context(ctx, inputs, output) -> None:
    _, _, cos, sin, offset = inputs
    ctx.save_for_backward(cos, sin)
    ctx.offset = offset


def _rope_backward(ctx, dqo: torch.Tensor, dko: torch.Tensor):
    cos, sin = ctx.saved_tensors
    dq, dk = rope_bwd(dqo, dko, cos, sin, ctx.offset)
    return dq, dk, None, None, None


rope.register_autograd(_rope_backward, setup_context=_rope_setup_context)


@torch.library.custom_op("kernels::qk_norm_rope", mutates_args=())
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
    """Fused per-head RMSNorm (fp32 statistics, weights (D,)) then RoPE of q and k: one read, one write of each."""
    _check(q, k, cos, sin, offset)
    _check_norm_weights(q_weight, k_weight, q.shape[-1])
    return _qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, offset, eps)


@qk_norm_rope.register_fake
def _(q, k, q_weight, k_weight, cos, sin, offset=0, eps=1e-6):
    _check(q, k, cos, sin, offset)
    _check_norm_weights(q_weight, k_weight, q.shape[-1])
    return _empty_like_bthd(q), _empty_like_bthd(k)


def _check_qk_bwd(dqo, dko, q, k, q_weight, k_weight, cos, sin, offset) -> None:
    _check(q, k, cos, sin, offset)
    _check_grads(dqo, dko, q, k)
    _check_norm_weights(q_weight, k_weight, q.shape[-1])


@torch.library.custom_op("kernels::qk_norm_rope_bwd", mutates_args=())
def qk_norm_rope_bwd(
    dqo: torch.Tensor,
    dko: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    offset: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, d q_weight, d k_weight) of qk_norm_rope; weight gradients in the weights' dtypes."""
    _check_qk_bwd(dqo, dko, q, k, q_weight, k_weight, cos, sin, offset)
    return _qk_norm_rope_bwd(dqo, dko, q, k, q_weight, k_weight, cos, sin, offset, eps)


@qk_norm_rope_bwd.register_fake
def _(dqo, dko, q, k, q_weight, k_weight, cos, sin, offset, eps):
    _check_qk_bwd(dqo, dko, q, k, q_weight, k_weight, cos, sin, offset)
    return (_empty_like_bthd(q), _empty_like_bthd(k),
            torch.empty(q_weight.shape, dtype=q_weight.dtype, device=q_weight.device),
            torch.empty(k_weight.shape, dtype=k_weight.dtype, device=k_weight.device))


def _qk_setup_context(ctx, inputs, output) -> None:
    q, k, q_weight, k_weight, cos, sin, offset, eps = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
    ctx.offset, ctx.eps = offset, eps


def _qk_backward(ctx, dqo: torch.Tensor, dko: torch.Tensor):
    q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dq, dk, dwq, dwk = qk_norm_rope_bwd(dqo, dko, q, k, q_weight, k_weight, cos, sin, ctx.offset, ctx.eps)
    return dq, dk, dwq, dwk, None, None, None, None


qk_norm_rope.register_autograd(_qk_backward, setup_context=_qk_setup_context)
