"""Dropless routed-expert SwiGLU FFN: permute by expert, grouped GEMMs, weighted unpermute.

Between forward and backward the op keeps, per routed token, the pre-activations h (2 d_ff) and
the expert output y (d); the activation silu(gate) * up (d_ff) is not kept: the backward's dSwiGLU
GEMM recomputes it from h in its epilogue, bitwise as the forward computed it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import INTERPRET
from .swiglu import swiglu_reference


def moe_experts_reference(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """The definition, one expert at a time (readable, not fast).

    x (T, d); ids, weights (T, k); w13 (E, d, 2f) with gate in [..., :f] and up in [..., f:];
    w2 (E, f, d). Returns sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) as (T, d) in x's dtype;
    a slot whose id is outside [0, E) selects no expert and adds nothing.
    """
    check_moe_inputs(x, ids, weights, w13, w2)
    d_ff = w2.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for the ground truth
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    for expert in range(w13.shape[0]):
        token, slot = torch.where(ids == expert)
        h = x[token] @ w13[expert].to(x.dtype)  # (n, 2f)
        y = swiglu_reference(h[:, :d_ff], h[:, d_ff:]) @ w2[expert].to(x.dtype)  # (n, d)
        out = out.index_add(0, token, y.to(acc) * weights[token, slot, None].to(acc))
    return out.to(x.dtype)


def check_moe_inputs(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> None:
    """Raise a one-line ValueError unless the shapes and dtypes fit moe_experts' contract.

    Only metadata is read (no host sync): ids' values are not checked; both paths ignore
    slots whose id is outside [0, E).
    """
    if x.dim() != 2:
        raise ValueError(f"moe_experts: x must be 2-D (T, d), got shape {tuple(x.shape)}")
    num_tokens, d_model = x.shape
    if ids.dim() != 2 or ids.shape[0] != num_tokens:
        raise ValueError(f"moe_experts: ids must be (T={num_tokens}, k), got shape {tuple(ids.shape)}")
    if weights.shape != ids.shape:
        raise ValueError(f"moe_experts: weights must match ids' shape {tuple(ids.shape)}, got {tuple(weights.shape)}")
    if w13.dim() != 3 or w13.shape[1] != d_model or w13.shape[2] % 2:
        raise ValueError(f"moe_experts: w13 must be (E, d={d_model}, 2 * d_ff), got shape {tuple(w13.shape)}")
    expected_w2 = (w13.shape[0], w13.shape[2] // 2, d_model)
    if tuple(w2.shape) != expected_w2:
        raise ValueError(f"moe_experts: w2 must be (E, d_ff, d) = {expected_w2} to match w13 and x, "
                         f"got shape {tuple(w2.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_experts: ids must be int32 or int64, got {ids.dtype}")
    for name, t in (("x", x), ("weights", weights), ("w13", w13), ("w2", w2)):
        if not t.is_floating_point():
            raise ValueError(f"moe_experts: {name} must be floating point, got {t.dtype}")


# --------------------------------------------------------------------------------------------
# Triton kernels
#
# Layout: the T*k (token, slot) assignments are counting-sorted by expert once (stable, so
# each expert's rows stay in token order). `order[s]` is the assignment at sorted position s
# (token = order[s] // k), `pos[a]` its inverse, `offsets` (E + 1) each expert's first sorted
# position. The GEMMs read token rows through `order` (no permuted copy of x), every
# intermediate lives in sorted order, and the combine gathers each token's k rows back.
# --------------------------------------------------------------------------------------------


def _tile_configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """Configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


# fp32 tiles take twice the shared memory of 16-bit ones and go through FMA, not tensor cores:
# the 16-bit configs would exceed shared memory or spill, so fp32 operands get these instead.
_FP32_CONFIGS = _tile_configs([(64, 64, 32, 4, 2), (64, 64, 32, 4, 3)])


def _configs(two_accumulators: bool) -> list[triton.Config]:
    """Autotune candidates for the grouped GEMMs: 16-bit ones, then _FP32_CONFIGS (one small config
    under the interpreter). _keep_dtype_configs prunes them to those for the operands' dtype.

    Hopper bf16: 64-256-wide tiles, K steps of 64, 3-4 pipeline stages. The fused-SwiGLU GEMM
    holds two accumulators (gate and up), so its tiles stop at 128 x 128.
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
    if not two_accumulators:
        shapes = [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (64, 256, 64, 4, 4)]
    shapes += [(128, 64, 64, 8, 4), (64, 128, 64, 8, 4)]
    return _tile_configs(shapes) + _FP32_CONFIGS


def _keep_dtype_configs(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """Autotune pruning: _FP32_CONFIGS for fp32 operands (A's dtype), the 16-bit configs otherwise.

    The autotuner's cache key holds every tensor argument's dtype, so the two never share a choice.
    """
    fp32 = named_args["a_ptr"].dtype == torch.float32
    return [c for c in configs if (c in _FP32_CONFIGS) == fp32]


def _autotune(two_accumulators: bool, key: list[str]):
    """triton.autotune over _configs(two_accumulators), pruned by the operands' dtype."""
    return triton.autotune(configs=_configs(two_accumulators), key=key,
                           prune_configs_by={"early_config_prune": _keep_dtype_configs})


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b in fp32; UPCAST widens tiles first (the interpreter's bf16 dot is wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _load_ids(ids_ptr, a, num_assign, num_experts):
    """Expert ids of assignments `a`, -1 past the end and for any id outside [0, E) (never sorted)."""
    e = tl.load(ids_ptr + a, mask=a < num_assign, other=-1)
    return tl.where((e >= 0) & (e < num_experts), e, -1)


@triton.jit
def _moe_hist_kernel(
    ids_ptr,  # (S,) int32 expert id of each assignment (token-major: token * k + slot)
    hist_ptr,  # (num_blocks, E) int32 out: how many of this block's assignments go to each expert
    num_assign,  # S = T * k
    num_experts,  # E
    BLOCK_A: tl.constexpr,  # assignments per program
    E_PAD: tl.constexpr,  # next power of two >= E
):
    """Per-block expert histogram: the first pass of a stable, parallel counting sort."""
    pid = tl.program_id(0)
    a = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    experts = tl.arange(0, E_PAD)
    e = _load_ids(ids_ptr, a, num_assign, num_experts)
    hist = tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + pid * num_experts + experts, hist, mask=experts < num_experts)


@triton.jit
def _moe_scatter_kernel(
    ids_ptr,  # (S,) int32 expert id of each assignment
    start_ptr,  # (num_blocks, E) int32: sorted position of this block's first row for each expert
    order_ptr,  # (S,) int32 out: assignment index at each sorted position
    pos_ptr,  # (S,) int32 out: sorted position of each assignment (inverse of order), -1 for an invalid id
    num_assign,  # S = T * k
    num_experts,  # E
    BLOCK_A: tl.constexpr,  # assignments per program (same as the histogram pass)
    E_PAD: tl.constexpr,  # next power of two >= E
):
    """Second pass of the counting sort: rank within the block per expert, plus the block's start.

    An id outside [0, E) gets no sorted row (pos -1): it is in no expert's range, so no GEMM reads it.
    """
    pid = tl.program_id(0)
    a = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    experts = tl.arange(0, E_PAD)
    e = _load_ids(ids_ptr, a, num_assign, num_experts)
    routed = e >= 0
    onehot = (e[:, None] == experts[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # earlier same-expert rows in this block
    dest = tl.load(start_ptr + pid * num_experts + e, mask=routed, other=0) + rank
    tl.store(pos_ptr + a, tl.where(routed, dest, -1), mask=a < num_assign)
    tl.store(order_ptr + dest, a, mask=routed)


@triton.jit
def _grouped_mm_kernel(
    a_ptr,  # (rows, K) left operand; sorted row s reads row order[s] // TOP_K when GATHER_A, else row s
    b_ptr,  # (E, K, *) right operand per expert, read through strides (a transposed view works)
    c_ptr,  # out, contiguous, sorted order: (S, N) for ACT 0 and 1, (S, 2N) gate|up grads for ACT 2
    h_ptr,  # (S, 2N) pre-activations gate|up: written by ACT 1, read by ACT 2, unused by ACT 0
    act_ptr,  # (S, N) out for ACT 2: silu(gate) * up recomputed from h, bitwise ACT 1's C; unused otherwise
    order_ptr,  # (S,) int32 assignment index at each sorted position
    offsets_ptr,  # (E + 1,) int32 first sorted position of each expert, then S
    num_rows,  # S = T * k
    N,  # output columns (per half for ACT 1 and 2: B holds gate columns [0, N) and up columns [N, 2N))
    K,  # reduction length
    num_experts,  # E
    TOP_K,  # k: turns an assignment index into its token row
    stride_am,  # a stride between rows
    stride_ak,  # a stride between columns
    stride_be,  # b stride between experts
    stride_bk,  # b stride along the reduction
    stride_bn,  # b stride along the output columns
    ACT: tl.constexpr,  # 0: C = A@B; 1: H = A@B (gate|up), C = silu(gate) * up; 2: C = dSwiGLU(A@B, H), act
    GATHER_A: tl.constexpr,  # read A's rows through order (token rows of x) instead of sorted rows
    E_PAD: tl.constexpr,  # next power of two >= E
    UPCAST: tl.constexpr,  # widen tiles to fp32 before the dot (bf16 under the interpreter)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), "tf32" otherwise (no effect on 16-bit)
    BLOCK_M: tl.constexpr,  # sorted rows per tile; tiles never straddle two experts
    BLOCK_N: tl.constexpr,  # output columns per tile
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row tiles per swizzle group (L2 reuse of B)
):
    """Grouped GEMM over expert-sorted rows, with optional fused SwiGLU (fwd) or its gradient (bwd).

    Both epilogues compute silu(gate) * up in fp32 from h as stored (rounded to its dtype), so the
    activation the backward recomputes for dW2 is bitwise the one the forward fed the down GEMM.

    The grid is an upper bound, cdiv(S, BLOCK_M) + E row tiles times the column tiles: the tile
    table (each expert's tile count, prefix-summed) is rebuilt here from `offsets`, so the host
    never learns the counts, and programs past the last real tile exit at once.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M) + num_experts
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    experts = tl.arange(0, E_PAD)
    e_ok = experts < num_experts
    lo = tl.load(offsets_ptr + experts, mask=e_ok, other=0)
    hi = tl.load(offsets_ptr + experts + 1, mask=e_ok, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    if expert >= num_experts:
        return
    first_tile = tl.sum(tl.where(experts == expert, tile_end - tiles, 0), axis=0)
    rows = tl.load(offsets_ptr + expert) + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.load(offsets_ptr + expert + 1)
    if GATHER_A:
        src = tl.load(order_ptr + rows, mask=row_ok, other=0) // TOP_K
    else:
        src = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # only ACT 1 uses it
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & col_ok[None, :]
        acc = _dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), acc, UPCAST, DOT_PRECISION)
        if ACT == 1:
            acc_up = _dot(a, tl.load(b_ptrs + N * stride_bn, mask=b_mask, other=0.0), acc_up, UPCAST, DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = row_ok[:, None] & col_ok[None, :]
    out_rows = rows[:, None].to(tl.int64)
    if ACT == 0:
        tl.store(c_ptr + out_rows * N + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)
    elif ACT == 1:
        h_ptrs = h_ptr + out_rows * (2 * N) + cols[None, :]
        gate = acc.to(h_ptr.dtype.element_ty)
        up = acc_up.to(h_ptr.dtype.element_ty)
        tl.store(h_ptrs, gate, mask=mask)
        tl.store(h_ptrs + N, up, mask=mask)
        gate = gate.to(tl.float32)  # from the stored h, as ACT 2 recomputes it
        act = gate * tl.sigmoid(gate) * up.to(tl.float32)
        tl.store(c_ptr + out_rows * N + cols[None, :], act.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        h_ptrs = h_ptr + out_rows * (2 * N) + cols[None, :]
        gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptrs + N, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        dgate = acc * up * sig * (1.0 + gate * (1.0 - sig))
        dup = acc * gate * sig
        c_ptrs = c_ptr + out_rows * (2 * N) + cols[None, :]
        tl.store(c_ptrs, dgate.to(c_ptr.dtype.element_ty), mask=mask)
        tl.store(c_ptrs + N, dup.to(c_ptr.dtype.element_ty), mask=mask)
        act = gate * sig * up  # ACT 1's expression on the same h: the forward's activation, not saved
        tl.store(act_ptr + out_rows * N + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,  # (rows, M) left operand, used transposed; sorted row s reads row order[s] // TOP_K when GATHER_A
    b_ptr,  # (S, N) right operand in sorted order, contiguous
    c_ptr,  # (E, M, N) out, contiguous: C[e] = A_e^T @ B_e over expert e's sorted rows (zero if none)
    order_ptr,  # (S,) int32 assignment index at each sorted position
    offsets_ptr,  # (E + 1,) int32 first sorted position of each expert, then S
    M,  # output rows (the weight's input dim)
    N,  # output columns (the weight's output dim)
    TOP_K,  # k: turns an assignment index into its token row
    stride_am,  # a stride between rows
    stride_ak,  # a stride between columns
    GATHER_A: tl.constexpr,  # read A's rows through order (token rows of x) instead of sorted rows
    UPCAST: tl.constexpr,  # widen tiles to fp32 before the dot (bf16 under the interpreter)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, "tf32" otherwise
    BLOCK_M: tl.constexpr,  # output rows per tile
    BLOCK_N: tl.constexpr,  # output columns per tile
    BLOCK_K: tl.constexpr,  # sorted rows (tokens) per reduction step
    GROUP_M: tl.constexpr,  # row tiles per swizzle group
):
    """Per-expert weight gradient, a reduction over that expert's tokens; no atomics, deterministic."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    expert = pid // (num_pid_m * num_pid_n)
    local = pid % (num_pid_m * num_pid_n)
    group = GROUP_M * num_pid_n
    first_m = (local // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (local % group) % group_m
    pid_n = (local % group) // group_m

    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_K):
        s = s0 + tl.arange(0, BLOCK_K)
        s_ok = s < hi
        if GATHER_A:
            src = tl.load(order_ptr + s, mask=s_ok, other=0) // TOP_K
        else:
            src = s
        a = tl.load(a_ptr + src[None, :].to(tl.int64) * stride_am + ms[:, None] * stride_ak,
                    mask=m_ok[:, None] & s_ok[None, :], other=0.0)
        b = tl.load(b_ptr + s[:, None].to(tl.int64) * N + ns[None, :], mask=s_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, UPCAST, DOT_PRECISION)
    c_ptrs = c_ptr + expert.to(tl.int64) * M * N + ms[:, None] * N + ns[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_combine_kernel(
    y_ptr,  # (S, D) rows in sorted order, contiguous
    pos_ptr,  # (T * k,) int32 sorted position of each assignment, -1 for one that adds nothing
    weights_ptr,  # (T * k,) router weights (any float dtype); unused without HAS_WEIGHTS
    out_ptr,  # (T, D) out, contiguous: sum over the k slots, accumulated in fp32 in slot order
    D,  # row width
    TOP_K,  # k
    HAS_WEIGHTS: tl.constexpr,  # scale each gathered row by its router weight (forward) or not (dx)
    BLOCK_D: tl.constexpr,  # columns per program
):
    """Unpermute: gather each token's k rows and sum them; deterministic, no atomics."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(TOP_K):
        s = tl.load(pos_ptr + token * TOP_K + j).to(tl.int64)
        row = tl.load(y_ptr + s * D + cols, mask=ok & (s >= 0), other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            row *= tl.load(weights_ptr + token * TOP_K + j).to(tl.float32)
        acc += row
    tl.store(out_ptr + token * D + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _moe_combine_bwd_kernel(
    dout_ptr,  # (T, D) gradient of the layer output, contiguous
    y_ptr,  # (S, D) expert outputs before weighting, sorted order (saved by the forward)
    pos_ptr,  # (T * k,) int32 sorted position of each assignment, -1 for one that adds nothing
    weights_ptr,  # (T * k,) router weights
    dy_ptr,  # (S, D) out: weights * dout gathered into sorted order (the down GEMM's output grad)
    dweights_ptr,  # (T * k,) out: <dout[token], y[s]> in the weights' dtype
    D,  # row width
    TOP_K,  # k
    BLOCK_D: tl.constexpr,  # columns per step
):
    """Backward of the combine, one program per assignment: scatter dout into sorted order and d(weights)
    (0 for an assignment without a sorted row)."""
    assign = tl.program_id(0).to(tl.int64)
    token = assign // TOP_K
    s = tl.load(pos_ptr + assign).to(tl.int64)
    w = tl.load(weights_ptr + assign).to(tl.float32)
    dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = (cols < D) & (s >= 0)
        g = tl.load(dout_ptr + token * D + cols, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + s * D + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(dy_ptr + s * D + cols, (w * g).to(dy_ptr.dtype.element_ty), mask=ok)
        dot += g * y
    tl.store(dweights_ptr + assign, tl.sum(dot, axis=0).to(dweights_ptr.dtype.element_ty))


_mm_plain = _autotune(False, key=["N", "K", "ACT", "GATHER_A"])(_grouped_mm_kernel)
_mm_swiglu = _autotune(True, key=["N", "K", "ACT", "GATHER_A"])(_grouped_mm_kernel)
_wgrad = _autotune(False, key=["M", "N", "GATHER_A"])(_grouped_wgrad_kernel)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _dot_flags(dtype: torch.dtype) -> dict[str, object]:
    """The dot's constexprs for `dtype`: fp32 stays IEEE (the correctness rule has no room for TF32),
    and bf16 tiles are widened under the interpreter, whose bf16 dot is wrong."""
    return {"UPCAST": INTERPRET and dtype == torch.bfloat16,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable counting sort of flat expert ids (S,) int32 -> (order, pos, offsets), all int32 on device.

    order[s]: assignment at sorted position s; pos: its inverse; offsets (E + 1,): expert starts.
    An id outside [0, E) is left out of the sort: pos -1, and offsets[E] counts only valid ids.
    """
    num_assign = ids.numel()
    e_pad = triton.next_power_of_2(num_experts)
    block_a = max(16, min(1024, 8192 // e_pad))
    num_blocks = triton.cdiv(num_assign, block_a)
    hist = torch.empty(num_blocks, num_experts, dtype=torch.int32, device=ids.device)
    _moe_hist_kernel[(num_blocks,)](ids, hist, num_assign, num_experts, BLOCK_A=block_a, E_PAD=e_pad)
    ends = hist.sum(0, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    offsets = torch.cat([ends.new_zeros(1), ends])
    start = hist.cumsum(0, dtype=torch.int32) - hist + offsets[:-1]
    order = torch.empty(num_assign, dtype=torch.int32, device=ids.device)
    pos = torch.empty_like(order)
    _moe_scatter_kernel[(num_blocks,)](ids, start, order, pos, num_assign, num_experts, BLOCK_A=block_a, E_PAD=e_pad)
    return order, pos, offsets


def grouped_mm(a: torch.Tensor, b: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, top_k: int,
               gather: bool, act: int = 0, h: torch.Tensor | None = None, transpose_b: bool = False,
               act_out: torch.Tensor | None = None) -> torch.Tensor:
    """out[s] = a[row(s)] @ b[expert(s)] for sorted rows s (row(s) = order[s] // top_k when `gather`).

    b is (E, K, N), or (E, N, K) used transposed when `transpose_b`. act 1 treats b's columns as
    gate|up halves and returns silu(gate) * up, writing the pre-activations into h (S, 2 * N/2);
    act 2 returns dSwiGLU of the product given the saved h, as (S, 2N), and writes silu(gate) * up
    recomputed from h (bitwise act 1's output) into act_out (S, N), which it requires.
    """
    if act == 2 and act_out is None:
        raise ValueError("grouped_mm: act=2 needs act_out, the (S, N) buffer for the recomputed activation")
    num_rows = order.numel()
    num_experts = b.shape[0]
    stride_be, stride_bk, stride_bn = b.stride(0), b.stride(1), b.stride(2)
    K, N = b.shape[1], b.shape[2]
    if transpose_b:
        stride_bk, stride_bn, K, N = stride_bn, stride_bk, N, K
    if act == 1:
        N //= 2
    out = torch.empty(num_rows, 2 * N if act == 2 else N, dtype=a.dtype, device=a.device)
    kernel = _mm_swiglu if act == 1 else _mm_plain
    grid = lambda meta: ((triton.cdiv(num_rows, meta["BLOCK_M"]) + num_experts) * triton.cdiv(N, meta["BLOCK_N"]),)
    kernel[grid](
        a, b, out, out if h is None else h, out if act_out is None else act_out,
        order, offsets, num_rows, N, K, num_experts, top_k,
        a.stride(0), a.stride(1), stride_be, stride_bk, stride_bn,
        ACT=act, GATHER_A=gather, E_PAD=triton.next_power_of_2(num_experts), **_dot_flags(a.dtype),
    )
    return out


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, top_k: int,
                  gather: bool, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """(E, M, N) in `dtype`: per expert, a[row(s)]^T @ b[s] summed over that expert's sorted rows s."""
    M, N = a.shape[1], b.shape[1]
    out = torch.empty(num_experts, M, N, dtype=dtype, device=a.device)
    grid = lambda meta: (num_experts * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _wgrad[grid](a, b, out, order, offsets, M, N, top_k, a.stride(0), a.stride(1),
                 GATHER_A=gather, **_dot_flags(a.dtype))
    return out


def _combine(rows: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None, num_tokens: int,
             top_k: int) -> torch.Tensor:
    """(T, D): each token's k sorted rows gathered and summed (scaled by `weights` when given)."""
    width = rows.shape[1]
    out = torch.empty(num_tokens, width, dtype=rows.dtype, device=rows.device)
    block_d = min(1024, triton.next_power_of_2(width))
    _moe_combine_kernel[(num_tokens, triton.cdiv(width, block_d))](
        rows, pos, rows if weights is None else weights, out, width, top_k,
        HAS_WEIGHTS=weights is not None, BLOCK_D=block_d,
    )
    return out


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------

_Saved = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("kernels::moe_experts", mutates_args=())
def _moe_experts_op(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor) -> _Saved:
    """The Triton forward. Returns (out, h, y, order, pos, offsets): the output and, for the backward,
    the sorted pre-activations, expert outputs and the sort itself. The activations are dropped once
    the down GEMM has read them (the backward recomputes them from h): d_ff elements per routed token."""
    num_tokens, top_k = ids.shape
    num_experts = w13.shape[0]
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    order, pos, offsets = sort_by_expert(ids.to(torch.int32).contiguous().view(-1), num_experts)
    h = torch.empty(order.numel(), w13.shape[2], dtype=x.dtype, device=x.device)
    act = grouped_mm(x, w13, order, offsets, top_k, gather=True, act=1, h=h)  # gate+up GEMM, SwiGLU epilogue
    y = grouped_mm(act, w2, order, offsets, top_k, gather=False)  # down GEMM; act is freed on return
    out = _combine(y, pos, weights.contiguous().view(-1), num_tokens, top_k)
    return out, h, y, order, pos, offsets


@_moe_experts_op.register_fake
def _(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> _Saved:
    num_rows = ids.numel()
    d_ff = w2.shape[1]
    return (x.new_empty(x.shape), x.new_empty(num_rows, 2 * d_ff), x.new_empty(num_rows, x.shape[1]),
            ids.new_empty(num_rows, dtype=torch.int32), ids.new_empty(num_rows, dtype=torch.int32),
            ids.new_empty(w13.shape[0] + 1, dtype=torch.int32))


@torch.library.custom_op("kernels::moe_experts_bwd", mutates_args=())
def _moe_experts_bwd_op(dout: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                        w2: torch.Tensor, h: torch.Tensor, y: torch.Tensor, order: torch.Tensor,
                        pos: torch.Tensor, offsets: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton backward: (dx, dweights, dw13, dw2), each in its input's dtype. The dSwiGLU GEMM
    also recomputes the activations from h for dW2; they live only until dW2 is done."""
    num_tokens, top_k = weights.shape
    num_rows, width = y.shape
    num_experts = w13.shape[0]
    dout = dout.to(x.dtype).contiguous()
    dy = torch.empty_like(y)
    dweights = torch.empty(num_tokens, top_k, dtype=weights.dtype, device=weights.device)
    _moe_combine_bwd_kernel[(num_rows,)](dout, y, pos, weights.contiguous(), dy, dweights, width, top_k,
                                         BLOCK_D=min(1024, triton.next_power_of_2(width)))
    w13c, w2c = w13.to(x.dtype), w2.to(x.dtype)
    act = torch.empty(num_rows, w2.shape[1], dtype=x.dtype, device=x.device)  # silu(gate) * up, filled below
    dh = grouped_mm(dy, w2c, order, offsets, top_k, gather=False, act=2, h=h, transpose_b=True, act_out=act)
    dw2 = grouped_wgrad(act, dy, order, offsets, top_k, False, num_experts, w2.dtype)
    del act, dy  # free (S, d_ff) and (S, d) before the dW13 and dx GEMMs
    dw13 = grouped_wgrad(x, dh, order, offsets, top_k, True, num_experts, w13.dtype)
    dx_sorted = grouped_mm(dh, w13c, order, offsets, top_k, gather=False, transpose_b=True)
    dx = _combine(dx_sorted, pos, None, num_tokens, top_k)
    return dx, dweights, dw13, dw2


@_moe_experts_bwd_op.register_fake
def _(dout: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
      h: torch.Tensor, y: torch.Tensor, order: torch.Tensor, pos: torch.Tensor,
      offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (x.new_empty(x.shape), weights.new_empty(weights.shape), w13.new_empty(w13.shape),
            w2.new_empty(w2.shape))


def _setup_context(ctx, inputs, output) -> None:
    """Save the inputs and the forward's sorted intermediates (h, y and the sort; not the activations,
    which the backward recomputes from h); only `out` is differentiable."""
    x, _, weights, w13, w2 = inputs
    _, h, y, order, pos, offsets = output
    ctx.mark_non_differentiable(h, y, order, pos, offsets)
    ctx.save_for_backward(x, weights, w13, w2, h, y, order, pos, offsets)


def _backward(ctx, dout, *_):
    """Gradients of x, weights, w13, w2 (ids has none) from the output's gradient alone."""
    dx, dweights, dw13, dw2 = _moe_experts_bwd_op(dout, *ctx.saved_tensors)
    return dx, None, dweights, dw13, dw2


_moe_experts_op.register_autograd(_backward, setup_context=_setup_context)


def moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """Triton `moe_experts`: sort once, gate+up grouped GEMM with fused SwiGLU, down grouped GEMM,
    weighted gather-combine. Differentiable in x, weights, w13 and w2; output in x's dtype."""
    check_moe_inputs(x, ids, weights, w13, w2)
    return _moe_experts_op(x, ids, weights, w13, w2)[0]
