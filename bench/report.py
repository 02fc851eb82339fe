"""`python -m bench.report`: the README's performance section from the JSON files in bench/results/.

Reads end-to-end throughput files (written by `python -m bench.throughput`) and micro-benchmark
files (written by `pytest bench/`), keeps the newest result of each configuration, and prints a
markdown section: a throughput table (preset, kernels, compile, tokens/s, MFU, memory, device,
commit), a table of fused-kernel speedups over the PyTorch reference (median and min times), a
table of the grouped GEMM's TFLOP/s per role against dense matmul and torch._grouped_mm with the
best config of each variant the autotuner tried, and the commits and devices that produced them.
Files from before the per-role GEMM records (grouped_gemm_up/down, no min time) still read. It
draws the speedups (micro and end to end) as a PNG bar chart, and with `--readme` rewrites the text
between the perf markers of the README in place.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import RESULTS_DIR

START_MARKER = "<!-- perf:start -->"
END_MARKER = "<!-- perf:end -->"
PRESET_ORDER = ("nano", "tiny", "small", "medium", "large")
IMPL_ORDER = ("triton", "reference")  # columns first; any other impl (e.g. compiled) follows
BASELINES = ("reference", "dense_matmul")  # what a speedup is measured against, first one present
GEMM_OP, GEMM_CONFIG_OP = "grouped_gemm", "grouped_gemm_config"  # bench_moe's per-role records
ROLE_ORDER = ("gate_up", "down", "down_dgrad", "gate_up_dgrad", "w13_grad", "w2_grad")


@dataclass
class Results:
    """Every usable record, each carrying its file's device, commit and creation stamp."""

    throughput: list[dict[str, Any]] = field(default_factory=list)
    micro: list[dict[str, Any]] = field(default_factory=list)
    decode: list[dict[str, Any]] = field(default_factory=list)  # generation tokens/s (bench_generate)
    gemm: list[dict[str, Any]] = field(default_factory=list)  # grouped GEMM per role: triton and baselines
    gemm_configs: list[dict[str, Any]] = field(default_factory=list)  # every autotune candidate's time
    skipped: list[str] = field(default_factory=list)  # files that could not be read, with the reason


def load_results(results_dir: Path) -> Results:
    """Read every *.json under results_dir; unreadable files are listed in `skipped`, not fatal."""
    results = Results()
    for path in sorted(results_dir.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
            records = payload["records"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            results.skipped.append(f"{path.name} ({type(e).__name__}: {e})")
            continue
        env = payload.get("environment") or {}
        meta = {"device": env.get("device") or "unknown device", "commit": env.get("git_commit") or "unknown",
                "created": payload.get("created") or path.stem, "file": path.name}
        for record in records if isinstance(records, list) else []:
            if not isinstance(record, dict):
                continue
            row = {**record, **meta}
            if record.get("op") == GEMM_CONFIG_OP:
                results.gemm_configs.append(row)
            elif record.get("op") == GEMM_OP:
                if "ms" in record:  # not a baseline that could not run
                    results.gemm.append(row)
            elif "op" in record:  # a micro-benchmark: timed per call, or a decode rate
                if "ms" in record:
                    results.micro.append(row)
                elif "tokens_per_s" in record:
                    results.decode.append(row)
            elif "tokens_per_s" in record and "preset" in record:
                row["device"] = record.get("device_name") or meta["device"]
                results.throughput.append(row)
    return results


def _newest(rows: Iterable[dict[str, Any]], key_fields: tuple[str, ...]) -> dict[tuple, dict[str, Any]]:
    """The newest row (by its file's creation stamp) for each distinct key."""
    newest: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = tuple(str(row.get(f)) for f in key_fields)
        if key not in newest or str(row["created"]) >= str(newest[key]["created"]):
            newest[key] = row
    return newest


THROUGHPUT_KEY = ("device", "preset", "kernels", "compile", "batch_size", "seq_len", "grad_accum",
                  "gradient_checkpointing")
MICRO_KEY = ("device", "op", "pass", "shape", "dtype")


def _preset_rank(name: Any) -> int:
    return PRESET_ORDER.index(name) if name in PRESET_ORDER else len(PRESET_ORDER)


def _impl_rank(impl: str) -> tuple[int, str]:
    return (IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)


def throughput_rows(results: Results) -> list[dict[str, Any]]:
    """Newest throughput record per configuration, by preset then device, kernels and batch shape."""
    rows = list(_newest(results.throughput, THROUGHPUT_KEY).values())
    return sorted(rows, key=lambda r: (_preset_rank(r.get("preset")), str(r.get("preset")), r["device"],
                                       str(r.get("compile")), str(r.get("seq_len")), str(r.get("batch_size")),
                                       _impl_rank(str(r.get("kernels")))))


def end_to_end_speedups(rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(label, triton tokens/s over reference tokens/s) for configurations measured with both."""
    by_config: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in rows:
        config = tuple(str(row.get(f)) for f in THROUGHPUT_KEY if f != "kernels")
        by_config.setdefault(config, {})[str(row.get("kernels"))] = row
    pairs = []
    for impls in by_config.values():
        if "triton" in impls and "reference" in impls and impls["reference"]["tokens_per_s"]:
            t = impls["triton"]
            label = (f"{t.get('preset')} end to end, {'compiled' if t.get('compile') else 'eager'}, "
                     f"{t.get('batch_size')}x{t.get('seq_len')}")
            pairs.append((label, t["tokens_per_s"] / impls["reference"]["tokens_per_s"]))
    return pairs


def micro_groups(results: Results) -> tuple[list[str], list[dict[str, Any]]]:
    """(impl columns, one row per (device, op, pass, shape, dtype) with each impl's newest record)."""
    newest = _newest(results.micro, (*MICRO_KEY, "impl"))
    impls = sorted({str(r.get("impl")) for r in newest.values()}, key=_impl_rank)
    groups: dict[tuple, dict[str, Any]] = {}
    for row in newest.values():
        key = tuple(str(row.get(f)) for f in MICRO_KEY)
        group = groups.setdefault(key, {"row": row, "impls": {}})
        group["impls"][str(row.get("impl"))] = row
    ordered = [groups[k] for k in sorted(groups)]
    return impls, ordered


def group_speedup(impls: dict[str, dict[str, Any]]) -> tuple[str, float] | None:
    """(baseline name, baseline ms over triton ms) for one micro group, or None without both."""
    baseline = next((b for b in BASELINES if b in impls), None)
    if baseline is None or "triton" not in impls or not impls["triton"]["ms"]:
        return None
    return baseline, impls[baseline]["ms"] / impls["triton"]["ms"]


def micro_speedups(groups: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(label, baseline ms over triton ms) for micro-benchmarks measured with Triton and a baseline."""
    pairs = []
    for group in groups:
        if (found := group_speedup(group["impls"])) is not None:
            row = group["row"]
            parts = [str(row.get(f)) for f in ("op", "pass", "shape", "dtype") if row.get(f) is not None]
            pairs.append((" ".join(parts) + ("" if found[0] == "reference" else f" vs {found[0]}"), found[1]))
    return pairs


GEMM_KEY = ("device", "shape", "role", "dtype")


def _shape_rank(shape: str) -> tuple[int, int, str]:
    """Sort key of a bench_moe shape label "preset,T=tokens,...": preset order, then tokens."""
    parts = shape.split(",")
    tokens = next((int(p[2:]) for p in parts if p.startswith("T=") and p[2:].isdigit()), 0)
    return _preset_rank(parts[0]), tokens, shape


def _role_rank(role: str) -> tuple[int, str]:
    return (ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER), role)


def gemm_rows(results: Results) -> list[dict[str, Any]]:
    """Per (device, shape, role, dtype) measured with Triton: the newest record of each impl, and the
    candidate configs timed in the same file as that Triton record."""
    newest = _newest(results.gemm, (*GEMM_KEY, "impl"))
    groups: dict[tuple, dict[str, Any]] = {}
    for row in newest.values():
        key = tuple(str(row.get(f)) for f in GEMM_KEY)
        groups.setdefault(key, {"impls": {}, "configs": []})["impls"][str(row.get("impl"))] = row
    groups = {key: group for key, group in groups.items() if "triton" in group["impls"]}
    for config in results.gemm_configs:
        group = groups.get(tuple(str(config.get(f)) for f in GEMM_KEY))
        if group is not None and config["file"] == group["impls"]["triton"]["file"]:
            group["configs"].append(config)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], _shape_rank(k[1]), _role_rank(k[2]), k[3]))]


def best_by_variant(configs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The fastest candidate config of each variant (pointer, tma, ...) that ran."""
    best: dict[str, dict[str, Any]] = {}
    for config in configs:
        variant = str(config.get("variant"))
        if config.get("tflops") is not None and (variant not in best or config["tflops"] > best[variant]["tflops"]):
            best[variant] = config
    return best


def _tflops_and_fraction(impls: dict[str, dict[str, Any]], baseline: str) -> list[str]:
    """[baseline TFLOP/s, Triton's throughput as a fraction of it] for one role row."""
    if baseline not in impls or not impls[baseline].get("tflops"):
        return ["-", "-"]
    base = impls[baseline]["tflops"]
    return [f"{base:.1f}", f"{impls['triton']['tflops'] / base:.2f}"]


def render_gemm(gemm: list[dict[str, Any]]) -> list[str]:
    """The grouped-GEMM section: per role, Triton's winner against dense matmul and torch._grouped_mm,
    and the best candidate of each variant the autotuner tried."""
    variants = sorted({v for g in gemm for v in best_by_variant(g["configs"])}, key=lambda v: (v != "pointer", v))
    header = ["shape", "role", "dtype", "Triton ms", "Triton TFLOP/s", "winner", "dense TFLOP/s", "of dense",
              "_grouped_mm TFLOP/s", "of _grouped_mm", *(f"best {v} TFLOP/s" for v in variants), "device", "commit"]
    lines = ["### Grouped GEMM by role", "",
             "Each GEMM role of the MoE layer alone: Triton's autotuned winner (median time per call, the "
             "fastest in brackets, L2 flushed before each call) against one dense `torch.matmul` with the same "
             "FLOPs and `torch._grouped_mm` on the same groups (which fuses no SwiGLU epilogue). \"of\" columns are "
             "Triton's throughput over the baseline's (targets: 0.85 of dense at small and large, 0.75 at tiny, "
             "1.0 of `_grouped_mm`). The best-variant columns are the autotuner's own timings of its candidates "
             "(`pointer`: cp.async loads; `tma`: persistent with TMA descriptors).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in gemm:
        impls, triton = group["impls"], group["impls"]["triton"]
        best = best_by_variant(group["configs"])
        cells = [str(triton.get("shape")), str(triton.get("role")), str(triton.get("dtype", "-")), _ms(triton),
                 _fmt(triton.get("tflops"), ".1f"), f"{triton.get('variant', '?')} {triton.get('config', '')}".strip(),
                 *_tflops_and_fraction(impls, "dense_matmul"), *_tflops_and_fraction(impls, "torch_grouped_mm"),
                 *(f"{best[v]['tflops']:.1f}" if v in best else "-" for v in variants), triton["device"],
                 f"`{triton['commit']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _ms(record: dict[str, Any]) -> str:
    """A record's median ms, with the fastest call's in brackets when it timed more than one."""
    median = _fmt(record.get("ms"), ".3f")
    if record.get("ms_min") is None or record.get("reps") == 1:
        return median
    return f"{median} ({record['ms_min']:.3f})"


def _rate(record: dict[str, Any] | None) -> str:
    """A micro record's achieved bandwidth (with its fraction of copy bandwidth) or arithmetic rate."""
    if record and record.get("gbps") is not None:
        ratio = record.get("copy_ratio")
        return f"{record['gbps']:,.0f} GB/s" + ("" if ratio is None else f" ({100 * ratio:.0f}% of copy)")
    if record and record.get("tflops") is not None:
        return f"{record['tflops']:.1f} TFLOP/s"
    return "-"


def _commits_and_devices(rows: Iterable[dict[str, Any]]) -> tuple[str, str]:
    rows = list(rows)
    commits = sorted({str(r["commit"]) for r in rows})
    devices = sorted({str(r["device"]) for r in rows})
    return ", ".join(f"`{c}`" for c in commits), ", ".join(devices)


def render_markdown(results: Results, chart_link: str | None) -> str:
    """The performance section as markdown (no markers)."""
    if not results.throughput and not results.micro and not results.decode and not results.gemm:
        return ("No benchmark results yet. Measure on a GPU with `python -m bench.throughput --preset tiny` "
                "and `pytest bench/`, then regenerate this section with `python -m bench.report --readme README.md`.")
    lines: list[str] = []
    rows = throughput_rows(results)
    if rows:
        lines += ["### End-to-end training throughput", "",
                  "Real training steps (forward, backward, clip, AdamW) on random tokens, warm-up and compilation "
                  "excluded. MFU counts `flops_per_token` (6 x active parameters + attention) against the "
                  "device's dense bf16 peak.", "",
                  "| preset | kernels | compile | batch x seq (x accum) | tokens/s | MFU | memory | device | commit |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            accum = f" x {r['grad_accum']}" if r.get("grad_accum", 1) != 1 else ""
            ckpt = ", ckpt" if r.get("gradient_checkpointing") else ""
            mfu = r.get("mfu")
            memory = r.get("peak_memory_gb")
            lines.append(
                f"| {r.get('preset', '?')} | {r.get('kernels', '?')} | {'yes' if r.get('compile') else 'no'} | "
                f"{r.get('batch_size', '?')} x {r.get('seq_len', '?')}{accum}{ckpt} | {r['tokens_per_s']:,.0f} | "
                f"{_fmt(None if mfu is None else 100 * mfu, '.1f')}{'%' if mfu is not None else ''} | "
                f"{_fmt(memory, '.1f')}{' GB' if memory is not None else ''} | {r['device']} | `{r['commit']}` |")
        e2e = end_to_end_speedups(rows)
        if e2e:
            lines += [""] + [f"- {label}: Triton kernels {ratio:.2f}x the PyTorch reference" for label, ratio in e2e]
        lines.append("")
    impls, groups = micro_groups(results)
    if groups:
        header = ["op", "pass", "shape", "dtype", *(f"{i} ms" for i in impls), "speedup", "triton rate", "device",
                  "commit"]
        lines += ["### Fused kernels against the PyTorch reference", "",
                  "Median time per call in ms, the fastest call in brackets (timed with an L2 flush before each "
                  "call); speedup is reference time over Triton time (for the older grouped-GEMM records: dense "
                  "cuBLAS time for the same FLOPs over Triton time). Bandwidth counts the bytes an ideal fused "
                  "kernel moves, against a device copy of the same byte count.", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for group in groups:
            row, by_impl = group["row"], group["impls"]
            times = [_ms(by_impl[i]) if i in by_impl else "-" for i in impls]
            found = group_speedup(by_impl)
            speedup = f"{found[1]:.2f}x" if found else "-"
            commit = (by_impl.get("triton") or row)["commit"]
            cells = [str(row.get("op", "?")), str(row.get("pass", "-")), str(row.get("shape", "-")),
                     str(row.get("dtype", "-")), *times, speedup, _rate(by_impl.get("triton")), row["device"],
                     f"`{commit}`"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    gemm = gemm_rows(results)
    if gemm:
        lines += render_gemm(gemm)
    decode = list(_newest(results.decode, ("device", "op", "impl", "shape")).values())
    if decode:
        lines += ["### Generation", "", "| impl | shape | tokens/s | device | commit |", "|---|---|---|---|---|"]
        lines += [f"| {r.get('impl')} | {r.get('shape')} | {r['tokens_per_s']:,.1f} | {r['device']} | `{r['commit']}` |"
                  for r in sorted(decode, key=lambda r: (r["device"], str(r.get("impl"))))]
        lines.append("")
    commits, devices = _commits_and_devices([*rows, *(g["row"] for g in groups), *decode,
                                             *(g["impls"]["triton"] for g in gemm)])
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    lines.append(f"Measured at commit(s) {commits} on {devices}; generated {stamp} by "
                 "`python -m bench.report --readme README.md` from `bench/results/*.json`.")
    if chart_link is not None:
        lines += ["", f"![Speedups of the fused Triton kernels over the PyTorch reference]({chart_link})"]
    return "\n".join(lines) + "\n"


def draw_chart(bars: list[tuple[str, float, str]], path: Path) -> Path | None:
    """A horizontal bar chart of (label, speedup, kind) at `path`; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no chart drawn", file=sys.stderr)
        return None
    colours = {"micro": "#4c72b0", "end to end": "#dd8452"}
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(bars) + 1.5))
    labels = [label for label, _, _ in bars]
    speedups = [s for _, s, _ in bars]
    ax.barh(range(len(bars)), speedups, color=[colours[kind] for _, _, kind in bars])
    for i, speedup in enumerate(speedups):
        ax.text(speedup, i, f" {speedup:.2f}x", va="center", fontsize=8)
    ax.set_xlim(0, max(speedups) * 1.15)
    ax.set_yticks(range(len(bars)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup of the Triton kernels over the PyTorch reference (x)")
    ax.legend(handles=[Patch(color=colour, label=kind) for kind, colour in colours.items()], loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def replace_between_markers(text: str, section: str) -> str:
    """`text` with everything between the perf markers replaced by `section`."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {START_MARKER} ... {END_MARKER} pair to replace")
    return text[: start + len(START_MARKER)] + "\n" + section.rstrip("\n") + "\n" + text[end:]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="folder of result JSON files")
    p.add_argument("--out", type=Path, help="write the markdown here instead of stdout")
    p.add_argument("--readme", type=Path, help="replace the text between the perf markers of this README")
    p.add_argument("--chart", type=Path, help="PNG path for the speedup chart (default: RESULTS_DIR/speedups.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = load_results(args.results_dir) if args.results_dir.is_dir() else Results()
    for skipped in results.skipped:
        print(f"skipped unreadable result file {skipped}", file=sys.stderr)
    rows = throughput_rows(results)
    _, groups = micro_groups(results)
    bars = [(label, s, "micro") for label, s in micro_speedups(groups)]
    bars += [(label, s, "end to end") for label, s in end_to_end_speedups(rows)]
    chart = draw_chart(bars, args.chart or args.results_dir / "speedups.png") if bars else None
    link_base = args.readme.resolve().parent if args.readme else (args.out.resolve().parent if args.out else Path.cwd())
    chart_link = Path(os.path.relpath(chart.resolve(), link_base)).as_posix() if chart else None
    section = render_markdown(results, chart_link)
    if args.readme:
        try:
            args.readme.write_text(replace_between_markers(args.readme.read_text(), section))
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"updated the performance section of {args.readme}")
    elif args.out:
        args.out.write_text(section)
        print(f"wrote {args.out}")
    else:
        print(section, end="")
    if chart:
        print(f"chart written to {chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
