"""`python -m bench.audit`: every Triton kernel compiled for sm_90 and sm_80 on a CPU-only machine.

The public ops run at the `tiny` and `small` presets' shapes (16k tokens, bf16 and fp32) with every
kernel launch intercepted: nothing executes, each launch is recorded with every autotune config
that survives its pruning, and each recorded variant is then compiled for a GPU target with
`triton.compile`. From the PTX, the cubin's SASS and ptxas' report it reads registers, spill bytes,
shared memory, the tensor-core path (wgmma / mma.sync / FMA), TMA use, the widest global load and
store, and for GEMMs the main-loop instructions per MMA and the wgmma groups left in flight.

    python -m bench.audit              # tiny + small, bf16 + fp32, sm_90 + sm_80
    python -m bench.audit --quick      # tiny, sm_90: the suite's check (every shipped config)
    python -m bench.audit --json       # also write the table to bench/results/audit_<time>.json
    python -m bench.audit --quick --only down_dgrad --try-tile down_dgrad:128x128x64:w8:s4
                                       # a candidate GEMM tile, audited as if it were shipped

Exits 1 when a check fails: a compile error, a spill on sm_90, shared memory over the device
limit, a 16-bit GEMM without wgmma on sm_90, an integer division in a GEMM main loop, or a kernel
in kernels/ that no op launched.
"""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's triton.jit has nothing to compile
    raise SystemExit("bench.audit compiles GPU code: run it without TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "0"  # before kernels is imported (it defaults to 1 without CUDA)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import kernels  # noqa: E402

moe_kernels = importlib.import_module("kernels.moe")  # the submodule (kernels.moe_experts is the op)
from tachyon.config import PRESETS, ModelConfig  # noqa: E402

KERNELS_DIR = Path(kernels.__file__).resolve().parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one CTA may opt into (H100, A100)
MMA_OPCODES = {90: ("HGMMA",), 80: ("HMMA",)}
TOKENS = 16384
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


# ---------------------------------------------------------------------------------------------- recording


@dataclass
class Launch:
    """One kernel launch as an op made it, with one autotune config: what `triton.compile` needs."""

    fn: JITFunction
    role: str  # the launcher in kernels/ that made it, e.g. moe.gate_up
    args: tuple
    kwargs: dict
    case: str  # e.g. tiny/bf16

    @property
    def kernel(self) -> str:
        return self.fn.__name__


def _launcher(stack: list[inspect.FrameInfo]) -> str:
    """`module.launcher` of the innermost frame in kernels/: the function that launched the kernel, or
    the `role` it was given (one generic launcher serves several GEMM roles)."""
    for frame in stack:
        path = Path(frame.filename).resolve()
        if path.parent == KERNELS_DIR:
            role = frame.frame.f_locals.get("role")
            return f"{path.stem}.{role if isinstance(role, str) else frame.function}"
    return "?"


@contextlib.contextmanager
def recording(case: Callable[[], str]) -> Iterator[list[Launch]]:
    """Within the block, kernel launches are recorded instead of run; an autotuned launch is recorded
    once per config that survives its pruning (as the autotuner would benchmark them on a GPU)."""
    launches: list[Launch] = []
    jit_run, tune_run = JITFunction.run, Autotuner.run

    def record(self: JITFunction, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, _launcher(inspect.stack(context=0)[1:]), args, kwargs, case()))

    def record_configs(self: Autotuner, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    JITFunction.run, Autotuner.run = record, record_configs
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tune_run


def _grad(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, requires_grad=True)


def run_ops(config: ModelConfig, dtype: torch.dtype, tokens: int = TOKENS) -> None:
    """Every public op forward and backward with the model's arguments at `config` and `tokens`.

    dtype is the activations' dtype (bf16 as under autocast, or fp32); parameters that the model
    keeps in fp32 (norm weights, RoPE tables, router logits) stay fp32, as they do in the model.
    Cross-entropy runs one 64-token chunk: its kernel is launched per chunk of rows and none of its
    launch arguments depend on the token count, while the chunk's logits GEMM would run for real here.
    """
    d, hd, E = config.d_model, config.head_dim, config.n_routed_experts
    H, Hkv, seq = config.n_heads, config.n_kv_heads, config.max_seq_len
    batch = max(1, tokens // seq)
    x = _grad(batch, seq, d, dtype=dtype)
    kernels.rms_norm(x, _grad(d, dtype=torch.float32), config.norm_eps).sum().backward()

    qkv = _grad(batch, seq, H + 2 * Hkv, hd, dtype=dtype)
    q, k, _ = qkv.split((H, Hkv, Hkv), dim=2)
    tables = torch.zeros(seq, hd // 2)
    qo, ko = kernels.qk_norm_rope(q, k, _grad(hd, dtype=torch.float32), _grad(hd, dtype=torch.float32),
                                  tables, tables, 0, config.norm_eps)
    (qo.sum() + ko.sum()).backward()
    qo, ko = kernels.rope(q, k, tables, tables)
    (qo.sum() + ko.sum()).backward()

    n = batch * seq
    weights, ids, _, lse = kernels.router_topk(_grad(n, E, dtype=torch.float32), config.top_k)
    (weights.sum() + lse.sum()).backward()

    f = config.d_ff
    routed = kernels.moe_experts(_grad(n, d, dtype=dtype), ids, weights.detach().requires_grad_(),
                                 _grad(E, d, 2 * f, dtype=dtype), _grad(E, f, d, dtype=dtype))
    routed.sum().backward()

    shared = config.n_shared_experts * config.d_shared_ff
    h = _grad(batch, seq, 2 * shared, dtype=dtype)
    gate, up = h.chunk(2, dim=-1)
    kernels.swiglu(gate, up).sum().backward()

    chunk = 64
    loss = kernels.linear_cross_entropy(_grad(chunk, d, dtype=dtype), _grad(config.vocab_size, d, dtype=dtype),
                                        torch.zeros(chunk, dtype=torch.int64))
    loss.backward()


def record_launches(presets: list[str], dtypes: list[torch.dtype], cap: int) -> list[Launch]:
    """Every launch the ops make for each preset and dtype, autotune configs pruned as on a `cap` GPU."""
    current = [""]
    saved, moe_kernels.NO_GPU_CAPABILITY = moe_kernels.NO_GPU_CAPABILITY, divmod(cap, 10)
    try:
        with kernels.use("triton"), recording(lambda: current[0]) as launches:
            for preset in presets:
                for dtype in dtypes:
                    current[0] = f"{preset}/{DTYPE_NAMES[dtype]}"
                    run_ops(PRESETS[preset], dtype)
    finally:
        moe_kernels.NO_GPU_CAPABILITY = saved
    return launches


def all_kernels() -> set[str]:
    """Every `*_kernel` Triton function defined in kernels/ (device helpers are not launched alone)."""
    names = set()
    for module in ("cross_entropy", "glu", "moe", "rmsnorm", "rotary", "router"):
        for name, obj in vars(importlib.import_module(f"kernels.{module}")).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                names.add(name)
    return names


# ---------------------------------------------------------------------------------------------- compiling


@dataclass
class Spec:
    """A launch reduced to what the compiled code depends on, for one GPU: picklable for a worker."""

    module: str
    kernel: str
    cap: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    label: str  # the tile sizes and launch options, e.g. BLOCK_M=128 BLOCK_N=64 w4 s3

    @property
    def key(self) -> str:
        """Equal for launches that compile to the same code."""
        return repr((self.module, self.kernel, self.cap, self.signature, sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))


def _label(params: list[str], constexprs: dict, options: dict) -> str:
    blocks = [f"{params[path[0]]}={value}" for path, value in constexprs.items()
              if params[path[0]].startswith(("BLOCK", "GROUP", "SPLIT", "EVEN", "USE_", "PERMUTE"))]
    return " ".join(blocks + [f"w{options['num_warps']}", f"s{options['num_stages']}"])


def make_spec(launch: Launch, cap: int) -> Spec:
    """Bind a launch's arguments as JITFunction.run does for a `cap` GPU: types, alignment, constexprs."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", cap, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return Spec(fn.module, fn.__name__, cap, signature, constexprs, attrs, dict(options.__dict__),
                _label(list(signature), constexprs, options.__dict__))


@dataclass
class Row:
    """What the compiled code of one variant shows."""

    kernel: str
    role: str
    cases: list[str]
    arch: str
    config: str
    regs: int = 0
    spill: int = 0  # bytes of spill stores
    smem: int = 0
    smem_limit: int = 0
    tensor_cores: str = "-"  # wgmma, mma.sync, FMA (a dot on CUDA cores) or - (no dot)
    operands: str = ""  # the dot's operand dtype, e.g. bf16
    tma: bool = False
    warp_specialized: bool = False  # producer/consumer warp groups with their own register budgets (setmaxnreg)
    load_bits: int = 0  # widest global load (ld.global or cp.async), in bits
    store_bits: int = 0
    loop_insts_per_mma: float | None = None  # GEMM main loop: SASS instructions per MMA instruction
    wgmma_in_flight: int | None = None  # wgmma groups the main loop leaves pending (WARPGROUP.DEPBAR.LE)
    loop_int_div: bool = False  # the main loop emulates an integer division (I2F.RP, MUFU.RCP, IMAD.HI)
    error: str = ""
    problems: list[str] = field(default_factory=list)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def main_loop(sass: str, cap: int) -> tuple[float | None, int | None, bool]:
    """(instructions per MMA, wgmma groups in flight, integer division) of the loop holding the most
    MMA instructions. A loop is the span from a backward branch's target to the branch itself; an
    integer division shows as the round-up int-to-float conversion (I2F.RP) that starts its emulation.
    """
    insts = [(int(a, 16), op, rest) for a, op, rest in _SASS_LINE.findall(sass)]
    best: tuple[int, list] = (0, [])
    for addr, op, rest in insts:
        if op.startswith("BRA") and (target := re.search(r"0x([0-9a-f]+)", rest)):
            start = int(target.group(1), 16)
            if start < addr:
                body = [i for i in insts if start <= i[0] <= addr]
                n_mma = sum(i[1].startswith(MMA_OPCODES[cap]) for i in body)
                if n_mma > best[0]:
                    best = (n_mma, body)
    n_mma, body = best
    if not n_mma:
        return None, None, False
    waits = [int(m.group(1), 16) for i in body if i[1].startswith("WARPGROUP.DEPBAR")
             and (m := re.search(r"0x([0-9a-f]+)", i[2]))]
    int_div = any(op.startswith("I2F") and ".RP" in op for _, op, _ in body)
    return round(len(body) / n_mma, 1), (min(waits) if waits else None), int_div


def widest(ptx: str, store: bool) -> int:
    """Widest global load (or store) in the PTX, in bits; cp.async copies count as loads."""
    kind = "st" if store else "ld"
    bits = [int(v or 1) * int(b) for v, b in re.findall(rf"\b{kind}\.global[\w.]*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx)]
    if not store:
        copies = re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.\w+)*\s+\[[^]]+\],\s*\[[^]]+\],\s*(0x[0-9a-f]+|\d+)",
                            ptx)
        bits += [8 * int(n, 0) for n in copies]
        bits += [128 for _ in re.findall(r"cp\.async\.bulk\.tensor", ptx)]
    return max(bits, default=0)


def compile_spec(spec: Spec) -> Row:
    """Compile one variant and read its figures (runs in a worker process)."""
    from triton import knobs
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    while not isinstance(fn, JITFunction):  # autotune / heuristics wrappers
        fn = fn.fn
    row = Row(spec.kernel, "", [], f"sm_{spec.cap}", spec.label, smem_limit=SMEM_LIMIT[spec.cap])
    knobs.nvidia.dump_ptxas_log = True  # ptxas' report (registers, spills) on stdout...
    knobs.compilation.always_compile = True  # ...which a kernel from Triton's cache would not print
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, spec.signature, spec.constexprs, spec.attrs),
                                      target=GPUTarget("cuda", spec.cap, 32), options=spec.options)
    except Exception as e:  # a compile error is a finding, reported in the table
        row.error = _error_line(e)
        return row
    ptxas = log.getvalue()
    row.regs = int(m.group(1)) if (m := re.search(r"Used (\d+) registers", ptxas)) else 0
    row.spill = int(m.group(1)) if (m := re.search(r"(\d+) bytes spill stores", ptxas)) else 0
    row.smem = compiled.metadata.shared
    ptx, ttir = compiled.asm["ptx"], compiled.asm["ttir"]
    row.tma = "cp.async.bulk.tensor" in ptx
    row.warp_specialized = "setmaxnreg" in ptx
    row.load_bits, row.store_bits = widest(ptx, store=False), widest(ptx, store=True)
    if "tt.dot" in ttir:
        dots = re.findall(r"tt\.dot[^\n]*?tensor<\d+x\d+x(\w+)", ttir)
        row.operands = dots[0] if dots else "?"
        row.tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "FMA"
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True).stdout
        row.loop_insts_per_mma, row.wgmma_in_flight, row.loop_int_div = main_loop(sass, spec.cap)
    return row


def _error_line(error: BaseException) -> str:
    """One line for a compile error: where the outermost error points, and the innermost cause."""
    where = str(error).strip().splitlines()[0] if str(error).strip() else ""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split())[:200]
    return f"{where} {type(error).__name__}: {text}".strip()


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def check(row: Row) -> list[str]:
    """The audit's failures for one row."""
    problems = []
    if row.error:
        problems.append(f"compile error: {row.error}")
    if row.arch == "sm_90" and row.spill:
        problems.append(f"spills {row.spill} B on sm_90")
    if row.smem > row.smem_limit:
        problems.append(f"shared memory {row.smem} B over the {row.smem_limit} B limit")
    if row.loop_int_div:
        problems.append("integer division in the GEMM main loop")
    if row.arch == "sm_90" and row.operands in ("bf16", "f16") and row.tensor_cores != "wgmma":
        problems.append(f"{row.operands} GEMM on {row.tensor_cores}, not wgmma")
    return problems


# ---------------------------------------------------------------------------------------------- report


def try_tile(text: str) -> None:
    """Add a grouped-GEMM tile, ROLE:BMxBNxBK:wWARPS:sSTAGES, to that role's shipped 16-bit configs."""
    try:
        role, dims, warps, stages = text.split(":")
        tile = (*(int(n) for n in dims.split("x")), int(warps.removeprefix("w")), int(stages.removeprefix("s")))
        tuned = {**moe_kernels._TUNED_MM, **moe_kernels._TUNED_WGRAD}[role]
    except (ValueError, KeyError):
        raise SystemExit(f"--try-tile {text!r}: expected ROLE:BMxBNxBK:wW:sS with ROLE one of "
                         f"{', '.join(moe_kernels._ROLE_TILES)}, e.g. down:128x128x64:w8:s3") from None
    if len(tile) != 5:
        raise SystemExit(f"--try-tile {text!r}: the tile needs three sizes, BMxBNxBK")
    moe_kernels._ROLE_TILES[role].append(tile)
    tuned.configs = moe_kernels.role_configs(role)


def audit(presets: list[str], dtypes: list[torch.dtype], caps: list[int], workers: int,
          only: str | None = None) -> tuple[list[Row], list[str]]:
    """Record, compile and check every variant (those whose kernel or role contains `only`, if given);
    returns the rows and the kernels no op launched (not checked with `only`)."""
    launched: set[str] = set()
    variants: dict[str, tuple[Spec, set[str], set[str]]] = {}  # key -> (spec, roles, cases)
    for cap in caps:
        for launch in record_launches(presets, dtypes, cap):
            launched.add(launch.kernel)
            if only and only not in launch.kernel and only not in launch.role:
                continue
            spec = make_spec(launch, cap)
            _, roles, cases = variants.setdefault(spec.key, (spec, set(), set()))
            roles.add(launch.role)
            cases.add(launch.case)
    missing = [] if only else sorted(all_kernels() - launched)
    specs = [spec for spec, _, _ in variants.values()]
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        rows = list(_progress(pool.map(compile_spec, specs), len(specs)))
    for spec, row in zip(specs, rows, strict=True):
        _, roles, cases = variants[spec.key]
        row.role, row.cases = ", ".join(sorted(roles)), sorted(cases)
        row.problems = check(row)
    rows.sort(key=lambda r: (r.kernel, r.role, r.arch, r.config, r.cases))
    return rows, missing


def _progress(rows: Iterator[Row], total: int) -> Iterator[Row]:
    from tqdm import tqdm

    yield from tqdm(rows, total=total, desc="compiling", unit="variant", file=sys.stderr, leave=False)


COLUMNS = [("kernel", 26), ("role", 26), ("arch", 5), ("config", 58), ("cases", 22), ("regs", 4), ("spill", 5),
           ("smem KB", 8), ("tc", 14), ("tma", 3), ("ws", 3), ("ld", 3), ("st", 3), ("inst/mma", 8), ("wg", 2),
           ("idiv", 4)]


def _cells(row: Row) -> list[str]:
    flight = "" if row.wgmma_in_flight is None else str(row.wgmma_in_flight)
    per_mma = "" if row.loop_insts_per_mma is None else f"{row.loop_insts_per_mma:g}"
    cases = ",".join(row.cases) if len(row.cases) <= 2 else f"{len(row.cases)} cases"
    if row.error:
        return [row.kernel, row.role, row.arch, row.config, cases, "ERROR: " + row.error]
    return [row.kernel, row.role, row.arch, row.config, cases, str(row.regs), str(row.spill),
            f"{row.smem / 1024:.0f}/{row.smem_limit // 1024}", row.tensor_cores + (f"({row.operands})" if
            row.operands else ""), "yes" if row.tma else "", "yes" if row.warp_specialized else "", str(row.load_bits),
            str(row.store_bits), per_mma, flight, "yes" if row.loop_int_div else ""]


def format_table(rows: list[Row]) -> str:
    lines = ["  ".join(name.ljust(width) for name, width in COLUMNS)]
    for row in rows:
        cells = _cells(row)
        lines.append("  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=False)) + "".join(
            f"  <- {p}" for p in row.problems))
    return "\n".join(lines)


def summary(rows: list[Row], missing: list[str]) -> list[str]:
    """A few lines: variants, spills per arch, tensor-core paths, failures."""
    lines = []
    for arch in sorted({r.arch for r in rows}, reverse=True):
        of_arch = [r for r in rows if r.arch == arch]
        spilling = [r for r in of_arch if r.spill]
        gemms = [r for r in of_arch if r.operands]
        paths = {p: sum(r.tensor_cores == p for r in gemms) for p in ("wgmma", "mma.sync", "FMA")}
        max_spill = max((r.spill for r in spilling), default=0)
        max_smem = max((r.smem for r in of_arch), default=0) // 1024
        lines.append(f"{arch}: {len(of_arch)} variants, {len(spilling)} spill (max {max_spill} B), max smem "
                     f"{max_smem} KB; GEMMs: " + ", ".join(f"{n} {p}" for p, n in paths.items() if n)
                     + f"; TMA in {sum(r.tma for r in of_arch)}"
                     + f", warp-specialized {sum(r.warp_specialized for r in of_arch)}"
                     + f"; compile errors {sum(bool(r.error) for r in of_arch)}")
    failures = [f"{r.kernel} [{r.role}] {r.arch} {r.config} ({','.join(r.cases)}): {p}"
                for r in rows for p in r.problems]
    failures += [f"{name}: no op launched it" for name in missing]
    lines.append(f"{len(failures)} failures" + (":" if failures else ""))
    lines += [f"  {f}" for f in failures]
    return lines


def write_json(rows: list[Row], summary_lines: list[str], args: argparse.Namespace) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"audit_{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {"kind": "audit", "presets": args.presets, "archs": args.archs, "triton": triton.__version__,
              "torch": torch.__version__, "tokens": TOKENS, "summary": summary_lines, "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    parser.add_argument("--archs", nargs="+", type=int, default=[90, 80], choices=sorted(SMEM_LIMIT))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--quick", action="store_true", help="tiny preset, sm_90 only (the test suite's run)")
    parser.add_argument("--only", metavar="TEXT", help="audit only kernels or roles whose name contains TEXT")
    parser.add_argument("--try-tile", action="append", default=[], metavar="ROLE:BMxBNxBK:wW:sS",
                        help="add a grouped-GEMM tile to a role's configs for this run (repeatable)")
    parser.add_argument("--json", action="store_true", help="write the table to bench/results/audit_<time>.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes (default: cores)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.presets, args.archs = ["tiny"], [90]
    dtypes = [DTYPES[d] for d in args.dtypes]
    for tile in args.try_tile:
        try_tile(tile)
    start = time.perf_counter()
    rows, missing = audit(args.presets, dtypes, args.archs, args.workers, args.only)
    print(format_table(rows))
    lines = summary(rows, missing)
    print("\n".join(lines))
    if args.json:
        print(f"wrote {write_json(rows, lines, args)}")
    print(f"audit took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 1 if any(r.problems for r in rows) or missing else 0


if __name__ == "__main__":
    sys.exit(main())
