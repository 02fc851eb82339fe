"""MoE micro-benchmarks: each grouped-GEMM role alone, and the routed-expert layer forward + backward.

test_grouped_gemm times one GEMM role of the Triton MoE (gate_up with its SwiGLU epilogue, down,
down_dgrad with its dSwiGLU epilogue, gate_up_dgrad, w13_grad, w2_grad) in TFLOP/s against dense
`torch.matmul` of the same FLOPs (one (M, K) @ (K, N) product, cuBLAS on a GPU) and against
`torch._grouped_mm` on the same groups where it runs. The role first runs once through its
autotuner with the tuner's earlier choices forgotten, so that it times every candidate config at
this shape; each candidate's time (pointer or TMA variant, and which one won) becomes a
`grouped_gemm_config` record. The targets (issue 14): Triton at least 85% of dense at the small
and large shapes (75% at tiny's K=512) and at least `torch._grouped_mm`.

test_moe_layer_fwd_bwd times the whole layer, forward + backward, as Triton, the reference loop
over experts and a sort + index_add baseline, and prints Triton's speedup over each (target: 5x
the reference loop at tiny with 16k tokens).

On a GPU the cases are the tiny, small and large presets' routed experts at 16k and 64k tokens with
balanced and 90%-skewed routing, in bf16; on the CPU one fp32 smoke case (in the first case's slot)
through the interpreter. Select on a GPU with -k, e.g. `-k "gemm and small-16k"`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import triton

from bench.harness import Timing, bench, pick_shape, run_benchmark, shape_indices, sync
from kernels import moe as moe_mod

TOP_K = 2


@dataclass(frozen=True)
class Case:
    """One MoE shape and routing: `experts` routed experts of d_model -> d_ff, `tokens` tokens (top-2)."""

    preset: str
    experts: int
    d_model: int
    d_ff: int
    tokens: int
    skewed: bool  # 90% of tokens' first choice on expert 0, instead of uniform

    @property
    def id(self) -> str:
        tokens = f"{self.tokens // 1024}k" if self.tokens % 1024 == 0 else str(self.tokens)
        return f"{self.preset}-{tokens}-{'skewed' if self.skewed else 'balanced'}"

    @property
    def label(self) -> str:
        return (f"{self.preset},T={self.tokens},E={self.experts},d={self.d_model},f={self.d_ff},"
                f"{'skewed' if self.skewed else 'balanced'}")


# (experts, d_model, d_ff): the tiny, small and large presets' routed experts.
PRESETS = {"tiny": (4, 512, 1408), "small": (8, 768, 896), "large": (8, 1280, 2368)}
# Ordered so that a run cut short by a time limit has every preset at 16k balanced first.
GPU_CASES = [Case(name, *dims, tokens, skewed) for tokens in (16384, 65536) for skewed in (False, True)
             for name, dims in PRESETS.items()]
CPU_CASES = [Case("smoke", 4, 32, 48, 64, False)]
CASE_PARAMS = [pytest.param(i, id=GPU_CASES[i].id) for i in shape_indices(GPU_CASES, CPU_CASES)]


def routing(tokens: int, experts: int, skewed: bool, device: str) -> torch.Tensor:
    """(T, 2) distinct expert ids per token: uniform, or 90% of tokens' first choice on expert 0."""
    ids = torch.rand(tokens, experts, device=device).argsort(-1)[:, :TOP_K]
    if skewed:
        heavy = torch.rand(tokens, device=device) < 0.9
        second = torch.where(ids[:, 1] == 0, ids[:, 0], ids[:, 1])  # keep the pair distinct
        ids = torch.where(heavy[:, None], torch.stack([torch.zeros_like(second), second], 1), ids)
    return ids.to(torch.int32)


# --- the whole layer --------------------------------------------------------------------------------


def sort_index_add_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                       w2: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch baseline: one stable sort by expert, per-expert matmuls on contiguous slices,
    SwiGLU, then a weighted index_add back to the tokens (one host sync for the split sizes)."""
    num_tokens, top_k = ids.shape
    d_ff = w2.shape[1]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    sizes = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    h = torch.cat([chunk @ w13[e] for e, chunk in enumerate(x[token].split(sizes))])
    act = F.silu(h[:, :d_ff]) * h[:, d_ff:]
    y = torch.cat([chunk @ w2[e] for e, chunk in enumerate(act.split(sizes))])
    scaled = y.float() * weights.reshape(-1)[order, None].float()
    return torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device).index_add(0, token, scaled).to(
        x.dtype)


LAYER_IMPLS: dict[str, Callable] = {"triton": moe_mod.moe_experts,
                                    "reference": moe_mod.moe_experts_reference,  # the per-expert loop
                                    "sort_index_add": sort_index_add_moe}


@pytest.mark.parametrize("index", CASE_PARAMS)
def test_moe_layer_fwd_bwd(benchmark, record, device: str, on_gpu: bool, index: int) -> None:
    """The routed-expert layer forward + backward (dx, d(weights), dw13, dw2) under each implementation."""
    case = pick_shape(GPU_CASES, CPU_CASES, index, on_gpu)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    e, d, f, tokens = case.experts, case.d_model, case.d_ff, case.tokens
    ids = routing(tokens, e, case.skewed, device)
    weights = torch.softmax(torch.randn(tokens, TOP_K, device=device), -1).requires_grad_()
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    w13 = (torch.randn(e, d, 2 * f, device=device) / d**0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(e, f, d, device=device) / f**0.5).to(dtype).requires_grad_()
    grad = torch.randn(tokens, d, device=device, dtype=dtype)

    def step(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            fn(x, ids, weights, w13, w2).backward(grad)
            for t in (x, weights, w13, w2):
                t.grad = None

        return run

    results = {impl: bench(step(fn), device) for impl, fn in LAYER_IMPLS.items()}
    flops = 3 * 6.0 * tokens * TOP_K * d * f  # fwd 6*S*d*f, bwd twice that
    for impl, timing in results.items():
        record(op="moe_layer_fwd_bwd", impl=impl, shape=case.label, dtype=str(dtype).removeprefix("torch."),
               **timing.fields(), tflops=flops / timing.median_s / 1e12,
               triton_speedup=timing.median_s / results["triton"].median_s)
    print(f"moe layer fwd+bwd {case.id}: Triton {results['triton'].ms:.3f} ms, "
          + ", ".join(f"speedup {t.median_s / results['triton'].median_s:.2f}x over {impl}"
                      for impl, t in results.items() if impl != "triton"))
    run_benchmark(benchmark, step(moe_mod.moe_experts), device, on_gpu, gpu_rounds=3)


# --- the grouped GEMM, role by role ----------------------------------------------------------------


@dataclass
class Operands:
    """Every tensor the six GEMM roles read or write, in the layouts the MoE layer gives them."""

    x: torch.Tensor  # (T, d) tokens
    x_sorted: torch.Tensor  # (S, d) token rows in expert order (what torch._grouped_mm needs)
    w13: torch.Tensor  # (E, d, 2f)
    w2: torch.Tensor  # (E, f, d)
    order: torch.Tensor  # (S,) int32 sort by expert
    offsets: torch.Tensor  # (E + 1,) int32 expert starts
    h: torch.Tensor  # (S, 2f) gate|up pre-activations
    act: torch.Tensor  # (S, f) silu(gate) * up
    dy: torch.Tensor  # (S, d) gradient of the down GEMM's output
    dh: torch.Tensor  # (S, 2f) gradient of the pre-activations

    @property
    def rows(self) -> int:
        return self.order.numel()

    @property
    def ends(self) -> torch.Tensor:
        """(E,) int32 cumulative group ends: torch._grouped_mm's `offs`."""
        return self.offsets[1:].contiguous()


def make_operands(case: Case, device: str, dtype: torch.dtype) -> Operands:
    """Random operands for `case`, sorted by its routing with the Triton sort."""
    ids = routing(case.tokens, case.experts, case.skewed, device)
    order, _, offsets = moe_mod.sort_by_expert(ids.reshape(-1).contiguous(), case.experts)
    rows, d, f, e = order.numel(), case.d_model, case.d_ff, case.experts
    randn = lambda *shape, scale=1.0: (torch.randn(*shape, device=device) * scale).to(dtype)
    x = randn(case.tokens, d)
    return Operands(x=x, x_sorted=x[order.long() // TOP_K], w13=randn(e, d, 2 * f, scale=d**-0.5),
                    w2=randn(e, f, d, scale=f**-0.5), order=order, offsets=offsets, h=randn(rows, 2 * f),
                    act=randn(rows, f), dy=randn(rows, d), dh=randn(rows, 2 * f))


@dataclass(frozen=True)
class Role:
    """One GEMM role: its Triton launcher, the (M, K, N) of one dense product with the same FLOPs,
    and the same groups through torch._grouped_mm (without the fused epilogues)."""

    triton: Callable[[Operands], object]
    dims: Callable[[Operands], tuple[int, int, int]]
    grouped_mm: Callable[[Operands], object]


def _d(o: Operands) -> int:
    return o.x.shape[1]


def _f(o: Operands) -> int:
    return o.w2.shape[1]


ROLES: dict[str, Role] = {
    "gate_up": Role(lambda o: moe_mod.gate_up(o.x, o.w13, o.order, o.offsets, TOP_K, o.h),
                    lambda o: (o.rows, _d(o), 2 * _f(o)),
                    lambda o: torch._grouped_mm(o.x_sorted, o.w13, offs=o.ends)),
    "down": Role(lambda o: moe_mod.down(o.act, o.w2, o.order, o.offsets),
                 lambda o: (o.rows, _f(o), _d(o)),
                 lambda o: torch._grouped_mm(o.act, o.w2, offs=o.ends)),
    "down_dgrad": Role(lambda o: moe_mod.down_dgrad(o.dy, o.w2, o.order, o.offsets, o.h, o.act),
                       lambda o: (o.rows, _d(o), _f(o)),
                       lambda o: torch._grouped_mm(o.dy, o.w2.transpose(1, 2), offs=o.ends)),
    "gate_up_dgrad": Role(lambda o: moe_mod.gate_up_dgrad(o.dh, o.w13, o.order, o.offsets),
                          lambda o: (o.rows, 2 * _f(o), _d(o)),
                          lambda o: torch._grouped_mm(o.dh, o.w13.transpose(1, 2), offs=o.ends)),
    "w13_grad": Role(lambda o: moe_mod.w13_grad(o.x, o.dh, o.order, o.offsets, TOP_K, o.w13.shape[0], o.x.dtype),
                     lambda o: (_d(o), o.rows, 2 * _f(o)),
                     lambda o: torch._grouped_mm(o.x_sorted.t(), o.dh, offs=o.ends)),
    "w2_grad": Role(lambda o: moe_mod.w2_grad(o.act, o.dy, o.order, o.offsets, o.w2.shape[0], o.x.dtype),
                    lambda o: (_f(o), o.rows, _d(o)),
                    lambda o: torch._grouped_mm(o.act.t(), o.dy, offs=o.ends)),
}


def role_tuner(role: str) -> triton.runtime.Autotuner:
    """The autotuner behind a role's launcher."""
    return {**moe_mod._TUNED_MM, **moe_mod._TUNED_WGRAD}[role]


def autotune_here(tuner: triton.runtime.Autotuner, run: Callable[[], object], device: str
                  ) -> tuple[dict[triton.Config, list[float]] | None, triton.Config]:
    """Run `run` once with the tuner's earlier choices forgotten; return (each candidate config's
    [median, p20, p80] ms from the tuner's own timing, or None when one config was the only candidate)
    and the config it chose. Its cache key is (N, K) and the dtypes, so without forgetting it would
    keep the choice made at the first token count or routing with the same dims."""
    tuner.cache.clear()
    tuner.__dict__.pop("configs_timings", None)  # set again only when the tuner times several configs
    run()
    sync(device)
    return getattr(tuner, "configs_timings", None), tuner.best_config


def config_label(config: triton.Config) -> str:
    """A grouped-GEMM config's tile as BLOCK_M x BLOCK_N x BLOCK_K, warps and pipeline stages."""
    kw = config.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{config.num_warps} s{config.num_stages}"


def config_variant(config: triton.Config) -> str:
    """How a config reads its operands: "pointer" (cp.async loads) or "tma", "tma-permuted" (gathered A
    copied into expert order first), with "-ws" under warp specialisation."""
    kw = config.kwargs
    if not kw.get("USE_TMA", False):
        return "pointer"
    return ("tma-permuted" if kw.get("PERMUTE_A", False) else "tma") + ("-ws" if kw.get("WARP_SPECIALIZE") else "")


def config_records(timings: dict[triton.Config, list[float]] | None, winner: triton.Config, flops: float,
                   winner_time: Timing) -> list[dict[str, object]]:
    """One record per candidate config: its variant, whether it won, and its time and TFLOP/s as the
    autotuner measured it (median and 20th/80th percentiles; a config that failed to compile or launch
    has ms None). With one candidate, the winner alone, timed by bench() instead."""
    if timings is None:
        return [{"config": config_label(winner), "variant": config_variant(winner), "winner": True,
                 "timed_by": "harness", **winner_time.fields(), "tflops": flops / winner_time.median_s / 1e12}]
    rows = []
    for config, (median, p20, p80) in sorted(timings.items(), key=lambda item: item[1][0]):
        ok = median != float("inf")
        rows.append({"config": config_label(config), "variant": config_variant(config), "winner": config is winner,
                     "timed_by": "autotuner", "ms": median if ok else None, "ms_p20": p20 if ok else None,
                     "ms_p80": p80 if ok else None, "tflops": flops / median / 1e9 if ok else None})
    return rows


def _dense_matmul(m: int, k: int, n: int, device: str, dtype: torch.dtype) -> Callable[[], object]:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype) / k**0.5
    return lambda: torch.matmul(a, b)


def _time_grouped_mm(role: Role, ops: Operands, device: str) -> Timing | str:
    """torch._grouped_mm's time on the role's groups, or why it does not run here (GPU, dtype, layout)."""
    try:
        return bench(lambda: role.grouped_mm(ops), device)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("index", CASE_PARAMS)
def test_grouped_gemm(benchmark, record, device: str, on_gpu: bool, index: int, role: str) -> None:
    """One grouped-GEMM role in TFLOP/s: every autotune candidate, the winner, dense matmul, _grouped_mm."""
    case = pick_shape(GPU_CASES, CPU_CASES, index, on_gpu)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    ops = make_operands(case, device, dtype)
    spec = ROLES[role]
    m, k, n = spec.dims(ops)
    flops = 2.0 * m * k * n
    run = lambda: spec.triton(ops)
    timings, winner = autotune_here(role_tuner(role), run, device)
    results: dict[str, Timing | str] = {"triton": bench(run, device),
                                        "dense_matmul": bench(_dense_matmul(m, k, n, device, dtype), device),
                                        "torch_grouped_mm": _time_grouped_mm(spec, ops, device)}
    common = {"op": "grouped_gemm", "role": role, "shape": case.label, "dtype": str(dtype).removeprefix("torch."),
              "gemm": f"M={m},K={k},N={n}"}
    for row in config_records(timings, winner, flops, results["triton"]):
        record(**{**common, "op": "grouped_gemm_config", "impl": "triton"}, **row)
    triton_s = results["triton"].median_s
    for impl, timing in results.items():
        if isinstance(timing, str):
            record(**common, impl=impl, skipped=timing)
            continue
        extra = {"config": config_label(winner), "variant": config_variant(winner)} if impl == "triton" else {}
        record(**common, impl=impl, **timing.fields(), tflops=flops / timing.median_s / 1e12,
               triton_vs_this=timing.median_s / triton_s, **extra)
    print(gemm_summary(role, case, results, winner))
    run_benchmark(benchmark, run, device, on_gpu, gpu_rounds=3)


def gemm_summary(role: str, case: Case, results: dict[str, Timing | str], winner: triton.Config) -> str:
    """One line: the role's Triton TFLOP/s as a fraction of each baseline that ran, and the winning config."""
    triton_s = results["triton"].median_s
    ratios = [f"{timing.median_s / triton_s:.2f}x {impl}" for impl, timing in results.items()
              if impl != "triton" and isinstance(timing, Timing)]
    return (f"{role} {case.id}: Triton {results['triton'].ms:.3f} ms = " + ", ".join(ratios)
            + f" (throughput ratio); winner {config_variant(winner)} {config_label(winner)}")
