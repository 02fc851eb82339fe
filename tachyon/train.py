"""`python -m tachyon.train`: pretrain a Tachyon MoE model.

With no arguments it trains the `nano` preset on the embedded default corpus (the Python
standard library's sources and docs, tokenized by a BPE tokenizer trained on them) on the CPU
or GPU, in a few minutes. With `--data-dir` it trains on `shard_*.npy` token shards, e.g. the
original PreprocessedMIXED shards with `--tokenizer pile_tokenizer.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import kernels

from .checkpoint import (
    DEFAULT_RUN_DIR,
    RunLock,
    archive_previous_run,
    check_resumable,
    checkpoint_config,
    free_space,
    io_reason,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_dir,
    remove_stale_temps,
    save_checkpoint,
)
from .config import PRESETS, ModelConfig, active_params, flops_per_token, get_preset, total_params
from .data import BatchLoader, embedded_default
from .errors import Interrupted, TachyonError, run_cli
from .hardware import bf16_peak_flops, resolve_device
from .model import TachyonLM
from .optim import lr_at, make_optimizer
from .tokenizer import Tokenizer, check_fits, check_same_tokenizer, load_tokenizer, padded_vocab_size

# Defaults that differ between a quick run on the embedded corpus and a real-data run; the
# real-data values are the original trainer's.
EMBEDDED_DEFAULTS = dict(preset="nano", batch_size=16, seq_len=256, lr=2e-3, min_lr=2e-4, warmup=20,
                         max_steps=120, log_interval=10, save_interval=0, eval_interval=60, val_fraction=0.01)
REAL_DATA_DEFAULTS = dict(preset="tiny", batch_size=32, seq_len=2048, lr=3e-4, min_lr=3e-5, warmup=1000,
                          max_steps=100_000, log_interval=10, save_interval=1000, eval_interval=1000,
                          val_fraction=0.0)
MAX_BAD_STEPS = 3  # consecutive non-finite losses before the run stops
# The smallest value of each integer option (the CLI spelling is the name with '-' for '_').
INT_MINIMUM = dict(batch_size=1, grad_accum=1, seq_len=2, max_steps=1, log_interval=1, eval_batches=1, warmup=0,
                   save_interval=0, eval_interval=0, keep_last=0, val_shards=0, num_workers=0, seed=0)
MAX_SEED = 2**32 - 1  # numpy's seed range


class _HelpFormatter(argparse.HelpFormatter):
    """Shows '(default: X)' for options with a plain default; options whose default depends on the data say so."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default not in (None, argparse.SUPPRESS) and not isinstance(default, bool) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _by_data(key: str) -> str:
    """'(default: X on the embedded corpus, Y on --data-dir)' for an option whose default depends on the data."""
    return f"(default: {EMBEDDED_DEFAULTS[key]} on the embedded corpus, {REAL_DATA_DEFAULTS[key]} on --data-dir)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tachyon.train", description=__doc__.splitlines()[0],
                                formatter_class=_HelpFormatter)
    a = p.add_argument
    a("--preset", "--model_size", "--model-size", dest="preset",
      help=f"model preset: {', '.join(PRESETS)} {_by_data('preset')}")
    a("--data-dir", "--data_dir", dest="data_dir", type=Path, help="folder of shard_*.npy (default: embedded corpus)")
    a("--tokenizer", type=Path, help="tokenizers JSON matching the shards (default: embedded tokenizer)")
    a("--batch-size", "--batch_size", dest="batch_size", type=int,
      help=f"sequences per micro-batch {_by_data('batch_size')}")
    a("--grad-accum", "--grad_accum", "--gradient_accumulation_steps", dest="grad_accum", type=int, default=1,
      help="micro-batches per optimizer step")
    a("--seq-len", "--seq_len", dest="seq_len", type=int, help=f"tokens per sequence {_by_data('seq_len')}")
    a("--lr", type=float, help=f"peak learning rate {_by_data('lr')}")
    a("--min-lr", "--min_lr", dest="min_lr", type=float,
      help=f"final learning rate of the cosine decay {_by_data('min_lr')}")
    a("--warmup", "--warmup_steps", dest="warmup", type=int, help=f"linear warmup steps {_by_data('warmup')}")
    a("--max-steps", "--max_steps", dest="max_steps", type=int, help=f"optimizer steps {_by_data('max_steps')}")
    a("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=0.1,
      help="AdamW weight decay (not on norms, biases or embeddings)")
    a("--grad-clip", "--grad_clip", dest="grad_clip", type=float, default=1.0,
      help="clip the gradient norm to this (0: no clipping)")
    a("--log-interval", "--log_interval", dest="log_interval", type=int,
      help=f"steps between log lines {_by_data('log_interval')}")
    a("--save-interval", "--save_interval", dest="save_interval", type=int,
      help=f"steps between checkpoints, 0: only at the end {_by_data('save_interval')}")
    a("--save-dir", "--save_dir", dest="save_dir", type=Path,
      help=f"run directory for checkpoints and metrics.jsonl (default: {DEFAULT_RUN_DIR} or runs/<preset>)")
    a("--keep-last", "--keep_last", dest="keep_last", type=int, default=3,
      help="checkpoints kept, older ones deleted (0: keep all)")
    a("--resume", help="'latest' (newest checkpoint in --save-dir) or a checkpoint path")
    a("--eval-interval", "--eval_interval", dest="eval_interval", type=int,
      help=f"steps between validation evals, 0: only at the end {_by_data('eval_interval')}")
    a("--eval-batches", "--eval_batches", dest="eval_batches", type=int, default=8, help="batches per validation eval")
    a("--val-fraction", "--val_fraction", dest="val_fraction", type=float,
      help=f"fraction of sequences held out for validation {_by_data('val_fraction')}")
    a("--val-shards", "--val_shards", dest="val_shards", type=int, default=0,
      help="last N shards held out for validation")
    a("--no-compile", "--no_compile", dest="compile", action="store_false",
      help="do not torch.compile the model (compiled by default on CUDA)")
    a("--gradient-checkpointing", "--gradient_checkpointing", dest="grad_ckpt", action="store_true", default=None,
      help="recompute activations in backward to save memory")
    a("--no-gradient-checkpointing", "--no_gradient_checkpointing", dest="grad_ckpt", action="store_false",
      help="keep activations (default except for the medium and large presets on CUDA)")
    a("--num-workers", "--num_workers", dest="num_workers", type=int, default=0, help="data prefetch workers")
    a("--seed", type=int, default=42, help="seed for initialisation and data order")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
      help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    a("--kernels", default=None, choices=kernels.BACKENDS,
      help="fused Triton kernels, the PyTorch reference, or auto: Triton on CUDA (default: $TACHYON_KERNELS or auto)")
    a("--tensorboard", action="store_true", help="also log to TensorBoard in the run directory")
    a("--save-on-interrupt", dest="save_on_interrupt", action=argparse.BooleanOptionalAction,
      default=None, help="save a checkpoint when stopped by SIGTERM or Ctrl-C (default: on for SIGTERM, off for "
      "Ctrl-C)")
    return p


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse any numeric option that is not finite or out of its range, before any work is done."""
    for name, least in INT_MINIMUM.items():
        if getattr(args, name) < least:
            raise TachyonError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.seed > MAX_SEED:
        raise TachyonError(f"--seed must be at most {MAX_SEED}, got {args.seed}")
    for name in ("lr", "min_lr", "weight_decay", "grad_clip", "val_fraction"):
        if not math.isfinite(getattr(args, name)):
            raise TachyonError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if not args.lr > 0:
        raise TachyonError(f"--lr must be above 0, got {args.lr}")
    for name in ("min_lr", "weight_decay", "grad_clip"):
        if getattr(args, name) < 0:
            raise TachyonError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.min_lr > args.lr:
        raise TachyonError(f"--min-lr {args.min_lr} is above --lr {args.lr}: the schedule decays from --lr to --min-lr")
    if not 0 <= args.val_fraction < 1:
        raise TachyonError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the embedded or real-data defaults and check them."""
    defaults = EMBEDDED_DEFAULTS if args.data_dir is None else REAL_DATA_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.save_dir is None:
        if args.data_dir is not None:
            args.save_dir = Path("runs") / args.preset
        else:  # the nano run lands where `python -m tachyon.generate` looks by default
            args.save_dir = DEFAULT_RUN_DIR if args.preset == "nano" else Path("runs") / f"default-{args.preset}"
    preset = get_preset(args.preset)  # checked before any data is built
    check_numbers(args)
    if args.seq_len > preset.max_seq_len:
        raise TachyonError(f"--seq-len {args.seq_len} exceeds the {args.preset} preset's max_seq_len "
                           f"{preset.max_seq_len}: use --seq-len {preset.max_seq_len} or less")
    args.device = resolve_device(args.device)
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.grad_ckpt is None:
        args.grad_ckpt = args.device.startswith("cuda") and args.preset in ("medium", "large")
    args.compile = args.compile and args.device.startswith("cuda")
    return args


def model_config(args: argparse.Namespace, tokenizer: Tokenizer | None) -> ModelConfig:
    """The preset, with vocab_size shrunk to the tokenizer's (padded to 64) when it is smaller."""
    config = get_preset(args.preset)
    if tokenizer is not None:
        check_fits(tokenizer, config.vocab_size)
        config = config.replace(vocab_size=min(config.vocab_size, padded_vocab_size(tokenizer.vocab_size)))
    return config


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_mismatch(saved: ModelConfig, wanted: ModelConfig) -> str:
    """A short list of the fields where two configs differ ('' when they agree)."""
    a, b = dataclasses.asdict(saved), dataclasses.asdict(wanted)
    return ", ".join(f"{k} {a[k]} (checkpoint) vs {b[k]} (requested)" for k in a if a[k] != b[k])


def find_resume(args: argparse.Namespace) -> Path | None:
    """The checkpoint --resume names: 'latest' in --save-dir, the newest in a given run directory, or a file."""
    if args.resume is None:
        return None
    folder = args.save_dir if args.resume == "latest" else Path(args.resume)
    if args.resume != "latest" and not folder.is_dir():
        return folder
    path = latest_checkpoint(folder)
    if path is None:
        raise TachyonError(f"--resume {args.resume}: no checkpoint_<step>.pt in {folder} to resume from "
                           "(drop --resume to start a new run, or pass --save-dir of an earlier run)")
    return path


def load_resume(path: Path, config: ModelConfig, tokenizer: Tokenizer | None, explicit_tokenizer: bool
                ) -> dict[str, Any]:
    """Read the checkpoint to resume from and check that it belongs to this run: config and tokenizer."""
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, path)
    if diff := config_mismatch(checkpoint_config(ckpt, path), config):
        raise TachyonError(f"checkpoint {path} was trained with another config: {diff}")
    if tokenizer is not None:
        check_same_tokenizer(ckpt.get("tokenizer_sha256"), tokenizer, f"checkpoint {path}", explicit_tokenizer)
    return ckpt


def memory_gb(device: str) -> float:
    """Peak memory of this run: CUDA allocator peak, or the process's peak RSS on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


class MetricsLog:
    """Appends one JSON object per logged step or eval to run_dir/metrics.jsonl (and TensorBoard if asked).

    The run directory is claimed at the first record, so a run that fails before completing a step
    leaves it exactly as it was: a new run then moves an earlier run's files to previous/<time>/; a
    resumed run moves checkpoints past its step there and drops the metrics logged after its checkpoint.
    """

    def __init__(self, run_dir: Path, tensorboard: bool, resumed_at: int | None = None) -> None:
        self.run_dir, self.tensorboard, self.resumed_at = run_dir, tensorboard, resumed_at
        self.path = run_dir / "metrics.jsonl"
        self.claimed = False
        self.archive: Path | None = None  # where an earlier run's files were moved, if anywhere
        self.writer = None
        if tensorboard:
            try:
                import torch.utils.tensorboard  # noqa: F401 - checked now, used at the first record
            except ImportError:
                raise TachyonError("--tensorboard needs the tensorboard package: pip install tensorboard") from None

    def _claim(self) -> None:
        self.claimed = True
        self.archive = archive_previous_run(self.run_dir, after_step=self.resumed_at)
        if self.archive is not None:
            what = "an earlier run" if self.resumed_at is None else f"checkpoints past step {self.resumed_at}"
            tqdm.write(f"{self.run_dir} held {what}: moved to {self.archive}")
        if self.resumed_at is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _logged_step(line) <= self.resumed_at]
            self.path.write_text("".join(line + "\n" for line in kept))
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """Append `record`; a full disk or a permission change since the start is one TachyonError line."""
        if not self.claimed:
            self._claim()
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise TachyonError(f"could not append to {self.path} ({io_reason(exc)}; {free_space(self.run_dir)})"
                               ) from None
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a blank or torn line (a run killed mid-write), so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def guarded_step(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
    """Apply the update unless the gradient norm is non-finite; returns 1.0 for a skipped step, else 0.0.

    The fused CUDA AdamW skips on the device through its `found_inf` input, so no host sync is
    needed; elsewhere the check costs one sync per step.
    """
    bad = (~torch.isfinite(grad_norm)).float()
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = bad
        optimizer.step()
    elif not bad.item():
        optimizer.step()
    return bad


def saved_so_far(run_dir: Path, archive: Path | None) -> str:
    """Where the last good weights are, for an error that ends a run."""
    if (last := latest_checkpoint(run_dir)) is not None:
        return f"the last good checkpoint {last} is untouched"
    return "no checkpoint of this run was saved" + (f"; the earlier run's are in {archive}" if archive else "")


def bad_streak_checked(streak: torch.Tensor, device: torch.device) -> bool:
    """On the CPU (already synchronised each step) look at the streak every step; on CUDA only at log lines."""
    return device.type != "cuda" and streak.item() > 0


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: BatchLoader, batches: int,
             autocast: Callable[[], AbstractContextManager]) -> float:
    """Mean cross-entropy over the first `batches` validation batches (the same ones at every eval)."""
    loader.reset()
    model.eval()
    total = torch.zeros((), device=next(model.parameters()).device)
    for _ in range(batches):
        x, y = next(loader)
        with autocast():
            total += model(x, y).ce.float()
    model.train()
    return (total / batches).item()


class StopSignals:
    """While active, SIGTERM (what schedulers send before killing a job) and SIGINT (Ctrl-C) ask the run to stop.

    The first signal only sets `signum`: the trainer finishes the current step (and a save in progress), then
    stops cleanly. A second one raises KeyboardInterrupt at once, abandoning the step. Signal handlers exist only
    in the main thread; elsewhere this does nothing and the default behaviour stays.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    @property
    def exit_code(self) -> int:
        """128 + the signal, as a shell reports a process the signal killed: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + int(self.signum or signal.SIGINT)


def params_finite(model: torch.nn.Module) -> torch.Tensor:
    """A 0-d bool tensor on the model's device: are all parameters finite? One fused norm, no host sync.

    Non-finite parameters stay non-finite (every later loss is non-finite, so every later step is skipped), so
    checking at log and save points is enough to catch an update that overflowed.
    """
    norms = torch._foreach_norm([p.detach() for p in model.parameters()])
    return torch.stack(norms).isfinite().all()


def claim_run_dir(run_dir: Path, log: Callable[[str], None]) -> RunLock:
    """Check that the run directory is writable, lock it for this run, and clear what killed runs left there."""
    prepare_run_dir(run_dir)
    lock = RunLock(run_dir).acquire()
    count, size = remove_stale_temps(run_dir)
    if count:
        log(f"removed {count} temporary checkpoint file(s) ({size / 1e6:.1f} MB) left by a killed run in {run_dir}")
    return lock


def train(args: argparse.Namespace) -> Path:
    """Run training as `args` says; returns the path of the final checkpoint.

    The run directory is locked for the whole run, so a second trainer there is refused (naming this one's PID).
    """
    args = resolve_args(args)
    lock = claim_run_dir(Path(args.save_dir), tqdm.write)
    try:
        return _train(args)
    finally:
        lock.release()


def _train(args: argparse.Namespace) -> Path:
    """The body of `train`, run while the run directory is locked."""
    if args.kernels is not None:
        kernels.set_backend(args.kernels)
    log = tqdm.write
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    if args.data_dir is None:
        data_dir, tokenizer_path = embedded_default(seq_len=args.seq_len, log=log)
        tokenizer_path = args.tokenizer or tokenizer_path
    else:
        data_dir, tokenizer_path = args.data_dir, args.tokenizer
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    config = model_config(args, tokenizer)

    resume_path = find_resume(args)
    ckpt = load_resume(resume_path, config, tokenizer, args.tokenizer is not None) if resume_path else None

    pad_id = tokenizer.pad_id if tokenizer is not None else 1  # shards without a tokenizer: the original's layout
    loader_args = dict(batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, vocab_size=config.vocab_size,
                       device=args.device, val_fraction=args.val_fraction, val_shards=args.val_shards, pad_id=pad_id)
    loader = BatchLoader(data_dir, split="train", num_workers=args.num_workers, **loader_args)
    val_loader = (BatchLoader(data_dir, split="val", **loader_args)
                  if args.val_fraction > 0 or args.val_shards > 0 else None)
    if val_loader is None:
        log("no validation split, so no validation loss: pass --val-fraction 0.01 or --val-shards 1 to get one")

    device = torch.device(args.device)
    model = TachyonLM(config).to(device)
    model.gradient_checkpointing = args.grad_ckpt
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        log(f"resumed from {resume_path} at step {step}")
    step_model = torch.compile(model) if args.compile else model
    use_bf16 = args.dtype == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    flops_tok = flops_per_token(config, args.seq_len)
    device_name, peak = bf16_peak_flops(device)
    run_dir = Path(args.save_dir)
    metrics = MetricsLog(run_dir, args.tensorboard, resumed_at=step if ckpt is not None else None)
    log(f"model {args.preset}: {total_params(config) / 1e6:.1f}M params, {active_params(config) / 1e6:.1f}M active, "
        f"vocab {config.vocab_size} | {device_name}, {args.dtype}, kernels={kernels.get_backend()}, "
        f"compile={args.compile}, grad-ckpt={args.grad_ckpt} | {tokens_per_step:,} tokens/step, "
        f"{args.max_steps} steps | run dir {run_dir}")

    def diverged(why: str) -> TachyonError:
        return TachyonError(f"training diverged: {why}; {saved_so_far(run_dir, metrics.archive)} (try a lower --lr)")

    def save() -> Path:
        """Checkpoint the current step; never from a model whose parameters are no longer finite."""
        if not bool(params_finite(model)):
            raise diverged(f"the parameters are non-finite at step {step}, so it was not saved")
        return save_checkpoint(run_dir, step, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config,
            "data": loader.state_dict(), "rng": rng_state(), "args": {k: str(v) for k, v in vars(args).items()},
            "tokenizer_path": str(Path(tokenizer_path).resolve()) if tokenizer_path else None,
            "tokenizer_sha256": tokenizer.sha256 if tokenizer else None}, args.keep_last)

    def run_eval() -> None:
        if val_loader is None:
            return
        val_loss = evaluate(step_model, val_loader, args.eval_batches, autocast)
        log(f"step {step:>6} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.1f}")
        metrics.write({"kind": "eval", "step": step, "val_loss": val_loss})

    def stopped(signals: StopSignals, last_path: Path | None) -> Interrupted:
        """Stop at the end of a step on a signal, saving first when asked to (default: on SIGTERM only)."""
        save_wanted = args.save_on_interrupt if args.save_on_interrupt is not None else \
            signals.signum == signal.SIGTERM
        if save_wanted and (last_path is None or last_path.name != f"checkpoint_{step}.pt"):
            last_path = save()
        if last_path is not None and last_path.name == f"checkpoint_{step}.pt":
            what = f"saved {last_path}; continue with --resume latest"
        else:
            what = f"not saved (--save-on-interrupt saves); {saved_so_far(run_dir, metrics.archive)}"
        return Interrupted(f"stopped by {signals.name} after step {step}: {what}", signals.exit_code)

    sums = torch.zeros(4, device=device)  # loss, ce, z_loss, balance summed over the applied steps' micro-batches
    step_sums = torch.zeros(4, device=device)  # the same for the current step only
    fractions = torch.zeros(config.n_layers, config.n_routed_experts, device=device)
    streak, skipped = torch.zeros((), device=device), torch.zeros((), device=device)
    applied = torch.zeros((), device=device)  # steps since the last log line whose update was applied
    max_norm = args.grad_clip if args.grad_clip > 0 else math.inf
    interval_steps, interval_start = 0, time.perf_counter()
    last_path = None
    bar = tqdm(total=args.max_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
               disable=not sys.stderr.isatty())
    signals = StopSignals()
    try:
        with signals:
            while step < args.max_steps:
                lr = lr_at(step, args.lr, args.min_lr, args.warmup, args.max_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for _ in range(args.grad_accum):
                    x, y = next(loader)
                    with autocast():
                        out = step_model(x, y)
                    (out.loss / args.grad_accum).backward()
                    step_sums += torch.stack([out.loss, out.ce, out.z_loss, out.balance_loss]).detach().float()
                    fractions += out.expert_fraction.detach()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                bad = guarded_step(optimizer, norm)
                streak = (streak + bad) * bad  # consecutive non-finite steps, counted on the device
                skipped += bad
                applied += 1 - bad
                sums += torch.where(bad > 0, 0.0, step_sums)  # a skipped step's NaN stays out of the logged means
                step_sums.zero_()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                interval_steps += 1
                bar.update(1)

                if step % args.log_interval == 0 or step == args.max_steps or bad_streak_checked(streak, device):
                    if (n_skipped := int(skipped.item())) > 0:
                        log(f"step {step}: {n_skipped} step(s) with a non-finite loss or gradient were skipped")
                        skipped.zero_()
                    if (run_of_bad := int(streak.item())) >= MAX_BAD_STEPS:
                        raise diverged(f"{run_of_bad} non-finite steps in a row up to step {step}")
                    if not bool(params_finite(model)):
                        raise diverged(f"an update made the parameters non-finite by step {step}")
                if step == 1 or step % args.log_interval == 0 or step == args.max_steps:
                    elapsed = time.perf_counter() - interval_start
                    loss, ce, z, bal = (sums / (applied * args.grad_accum)).tolist()  # nan if every step was skipped
                    load = (fractions / (interval_steps * args.grad_accum)).cpu()
                    tok_s = interval_steps * tokens_per_step / elapsed
                    mfu = tok_s * flops_tok / peak if peak else None
                    imbalance = (load.max(dim=1).values * config.n_routed_experts).max().item()
                    mem = memory_gb(args.device)
                    log(f"step {step:>6} | loss {loss:.4f} | ce {ce:.4f} | z {z:.2e} | bal {bal:.4f} | lr {lr:.2e} | "
                        f"{tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
                        + f" | mem {mem:.2f} GB | max expert load {imbalance:.2f}x")
                    metrics.write({"kind": "train", "step": step, "loss": loss, "ce": ce, "z_loss": z,
                                   "balance_loss": bal, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu,
                                   "memory_gb": mem, "expert_load": load.tolist()})
                    sums.zero_()
                    applied.zero_()
                    fractions.zero_()
                    interval_steps, interval_start = 0, time.perf_counter()
                if args.eval_interval and step % args.eval_interval == 0 and step < args.max_steps:
                    run_eval()
                if args.save_interval and step % args.save_interval == 0 and step < args.max_steps:
                    last_path = save()
                if signals.signum is not None and step < args.max_steps:
                    raise stopped(signals, last_path)
            run_eval()
            last_path = save()
        log(f"saved {last_path}")
    except KeyboardInterrupt:  # a second signal, or Ctrl-C where no handler could be installed
        raise Interrupted(f"interrupted by {signals.name} during step {step + 1} (abandoned); "
                          f"{saved_so_far(run_dir, metrics.archive)}", signals.exit_code) from None
    finally:
        bar.close()
        metrics.close()
        loader.close()
        if val_loader is not None:
            val_loader.close()
    return last_path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: train(args), interrupted="interrupted before the first step: nothing was saved")


if __name__ == "__main__":
    sys.exit(main())
