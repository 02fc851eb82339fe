"""Dropless routed-expert SwiGLU FFN: permute by expert, grouped GEMMs, weighted unpermute.

Between forward and backward the op keeps, per routed token, the pre-activations h (2 d_ff) and
the expert output y (d); the activation silu(gate) * up (d_ff) is not kept: the backward's dSwiGLU
GEMM recomputes it from h in its epilogue, bitwise as the forward computed it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton_utils import INTERPRET
from .glu import silu_mul, silu_mul_grad, swiglu_reference


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


# The grouped GEMM's epilogues (its EPILOGUE constexpr).
PLAIN = tl.constexpr(0)  # C = A @ B
SWIGLU = tl.constexpr(1)  # H = A @ B as gate|up halves, C = silu(gate) * up
DSWIGLU = tl.constexpr(2)  # C = dSwiGLU(A @ B, H) as dgate|dup, and silu(gate) * up recomputed from H

# 16-bit tiles per GEMM role, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): Hopper-sized, K steps
# of 64, 3-4 stages. Each list holds only tiles whose epilogue fits the registers on sm_90 without
# spilling (`python -m bench.audit` checks it): gate_up keeps two accumulators (gate and up), and
# down_dgrad reads h and writes dgate, dup and the activation, so both stop at 128 x 128.
_ROLE_TILES: dict[str, list[tuple[int, int, int, int, int]]] = {
    "gate_up": [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 8, 4),
                (64, 128, 64, 8, 4)],
    "down": [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (64, 256, 64, 4, 4),
             (128, 64, 64, 8, 4), (64, 128, 64, 8, 4)],
    "down_dgrad": [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 64, 8, 4),
                   (64, 128, 64, 8, 4)],
    "gate_up_dgrad": [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (64, 256, 64, 4, 4),
                      (128, 64, 64, 8, 4), (64, 128, 64, 8, 4)],
    "w13_grad": [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (64, 256, 64, 4, 4),
                 (128, 64, 64, 8, 4), (64, 128, 64, 8, 4)],
    "w2_grad": [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (64, 256, 64, 4, 4),
                (128, 64, 64, 8, 4), (64, 128, 64, 8, 4)],
}
# Tiles that spill registers on Ampere (sm_80), where the accumulators live in the register file
# with no wgmma to feed from shared memory: tuned over only from Hopper (sm_90) on.
_HOPPER_ONLY: dict[str, set[tuple[int, int, int, int, int]]] = {
    "gate_up": {(128, 128, 64, 8, 3), (128, 64, 64, 4, 4)},
    "down": {(128, 128, 64, 4, 4), (64, 256, 64, 4, 4)},
    "gate_up_dgrad": {(128, 128, 64, 4, 4), (64, 256, 64, 4, 4)},
}
# The GPU generation pruning assumes when the operands are not on a CUDA device (bench.audit sets it).
NO_GPU_CAPABILITY = (9, 0)
# fp32 tiles take twice the shared memory of 16-bit ones and go through FMA, not tensor cores;
# gate_up's two fp32 accumulators need 8 warps' registers (4 warps spill on sm_80).
_FP32_TILES = [(64, 64, 32, 4, 2), (64, 64, 32, 4, 3)]
_FP32_ROLE_TILES = {"gate_up": [(64, 64, 32, 8, 2), (64, 64, 32, 8, 3)]}
# The interpreter times nothing and runs programs one by one: one small tile, in the variants named
# here ("pointer": cp.async-style loads; "tma": persistent with TMA descriptors). Tests set it to force one.
_INTERPRETER_TILE = (32, 32, 32, 4, 1)
INTERPRETER_VARIANTS = ("pointer",)
_WIDEST_TILE_N = 256  # the widest BLOCK_N any weight-gradient config uses: sizes the reduction split


_MM_ROLES = ("gate_up", "down", "down_dgrad", "gate_up_dgrad")  # the grouped-GEMM kernel's roles (not wgrad)


def _config(tile: tuple[int, int, int, int, int], kind: str, min_capability: tuple[int, int] = (8, 0),
            tma: bool = False, permute: bool | None = None) -> triton.Config:
    """One candidate; permute None for the weight-gradient kernel, which has no PERMUTE_A."""
    bm, bn, bk, warps, stages = tile
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "USE_TMA": tma}
    if permute is not None:
        meta["PERMUTE_A"] = permute
    config = triton.Config(meta, num_warps=warps, num_stages=stages, pre_hook=_permute_rows if permute else None)
    config.kind = kind  # "16-bit", "fp32" or "interpreter": which operands the config is for
    config.min_capability = (9, 0) if tma else min_capability  # the oldest GPU generation it suits
    return config


def role_configs(role: str) -> list[triton.Config]:
    """Every autotune candidate of a GEMM role, built the same with or without a GPU: the role's 16-bit
    tiles (each also as a TMA variant on Hopper, for the roles that have one), the fp32 tiles, and the
    interpreter's one tile (in each variant)."""
    hopper_only = _HOPPER_ONLY.get(role, set())
    no_permute = False if role in _MM_ROLES else None
    permuted = role == "gate_up"  # the one GEMM that gathers its A rows
    return ([_config(t, "16-bit", (9, 0) if t in hopper_only else (8, 0), tma, no_permute) for tma in (False, True)
             for t in _ROLE_TILES[role]]
            + [_config(t, "16-bit", tma=True, permute=True) for t in _ROLE_TILES[role] if permuted]
            + [_config(t, "fp32", permute=no_permute) for t in _FP32_ROLE_TILES.get(role, _FP32_TILES)]
            + [_config(_INTERPRETER_TILE, "interpreter", tma=tma, permute=no_permute) for tma in (False, True)]
            + [_config(_INTERPRETER_TILE, "interpreter", tma=True, permute=True) for _ in range(permuted)])


def _permute_rows(nargs: dict) -> None:
    """Pre-hook of the permuted-A configs: x's token rows copied into expert-sorted order, once per launch
    (the autotuner times it with the kernel, so the permute pays for itself or the config loses)."""
    rows = nargs["order_ptr"].long() // nargs["TOP_K"]
    torch.index_select(nargs["a_ptr"], 0, rows, out=nargs["a_sorted_ptr"])


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else NO_GPU_CAPABILITY


def _keep_dtype_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune pruning: the interpreter's tile (in INTERPRETER_VARIANTS) under the interpreter; on a GPU
    the fp32 tiles for fp32 operands (A's dtype) and otherwise the 16-bit tiles that suit the GPU's
    generation, TMA variants only from Hopper on and where the operands' layout allows them.

    The autotuner's cache key holds every tensor argument's dtype, so the two never share a choice.
    """
    a = named_args["a_ptr"]
    tma_ok = _tma_fits(named_args, kwargs)
    permute_ok = "a_sorted_ptr" in named_args and named_args["a_sorted_ptr"] is not a  # a buffer was given
    fits = lambda c: (tma_ok or not c.kwargs.get("USE_TMA", False)) and (permute_ok or _variant(c) != "tma-permuted")
    if INTERPRET:
        interpreted = [c for c in configs if c.kind == "interpreter"]
        wanted = [c for c in interpreted if _variant(c) in INTERPRETER_VARIANTS and fits(c)]
        return wanted or [c for c in interpreted if _variant(c) == "pointer"]
    kind = "fp32" if a.dtype == torch.float32 else "16-bit"
    capability = _capability(a.device)
    return [c for c in configs if c.kind == kind and c.min_capability <= capability and fits(c)]


def _variant(config: triton.Config) -> str:
    """"pointer", "tma" or "tma-permuted": how a grouped-GEMM config reads its operands."""
    if not config.kwargs.get("USE_TMA", False):
        return "pointer"
    return "tma-permuted" if config.kwargs.get("PERMUTE_A", False) else "tma"


def _tma_fits(named_args: dict, kwargs: dict) -> bool:
    """Whether TMA descriptors can address the operands: 16-byte aligned bases and leading strides,
    a contiguous last dim (for A only when it is not gathered)."""
    a, b = named_args["a_ptr"], named_args["b_ptr"]
    wgrad = "num_splits" in named_args  # the weight-gradient kernel reads only B by TMA
    tensors = [b] if kwargs.get("GATHER_A") or wgrad else [a, b]
    if kwargs.get("GATHER_A") and named_args.get("a_sorted_ptr") is not None:
        tensors.append(named_args["a_sorted_ptr"])  # what the permuted variant reads by TMA
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(stride * t.element_size() % 16 == 0 for stride in t.stride()[:-1]) for t in tensors)


def _autotune(kernel, role: str, key: list[str]):
    """kernel under triton.autotune over role_configs(role), pruned by the operands' dtype."""
    return triton.autotune(configs=role_configs(role), key=key,
                           prune_configs_by={"early_config_prune": _keep_dtype_configs})(kernel)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b in fp32; UPCAST widens tiles first (the interpreter's bf16 dot is wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _swizzle(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of linear tile index `tile`, GROUP_M row tiles at a time, so that
    programs running together share B's column tiles in L2 (the Triton matmul tutorial's order)."""
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % group) % group_m, (tile % group) // group_m


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
def _load_b(b_src, b_base, b_offs, b_mask, expert, k0, n0, shift, stride_bn, USE_TMA: tl.constexpr,
            B_TRANSPOSED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """B[expert][k0:k0+BK, shift+n0:shift+n0+BN]: one TMA copy through the (E, ., .) descriptor b_src, or
    masked pointer loads from b_base (the expert's B at reduction step k0)."""
    if USE_TMA:
        if B_TRANSPOSED:  # memory (E, N, K), K contiguous: load (BN, BK) and transpose
            b = tl.trans(b_src.load([expert, shift + n0, k0]).reshape(BLOCK_N, BLOCK_K))
        else:
            b = b_src.load([expert, k0, shift + n0]).reshape(BLOCK_K, BLOCK_N)
    else:
        b = tl.load(b_base + shift * stride_bn + b_offs, mask=b_mask, other=0.0)
    return b


@triton.jit
def _mm_tile(
    pid_m, pid_n, a_src, b_src, c_ptr, h_ptr, act_ptr, order_ptr, offsets_ptr, experts, tiles, tile_end,
    N, K, num_experts, stride_am, stride_ak, stride_be, stride_bk, stride_bn,
    TOP_K: tl.constexpr, EPILOGUE: tl.constexpr, GATHER_A: tl.constexpr, EVEN_K: tl.constexpr,
    INDEX_64: tl.constexpr, USE_TMA: tl.constexpr, B_TRANSPOSED: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (row tile, column tile) of the grouped GEMM and its epilogue; nothing past the last expert's tiles.

    a_src and b_src are pointers, or TMA descriptors under USE_TMA (A only when it is not gathered).
    """
    expert = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)
    if expert < num_experts:
        first_tile = tl.sum(tl.where(experts == expert, tile_end - tiles, 0), axis=0)
        row0 = tl.load(offsets_ptr + expert) + (pid_m - first_tile) * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < tl.load(offsets_ptr + expert + 1)
        n0 = pid_n * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        if GATHER_A:
            src = tl.load(order_ptr + rows, mask=row_ok, other=0) // TOP_K
        else:
            src = rows
        if INDEX_64:
            src = src.to(tl.int64)
        a_offs = src[:, None] * stride_am + ks[None, :] * stride_ak
        b_offs = ks[:, None] * stride_bk + cols[None, :] * stride_bn
        b_base = b_src
        if not USE_TMA:
            b_base = b_src + expert.to(tl.int64) * stride_be
        a_ptr = a_src

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # only SWIGLU uses it
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a_mask = row_ok[:, None]
                b_mask = col_ok[None, :]
            else:
                k_ok = ks < K - k0
                a_mask = row_ok[:, None] & k_ok[None, :]
                b_mask = k_ok[:, None] & col_ok[None, :]
            if USE_TMA and not GATHER_A:
                a = a_src.load([row0, k0])  # rows past the expert are read but never stored
            else:
                a = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0)
                a_ptr += BLOCK_K * stride_ak
            b = _load_b(b_src, b_base, b_offs, b_mask, expert, k0, n0, 0, stride_bn, USE_TMA, B_TRANSPOSED,
                        BLOCK_K, BLOCK_N)
            acc = _dot(a, b, acc, UPCAST, DOT_PRECISION)
            if EPILOGUE == SWIGLU:  # the up half: B's columns N.. 2N
                b_up = _load_b(b_src, b_base, b_offs, b_mask, expert, k0, n0, N, stride_bn, USE_TMA, B_TRANSPOSED,
                               BLOCK_K, BLOCK_N)
                acc_up = _dot(a, b_up, acc_up, UPCAST, DOT_PRECISION)
            if not USE_TMA:
                b_base += BLOCK_K * stride_bk

        mask = row_ok[:, None] & col_ok[None, :]
        out_rows = rows[:, None].to(tl.int64)
        if EPILOGUE == PLAIN:
            tl.store(c_ptr + out_rows * N + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)
        elif EPILOGUE == SWIGLU:
            h_ptrs = h_ptr + out_rows * (2 * N) + cols[None, :]
            gate = acc.to(h_ptr.dtype.element_ty)
            up = acc_up.to(h_ptr.dtype.element_ty)
            tl.store(h_ptrs, gate, mask=mask)
            tl.store(h_ptrs + N, up, mask=mask)
            act = silu_mul(gate.to(tl.float32), up.to(tl.float32))  # from h as stored, as DSWIGLU recomputes it
            tl.store(c_ptr + out_rows * N + cols[None, :], act.to(c_ptr.dtype.element_ty), mask=mask)
        else:
            h_ptrs = h_ptr + out_rows * (2 * N) + cols[None, :]
            gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(h_ptrs + N, mask=mask, other=0.0).to(tl.float32)
            dgate, dup = silu_mul_grad(gate, up, acc)
            c_ptrs = c_ptr + out_rows * (2 * N) + cols[None, :]
            tl.store(c_ptrs, dgate.to(c_ptr.dtype.element_ty), mask=mask)
            tl.store(c_ptrs + N, dup.to(c_ptr.dtype.element_ty), mask=mask)
            act = silu_mul(gate, up)  # SWIGLU's expression on the same h: the forward's activation, not saved
            tl.store(act_ptr + out_rows * N + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_mm_kernel(
    a_ptr,  # (S or T, K) left operand; sorted row s reads row order[s] // TOP_K when GATHER_A, else row s
    a_sorted_ptr,  # (S, K) contiguous: A's gathered rows in sorted order, filled by a pre-hook under PERMUTE_A
    b_ptr,  # (E, K, *) right operand per expert, read through strides; (E, *, K) in memory when B_TRANSPOSED
    c_ptr,  # out, contiguous, sorted order: (S, N) for PLAIN and SWIGLU, (S, 2N) dgate|dup for DSWIGLU
    h_ptr,  # (S, 2N) pre-activations gate|up: written by SWIGLU, read by DSWIGLU, unused by PLAIN
    act_ptr,  # (S, N) out for DSWIGLU: silu(gate) * up recomputed from h, bitwise SWIGLU's C; unused otherwise
    order_ptr,  # (S,) int32 assignment index at each sorted position
    offsets_ptr,  # (E + 1,) int32 first sorted position of each expert, then S
    num_rows,  # S = T * k
    N,  # output columns (per half for SWIGLU and DSWIGLU: B holds gate columns [0, N) and up columns [N, 2N))
    K,  # reduction length
    num_experts,  # E
    stride_am,  # a stride between rows
    stride_ak,  # a stride between columns
    stride_be,  # b stride between experts
    stride_bk,  # b stride along the reduction
    stride_bn,  # b stride along the output columns
    TOP_K: tl.constexpr,  # k: turns an assignment index into its token row (a shift for k = 2)
    EPILOGUE: tl.constexpr,  # PLAIN, SWIGLU or DSWIGLU
    GATHER_A: tl.constexpr,  # read A's rows through order (token rows of x) instead of sorted rows
    B_TRANSPOSED: tl.constexpr,  # B is used transposed: its reduction dim is the contiguous one
    E_PAD: tl.constexpr,  # next power of two >= E
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no reduction mask in the main loop
    INDEX_64: tl.constexpr,  # an operand has 2^31 elements or more: 64-bit tile offsets
    USE_TMA: tl.constexpr,  # Hopper: persistent programs, B (and A unless gathered) through TMA descriptors
    PERMUTE_A: tl.constexpr,  # with GATHER_A and USE_TMA: read a_sorted (A permuted once) by TMA instead of gathering
    UPCAST: tl.constexpr,  # widen tiles to fp32 before the dot (bf16 under the interpreter)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), "tf32" otherwise (no effect on 16-bit)
    BLOCK_M: tl.constexpr,  # sorted rows per tile; tiles never straddle two experts
    BLOCK_N: tl.constexpr,  # output columns per tile
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row tiles per swizzle group (L2 reuse of B)
):
    """Grouped GEMM over expert-sorted rows, with optional fused SwiGLU (fwd) or its gradient (bwd).

    Both SwiGLU epilogues compute silu(gate) * up in fp32 from h as stored (rounded to its dtype), so
    the activation the backward recomputes for dW2 is bitwise the one the forward fed the down GEMM.

    The tile table (each expert's row-tile count, prefix-summed) is rebuilt here from `offsets`, so the
    host never learns the counts. Without USE_TMA each program takes one tile of an upper-bound grid,
    cdiv(S, BLOCK_M) + E row tiles times the column tiles, and programs past the last real tile exit at
    once; the main loop moves scalar base pointers over fixed (32-bit unless INDEX_64) tile offsets,
    unmasked on K when EVEN_K. With USE_TMA a grid of about one program per SM walks the real tiles
    (persistent), B comes in by TMA copies from a 3-D (E, ., .) descriptor (zero past each expert's
    K and N), and so does A when it is not gathered.
    """
    experts = tl.arange(0, E_PAD)
    e_ok = experts < num_experts
    lo = tl.load(offsets_ptr + experts, mask=e_ok, other=0)
    hi = tl.load(offsets_ptr + experts + 1, mask=e_ok, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if USE_TMA:
        n_total = 2 * N if EPILOGUE == SWIGLU else N
        if B_TRANSPOSED:
            b_src = tl.make_tensor_descriptor(b_ptr, [num_experts, n_total, K], [stride_be, stride_bn, 1],
                                              [1, BLOCK_N, BLOCK_K])
        else:
            b_src = tl.make_tensor_descriptor(b_ptr, [num_experts, K, n_total], [stride_be, stride_bk, 1],
                                              [1, BLOCK_K, BLOCK_N])
        if PERMUTE_A:
            a_src = tl.make_tensor_descriptor(a_sorted_ptr, [num_rows, K], [K, 1], [BLOCK_M, BLOCK_K])
        elif GATHER_A:
            a_src = a_ptr
        else:
            a_src = tl.make_tensor_descriptor(a_ptr, [num_rows, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
        num_pid_m = tl.sum(tiles, axis=0)
        for tile in range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
            pid_m, pid_n = _swizzle(tile, num_pid_m, num_pid_n, GROUP_M)
            _mm_tile(pid_m, pid_n, a_src, b_src, c_ptr, h_ptr, act_ptr, order_ptr, offsets_ptr, experts, tiles,
                     tile_end, N, K, num_experts, stride_am, stride_ak, stride_be, stride_bk, stride_bn,
                     TOP_K, EPILOGUE, GATHER_A and not PERMUTE_A, EVEN_K, INDEX_64, USE_TMA, B_TRANSPOSED, UPCAST,
                     DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        num_pid_m = tl.cdiv(num_rows, BLOCK_M) + num_experts
        pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
        _mm_tile(pid_m, pid_n, a_ptr, b_ptr, c_ptr, h_ptr, act_ptr, order_ptr, offsets_ptr, experts, tiles,
                 tile_end, N, K, num_experts, stride_am, stride_ak, stride_be, stride_bk, stride_bn,
                 TOP_K, EPILOGUE, GATHER_A, EVEN_K, INDEX_64, USE_TMA, B_TRANSPOSED, UPCAST, DOT_PRECISION,
                 BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,  # (rows, M) left operand, used transposed; sorted row s reads row order[s] // TOP_K when GATHER_A
    b_ptr,  # (S, N) right operand in sorted order, contiguous
    c_ptr,  # (E, num_splits, M, N) out, contiguous: split j of C[e] = A_e^T @ B_e (zero if no rows)
    order_ptr,  # (S,) int32 assignment index at each sorted position
    offsets_ptr,  # (E + 1,) int32 first sorted position of each expert, then S
    num_rows,  # S
    M,  # output rows (the weight's input dim)
    N,  # output columns (the weight's output dim)
    num_splits,  # parts each expert's rows are split into (partial sums, added up afterwards)
    stride_am,  # a stride between rows
    stride_ak,  # a stride between columns
    TOP_K: tl.constexpr,  # k: turns an assignment index into its token row (a shift for k = 2)
    GATHER_A: tl.constexpr,  # read A's rows through order (token rows of x) instead of sorted rows
    USE_TMA: tl.constexpr,  # Hopper: B's (BLOCK_K, BLOCK_N) tiles by TMA copies (rows past the part zeroed)
    UPCAST: tl.constexpr,  # widen tiles to fp32 before the dot (bf16 under the interpreter)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, "tf32" otherwise
    BLOCK_M: tl.constexpr,  # output rows per tile
    BLOCK_N: tl.constexpr,  # output columns per tile
    BLOCK_K: tl.constexpr,  # sorted rows (tokens) per reduction step
    GROUP_M: tl.constexpr,  # row tiles per swizzle group
):
    """Per-expert weight gradient, a reduction over that expert's tokens, optionally split over them
    into num_splits partial sums (more programs when there are few tiles); no atomics, deterministic.

    A is always read by masked pointer loads (it is gathered, or read transposed). Under USE_TMA a TMA
    copy of B's tile also brings the rows past this part's end, which belong to the next expert: they
    are zeroed before the dot, so that even a non-finite row there cannot reach this expert's gradient."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    part = pid // (num_pid_m * num_pid_n)  # expert * num_splits + split
    pid_m, pid_n = _swizzle(pid % (num_pid_m * num_pid_n), num_pid_m, num_pid_n, GROUP_M)
    expert = part // num_splits
    split = part % num_splits

    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    per_split = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_K) * BLOCK_K
    start = lo + split * per_split
    end = tl.minimum(start + per_split, hi)
    if USE_TMA:
        b_desc = tl.make_tensor_descriptor(b_ptr, [num_rows, N], [N, 1], [BLOCK_K, BLOCK_N])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_K):
        s = s0 + tl.arange(0, BLOCK_K)
        s_ok = s < end
        if GATHER_A:
            src = tl.load(order_ptr + s, mask=s_ok, other=0) // TOP_K
        else:
            src = s
        a = tl.load(a_ptr + src[None, :].to(tl.int64) * stride_am + ms[:, None] * stride_ak,
                    mask=m_ok[:, None] & s_ok[None, :], other=0.0)
        if USE_TMA:
            b = tl.where(s_ok[:, None], b_desc.load([s0, pid_n * BLOCK_N]), 0.0)
        else:
            b = tl.load(b_ptr + s[:, None].to(tl.int64) * N + ns[None, :], mask=s_ok[:, None] & n_ok[None, :],
                        other=0.0)
        acc = _dot(a, b, acc, UPCAST, DOT_PRECISION)
    c_ptrs = c_ptr + part.to(tl.int64) * M * N + ms[:, None] * N + ns[None, :]
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
        routed = (s + tl.zeros((BLOCK_D,), dtype=tl.int64)) >= 0  # as a block: triton 3.9's interpreter masks no scalar
        row = tl.load(y_ptr + s * D + cols, mask=ok & routed, other=0.0).to(tl.float32)
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
        ok = (cols < D) & ((s + tl.zeros((BLOCK_D,), dtype=tl.int64)) >= 0)  # a block mask (see _moe_combine_kernel)
        g = tl.load(dout_ptr + token * D + cols, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + s * D + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(dy_ptr + s * D + cols, (w * g).to(dy_ptr.dtype.element_ty), mask=ok)
        dot += g * y
    tl.store(dweights_ptr + assign, tl.sum(dot, axis=0).to(dweights_ptr.dtype.element_ty))


_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_grouped_mm_kernel)
# One autotuner per GEMM role, each over its own tiles (see _ROLE_TILES).
_TUNED_MM = {role: _autotune(_even_k, role, key=["N", "K"])
             for role in ("gate_up", "down", "down_dgrad", "gate_up_dgrad")}
_TUNED_WGRAD = {role: _autotune(_grouped_wgrad_kernel, role, key=["M", "N", "num_splits"])
                for role in ("w13_grad", "w2_grad")}


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
    block_a = max(16, min(256, 2048 // e_pad))  # 256 for E <= 8: 128 programs for 32K assignments
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


def _needs_64bit_offsets(*tensors: torch.Tensor) -> bool:
    """Whether an element offset into one of `tensors` may not fit in int32."""
    return any(t.numel() >= 2**31 for t in tensors)


def _permuted_buffer(a: torch.Tensor, num_rows: int, gather: bool) -> torch.Tensor:
    """(S, K) room for the permuted-A variant to copy a gathered A into, where that variant can run
    (Hopper, or the interpreter when a test asks for it); otherwise `a` itself, which rules it out."""
    possible = "tma-permuted" in INTERPRETER_VARIANTS if INTERPRET else _capability(a.device) >= (9, 0)
    if not (gather and possible):
        return a
    return torch.empty(num_rows, a.shape[1], dtype=a.dtype, device=a.device)


def _grouped_mm(role: str, a: torch.Tensor, b: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                top_k: int, epilogue: tl.constexpr, gather: bool, transpose_b: bool, h: torch.Tensor | None = None,
                act_out: torch.Tensor | None = None) -> torch.Tensor:
    """out[s] = epilogue(a[row(s)] @ b[expert(s)]) for sorted rows s (row(s) = order[s] // top_k when
    `gather`); b is (E, K, N), or (E, N, K) read transposed. See the role launchers below.

    A gathered A also gets an (S, K) buffer on Hopper, for the variant that permutes it once and reads
    it by TMA; the buffer lives for this call only."""
    epilogue = epilogue.value
    num_rows = order.numel()
    num_experts = b.shape[0]
    stride_be, stride_bk, stride_bn = b.stride(0), b.stride(1), b.stride(2)
    K, N = b.shape[1], b.shape[2]
    if transpose_b:
        stride_bk, stride_bn, K, N = stride_bn, stride_bk, N, K
    if epilogue == SWIGLU:
        N //= 2
    out = torch.empty(num_rows, 2 * N if epilogue == DSWIGLU else N, dtype=a.dtype, device=a.device)
    _set_tma_allocator(a.device)

    def grid(meta: dict) -> tuple[int]:
        tiles = (triton.cdiv(num_rows, meta["BLOCK_M"]) + num_experts) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, _num_sms(a.device)) if meta.get("USE_TMA") else tiles,)

    _TUNED_MM[role][grid](
        a, _permuted_buffer(a, num_rows, gather), b, out, out if h is None else h, out if act_out is None else act_out,
        order, offsets, num_rows, N, K, num_experts,
        a.stride(0), a.stride(1), stride_be, stride_bk, stride_bn,
        TOP_K=top_k, EPILOGUE=epilogue, GATHER_A=gather, B_TRANSPOSED=transpose_b,
        E_PAD=triton.next_power_of_2(num_experts), INDEX_64=_needs_64bit_offsets(a, b, out), **_dot_flags(a.dtype),
    )
    return out


@functools.cache
def _set_tma_allocator(device: torch.device) -> None:
    """Give Triton the scratch allocator that device-side TMA descriptors need (once, on CUDA)."""
    if device.type == "cuda":
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))


def gate_up(x: torch.Tensor, w13: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, top_k: int,
            h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (S, d_ff) of each sorted row's token x[order[s] // k] @ w13[e] (E, d, 2 d_ff),
    writing the pre-activations gate|up into h (S, 2 d_ff)."""
    return _grouped_mm("gate_up", x, w13, order, offsets, top_k, SWIGLU, gather=True, transpose_b=False, h=h)


def down(act: torch.Tensor, w2: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[s] = act[s] @ w2[expert(s)] (S, d) for sorted rows act (S, d_ff) and w2 (E, d_ff, d)."""
    return _grouped_mm("down", act, w2, order, offsets, 1, PLAIN, gather=False, transpose_b=False)


def down_dgrad(dy: torch.Tensor, w2: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, h: torch.Tensor,
               act_out: torch.Tensor) -> torch.Tensor:
    """dgate|dup (S, 2 d_ff): dSwiGLU of dy @ w2[e]^T given the saved h; writes silu(gate) * up,
    recomputed from h (bitwise gate_up's output), into act_out (S, d_ff) for the w2 gradient."""
    return _grouped_mm("down_dgrad", dy, w2, order, offsets, 1, DSWIGLU, gather=False, transpose_b=True, h=h,
                       act_out=act_out)


def gate_up_dgrad(dh: torch.Tensor, w13: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dx in sorted order (S, d): dh[s] (2 d_ff) @ w13[expert(s)]^T."""
    return _grouped_mm("gate_up_dgrad", dh, w13, order, offsets, 1, PLAIN, gather=False, transpose_b=True)


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device; an H100's 132 where there is no GPU (the audit's target)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def wgrad_splits(num_experts: int, M: int, N: int, device: torch.device) -> int:
    """How many parts the weight gradient splits each expert's tokens into: enough for about two
    waves of programs when even the widest tiles leave fewer, at most 8; 1 under the interpreter."""
    if INTERPRET:
        return 1
    tiles = num_experts * triton.cdiv(M, 128) * triton.cdiv(N, _WIDEST_TILE_N)
    waves = 2 * _num_sms(device)
    return 1 if tiles >= waves else min(8, triton.cdiv(waves, tiles))


def _grouped_wgrad(role: str, a: torch.Tensor, b: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                   top_k: int, gather: bool, num_experts: int, dtype: torch.dtype, num_splits: int | None) -> torch.Tensor:
    """(E, M, N) in `dtype`: per expert, a[row(s)]^T @ b[s] summed over that expert's sorted rows s.

    With num_splits > 1 each expert's rows are reduced in that many fp32 partial sums, added in a fixed
    order afterwards: deterministic, like the single pass (num_splits None picks it by wgrad_splits)."""
    M, N = a.shape[1], b.shape[1]
    splits = num_splits or wgrad_splits(num_experts, M, N, a.device)
    out = torch.empty(num_experts, splits, M, N, dtype=dtype if splits == 1 else torch.float32, device=a.device)
    grid = lambda meta: (num_experts * splits * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _set_tma_allocator(a.device)
    _TUNED_WGRAD[role][grid](a, b, out, order, offsets, order.numel(), M, N, splits, a.stride(0), a.stride(1),
                             TOP_K=top_k, GATHER_A=gather, **_dot_flags(a.dtype))
    return out[:, 0] if splits == 1 else out.sum(1).to(dtype)


def w13_grad(x: torch.Tensor, dh: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, top_k: int,
             num_experts: int, dtype: torch.dtype, num_splits: int | None = None) -> torch.Tensor:
    """dW13 (E, d, 2 d_ff) in `dtype`: per expert, the sum of x[token]^T dh[s] over its sorted rows."""
    return _grouped_wgrad("w13_grad", x, dh, order, offsets, top_k, True, num_experts, dtype, num_splits)


def w2_grad(act: torch.Tensor, dy: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, num_experts: int,
            dtype: torch.dtype, num_splits: int | None = None) -> torch.Tensor:
    """dW2 (E, d_ff, d) in `dtype`: per expert, the sum of act[s]^T dy[s] over its sorted rows."""
    return _grouped_wgrad("w2_grad", act, dy, order, offsets, 1, False, num_experts, dtype, num_splits)


def _combine(rows: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None, num_tokens: int,
             top_k: int) -> torch.Tensor:
    """(T, D): each token's k sorted rows gathered and summed (scaled by `weights` when given)."""
    width = rows.shape[1]
    out = torch.empty(num_tokens, width, dtype=rows.dtype, device=rows.device)
    block_d = min(1024, triton.next_power_of_2(width))
    _moe_combine_kernel[(num_tokens, triton.cdiv(width, block_d))](
        rows, pos, rows if weights is None else weights, out, width, top_k,
        HAS_WEIGHTS=weights is not None, BLOCK_D=block_d, num_warps=_row_warps(block_d, rows.element_size()),
    )
    return out


def _row_warps(block_d: int, itemsize: int) -> int:
    """Warps for one row of block_d elements so that each thread moves 16 bytes (128-bit accesses)."""
    return max(1, min(8, block_d * itemsize // (32 * 16)))


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
    check_moe_inputs(x, ids, weights, w13, w2)  # also when torch.ops.kernels.moe_experts is called directly
    num_tokens, top_k = ids.shape
    num_experts = w13.shape[0]
    w13, w2 = w13.to(x.dtype), w2.to(x.dtype)
    order, pos, offsets = sort_by_expert(ids.to(torch.int32).contiguous().view(-1), num_experts)
    h = torch.empty(order.numel(), w13.shape[2], dtype=x.dtype, device=x.device)
    act = gate_up(x, w13, order, offsets, top_k, h)  # gate+up GEMM, SwiGLU epilogue
    y = down(act, w2, order, offsets)  # act is freed on return
    out = _combine(y, pos, weights.contiguous().view(-1), num_tokens, top_k)
    return out, h, y, order, pos, offsets


@_moe_experts_op.register_fake
def _(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> _Saved:
    check_moe_inputs(x, ids, weights, w13, w2)
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
    block_d = min(1024, triton.next_power_of_2(width))
    _moe_combine_bwd_kernel[(num_rows,)](dout, y, pos, weights.contiguous(), dy, dweights, width, top_k,
                                         BLOCK_D=block_d, num_warps=_row_warps(block_d, y.element_size()))
    w13c, w2c = w13.to(x.dtype), w2.to(x.dtype)
    act = torch.empty(num_rows, w2.shape[1], dtype=x.dtype, device=x.device)  # silu(gate) * up, filled below
    dh = down_dgrad(dy, w2c, order, offsets, h, act)
    dw2 = w2_grad(act, dy, order, offsets, num_experts, w2.dtype)
    del act, dy  # free (S, d_ff) and (S, d) before the dW13 and dx GEMMs
    dw13 = w13_grad(x, dh, order, offsets, top_k, num_experts, w13.dtype)
    dx_sorted = gate_up_dgrad(dh, w13c, order, offsets)
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
    return _moe_experts_op(x, ids, weights, w13, w2)[0]
