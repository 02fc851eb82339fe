"""`python -m bench.throughput`: end-to-end training tokens/s and MFU of a preset, Triton kernels vs reference.

Each run builds the trainer's own `Trainer` (tachyon.trainer.build_trainer) for a preset and times
`Trainer.train_step`, the very step `python -m tachyon.train` runs: the learning-rate schedule, forward
(bf16 autocast on a CUDA GPU that has it, fp32 on the CPU), backward, gradient clipping, the AdamW update
(fused on CUDA) unless the gradient is non-finite, and the logged metrics' device-side sums. Batches are
synthetic random tokens, or real shards through the trainer's loader with `--data-dir`. Warm-up steps,
which include torch.compile's compilation, are not timed.
`--kernels both` measures the Triton and the reference backends in one process and prints the
ratio; `--profile` adds a torch.profiler breakdown of one step; `--memory-test` finds the
largest batch that fits on the GPU. Results go to bench/results/ as JSON (on the CPU only with
`--save`, so smoke runs leave the repository clean).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import kernels
from bench.harness import environment, write_results
from tachyon.config import PRESETS, ModelConfig, active_params, flops_per_token, get_preset, total_params
from tachyon.errors import TachyonError, run_cli
from tachyon.hardware import autocast_dtype, bf16_peak_flops, peak_memory_gb, resolve_device
from tachyon.train import make_loaders, real_data_schedule
from tachyon.trainer import Batch, StepSettings, Trainer, build_trainer

# Defaults by device: the original's tiny run on a GPU, a seconds-long smoke size on the CPU.
GPU_DEFAULTS = dict(batch_size=32, seq_len=2048, steps=20, warmup=5)
CPU_DEFAULTS = dict(batch_size=2, seq_len=128, steps=3, warmup=1)
SYNTHETIC_BATCHES = 4  # distinct random batches the timed steps rotate through
MAX_MEMORY_TEST_BATCH = 4096  # --memory-test stops doubling here


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", default="tiny", choices=list(PRESETS), help="model preset")
    a("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
      help="override a ModelConfig field of the preset, e.g. --set n_layers=2 (repeatable)")
    a("--kernels", choices=("triton", "reference", "both"),
      help="backend(s) to time; 'both' runs triton then reference in this process and prints the ratio "
           "(default: both on CUDA; reference on the CPU, where Triton only runs in its slow interpreter)")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the model (default: on for CUDA, off for the CPU)")
    a("--batch-size", type=int, help="sequences per micro-batch (default 32 on CUDA, 2 on the CPU)")
    a("--seq-len", type=int, help="tokens per sequence (default 2048 on CUDA, 128 on the CPU)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--steps", type=int, help="timed optimizer steps (default 20 on CUDA, 3 on the CPU)")
    a("--warmup", type=int, help="untimed steps first, compilation included (default 5 on CUDA, 1 on the CPU)")
    a("--gradient-checkpointing", action="store_true", help="recompute each block's activations in backward")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--seed", type=int, default=0, help="seed for the weights, the synthetic tokens and the data order")
    a("--data-dir", type=Path, help="time on these shard_*.npy files, read by the trainer's loader "
      "(default: synthetic random tokens)")
    a("--profile", action="store_true", help="print a torch.profiler table of one step's top ops")
    a("--memory-test", action="store_true", help="find the largest batch size that fits (CUDA only)")
    a("--save", dest="save", action="store_true", default=None, help="write bench/results JSON (default on CUDA)")
    a("--no-save", dest="save", action="store_false", help="do not write bench/results JSON")
    a("--out", help="also write the JSON to this path")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill device-dependent defaults and check the numbers."""
    args.device = resolve_device(args.device)
    on_cuda = args.device.type == "cuda"
    for key, value in (GPU_DEFAULTS if on_cuda else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile is None:
        args.compile = on_cuda
    if args.kernels is None:
        args.kernels = "both" if on_cuda else "reference"
    if args.save is None:
        args.save = on_cuda
    for name in ("batch_size", "seq_len", "grad_accum", "steps"):
        if getattr(args, name) < 1:
            raise TachyonError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise TachyonError(f"--warmup must be at least 0, got {args.warmup}")
    if args.memory_test and not on_cuda:
        raise TachyonError("--memory-test needs a CUDA device (the CPU has no out-of-memory signal to find)")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The preset with the --set overrides (ints, floats as written) and room for --seq-len."""
    config = get_preset(args.preset)
    changes: dict[str, Any] = {}
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise TachyonError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        changes[key] = _number(item, value)
    try:
        config = config.replace(**changes) if changes else config
    except (ValueError, TypeError) as e:
        raise TachyonError(f"--set {' '.join(args.overrides)}: {e}") from None
    if args.seq_len > config.max_seq_len:
        raise TachyonError(f"--seq-len {args.seq_len} exceeds the preset's max_seq_len {config.max_seq_len}")
    return config


def _number(item: str, value: str) -> int | float:
    """An int, else a float, from the VALUE of --set FIELD=VALUE."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    raise TachyonError(f"--set {item!r}: {value!r} is not a number")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch_source(config: ModelConfig, args: argparse.Namespace, batch_size: int) -> Iterator[Batch]:
    """The batches to time: --data-dir through the trainer's own loader, else SYNTHETIC_BATCHES random batches
    (never zeros) kept on the device and used in turn, drawn from --seed apart from the weights' RNG."""
    if args.data_dir is not None:
        loader, _ = make_loaders(args.data_dir, batch_size=batch_size, seq_len=args.seq_len, seed=args.seed,
                                 vocab_size=config.vocab_size, device=args.device)
        return loader
    generator = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(SYNTHETIC_BATCHES):
        seq = torch.randint(0, config.vocab_size, (batch_size, args.seq_len + 1), generator=generator)
        batches.append((seq[:, :-1].contiguous().to(args.device), seq[:, 1:].contiguous().to(args.device)))
    return itertools.cycle(batches)


def new_trainer(config: ModelConfig, args: argparse.Namespace, batch_size: int) -> Trainer:
    """The trainer's own Trainer, built as `python -m tachyon.train` builds it for a real-data run with default
    options (schedule, clipping, weight decay, autocast dtype), over `batch_source`'s batches."""
    settings = StepSettings(real_data_schedule(), grad_accum=args.grad_accum, amp_dtype=autocast_dtype(args.device))
    return build_trainer(config, batch_source(config, args, batch_size), args.device, settings, seed=args.seed,
                         compile=args.compile, grad_ckpt=args.gradient_checkpointing)


def timed_steps(trainer: Trainer, steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of `Trainer.train_step`: CUDA events around the whole loop (no per-step sync)."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            trainer.train_step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return time.perf_counter() - t0


def phase_breakdown(trainer: Trainer, device: torch.device) -> dict[str, float]:
    """Milliseconds of one step spent in forward, backward and optimizer (CUDA events at phase ends)."""
    on_cuda = device.type == "cuda"
    stamps: list[tuple[str, Any]] = []

    def mark(phase: str) -> None:
        if on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            stamps.append((phase, event))
        else:
            stamps.append((phase, time.perf_counter()))

    sync(device)
    mark("start")
    trainer.train_step(mark)
    sync(device)
    totals: dict[str, float] = {}
    for (_, before), (phase, after) in zip(stamps, stamps[1:], strict=False):
        ms = before.elapsed_time(after) if on_cuda else 1e3 * (after - before)
        totals[phase] = totals.get(phase, 0.0) + ms
    return totals


def profile_step(trainer: Trainer, device: torch.device, rows: int = 25) -> tuple[str, list[dict[str, Any]]]:
    """A torch.profiler table of one (already warm) step's ops by self time, and its top rows as records."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        trainer.train_step()
        sync(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    table = events.table(sort_by=attr, row_limit=rows)
    ranked = sorted(events, key=lambda e: getattr(e, attr, 0.0), reverse=True)[:rows]
    top = [{"op": e.key, "self_ms": getattr(e, attr, 0.0) / 1e3, "calls": e.count} for e in ranked]
    return table, top


def run_backend(config: ModelConfig, args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """Time one backend; returns the record for the JSON (and prints a line)."""
    if args.compile:
        torch._dynamo.reset()  # the backend is read at trace time: start each backend from a fresh cache
    gc.collect()  # the previous backend's model and optimizer must not count in this one's peak memory
    on_cuda = args.device.type == "cuda"
    if on_cuda:
        torch.cuda.empty_cache()
    with kernels.use(backend):
        trainer = new_trainer(config, args, args.batch_size)
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            trainer.train_step()
        sync(args.device)
        warmup_s = time.perf_counter() - t0
        trainer.stats.interval(args.grad_accum)  # the loss reported is the timed steps' mean
        seconds = timed_steps(trainer, args.steps, args.device)
        loss = trainer.stats.interval(args.grad_accum).loss
        memory = peak_memory_gb(args.device)
        if args.profile:
            breakdown = phase_breakdown(trainer, args.device)
            profile_table, profile_top = profile_step(trainer, args.device)
    tokens = args.steps * args.grad_accum * args.batch_size * args.seq_len
    tokens_per_s = tokens / seconds
    device_name, peak = bf16_peak_flops(args.device)
    flops_tok = flops_per_token(config, args.seq_len)
    mfu = tokens_per_s * flops_tok / peak if peak else None
    amp = trainer.settings.amp_dtype
    record = {
        "preset": args.preset, "kernels": backend, "compile": args.compile, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "grad_accum": args.grad_accum, "steps": args.steps, "warmup": args.warmup,
        "gradient_checkpointing": args.gradient_checkpointing,
        "dtype": f"{str(amp).removeprefix('torch.').replace('bfloat16', 'bf16')}-autocast" if amp else "fp32",
        "data": str(args.data_dir) if args.data_dir is not None else "synthetic",
        "tokens_per_s": tokens_per_s, "step_ms": 1e3 * seconds / args.steps, "warmup_s": warmup_s, "mfu": mfu,
        "flops_per_token": flops_tok, "peak_flops": peak, "device_name": device_name, "peak_memory_gb": memory,
        "memory_kind": "cuda max allocated" if on_cuda else "process peak RSS", "loss": loss,
    }
    mfu_text = f"MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 dense" if mfu is not None else \
        "MFU n/a (no known bf16 peak)"
    print(f"[{backend:>9}] {tokens_per_s:,.0f} tokens/s | {record['step_ms']:.1f} ms/step | {mfu_text} | "
          f"peak memory {memory:.2f} GB ({record['memory_kind']}) | warm-up {warmup_s:.1f} s | loss {loss:.3f} | "
          f"{device_name}", flush=True)
    if args.profile:
        parts = " | ".join(f"{phase} {ms:.1f} ms" for phase, ms in breakdown.items())
        print(f"\nstep-time breakdown of one {backend} step: {parts}\n"
              f"top ops of one {backend} step by self {'CUDA' if on_cuda else 'CPU'} "
              f"time:\n{profile_table}", flush=True)
        record["step_breakdown_ms"] = breakdown
        record["profile_top"] = profile_top
    return record


def largest_fitting(fits: Callable[[int], bool], start: int = 1, limit: int = MAX_MEMORY_TEST_BATCH) -> int:
    """The largest n in [1, limit] with fits(n), for fits monotone: double from `start`, then bisect.

    Returns 0 when even a batch of 1 does not fit, and the last doubling under `limit` when all fit.
    """
    good, n = 0, max(1, start)
    while n <= limit and fits(n):
        good, n = n, n * 2
    if n > limit:
        return good
    bad = n  # the first size that did not fit; good (0 if `start` failed) is the last that did
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def memory_test(config: ModelConfig, args: argparse.Namespace, backend: str) -> int:
    """The largest micro-batch that completes two training steps without a CUDA out-of-memory error."""

    def fits(batch: int) -> bool:
        if args.compile:
            torch._dynamo.reset()  # each size is a new model: keep under dynamo's recompile limit
        trainer = None
        ok = True
        try:
            trainer = new_trainer(config, args, batch)
            for _ in range(2):  # the second step holds the optimizer state too
                trainer.train_step()
            sync(args.device)
        except torch.cuda.OutOfMemoryError:
            ok = False
        # Free outside the except block: its traceback would keep the failed step's tensors alive.
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
        print(f"  batch {batch:>5} x {args.seq_len}: {'fits' if ok else 'out of memory'}", flush=True)
        return ok

    with kernels.use(backend):
        return largest_fitting(fits, start=args.batch_size)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: measure(args))


def measure(args: argparse.Namespace) -> None:
    """Run the measurements `args` ask for, print them and write the results."""
    args = resolve_args(args)
    config = model_config(args)
    backends = ["triton", "reference"] if args.kernels == "both" else [args.kernels]
    device_name, peak = bf16_peak_flops(args.device)
    print(f"{args.preset}: {total_params(config) / 1e6:.1f}M params, {active_params(config) / 1e6:.1f}M active, "
          f"{flops_per_token(config, args.seq_len) / 1e9:.2f} GFLOP/token | {device_name}"
          + (f" (bf16 dense peak {peak / 1e12:.0f} TFLOP/s)" if peak else "")
          + f" | batch {args.batch_size} x seq {args.seq_len} x accum {args.grad_accum} | compile={args.compile} | "
          f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)

    records = []
    if args.memory_test:
        for backend in backends:
            largest = memory_test(config, args, backend)
            print(f"[{backend:>9}] largest batch that fits: {largest} x {args.seq_len} tokens", flush=True)
            records.append({"preset": args.preset, "kernels": backend, "compile": args.compile,
                            "seq_len": args.seq_len, "largest_batch": largest, "device_name": device_name})
    else:
        for backend in backends:
            records.append(run_backend(config, args, backend))
        if len(records) == 2:
            ratio = records[0]["tokens_per_s"] / records[1]["tokens_per_s"]
            print(f"triton / reference: {ratio:.2f}x tokens/s", flush=True)

    if args.save or args.out:
        plain = (bool, int, float, str, list, type(None))
        extra = {"config": dataclasses.asdict(config),
                 "args": {k: v if isinstance(v, plain) else str(v) for k, v in vars(args).items()}}
        if args.save:
            path = write_results("throughput", records, extra=extra)
            print(f"results written to {path}")
        if args.out:
            payload = {"name": "throughput", "environment": environment(), **extra, "records": records}
            Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
            print(f"results written to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
