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
import signal
import sys
import threading
from collections.abc import Callable
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
from .hardware import autocast_dtype, bf16_peak_flops, check_kernel_backend, peak_memory_gb, resolve_device
from .optim import LRSchedule
from .tokenizer import Tokenizer, check_fits, check_same_tokenizer, load_tokenizer, padded_vocab_size
from .trainer import DEFAULT_GRAD_CLIP, DEFAULT_WEIGHT_DECAY, StepSettings, Trainer, build_trainer, params_finite

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
    a("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=DEFAULT_WEIGHT_DECAY,
      help="AdamW weight decay (not on norms, biases or embeddings)")
    a("--grad-clip", "--grad_clip", dest="grad_clip", type=float, default=DEFAULT_GRAD_CLIP,
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


def real_data_schedule() -> LRSchedule:
    """The learning-rate schedule of a real-data run with the default options (what bench.throughput times)."""
    d = REAL_DATA_DEFAULTS
    return LRSchedule(d["lr"], d["min_lr"], d["warmup"], d["max_steps"])


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
    on_cuda = args.device.type == "cuda"
    if args.dtype == "auto":
        args.dtype = "bf16" if autocast_dtype(args.device) == torch.bfloat16 else "fp32"
    if args.grad_ckpt is None:
        args.grad_ckpt = on_cuda and args.preset in ("medium", "large")
    args.compile = args.compile and on_cuda
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


def saved_so_far(run_dir: Path, archive: Path | None) -> str:
    """Where the last good weights are, for an error that ends a run."""
    if (last := latest_checkpoint(run_dir)) is not None:
        return f"the last good checkpoint {last} is untouched"
    return "no checkpoint of this run was saved" + (f"; the earlier run's are in {archive}" if archive else "")


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


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's RNGs (checkpoints save and restore all three)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def training_data(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[Path, Path | None, Tokenizer | None]:
    """(shard folder, tokenizer path, tokenizer): --data-dir's, or the embedded default corpus (built if needed)."""
    if args.data_dir is None:
        data_dir, tokenizer_path = embedded_default(seq_len=args.seq_len, log=log)
        tokenizer_path = args.tokenizer or tokenizer_path
    else:
        data_dir, tokenizer_path = args.data_dir, args.tokenizer
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    return data_dir, tokenizer_path, tokenizer


def make_loaders(data_dir: Path, *, batch_size: int, seq_len: int, seed: int, vocab_size: int, device: torch.device,
                 pad_id: int = 1, val_fraction: float = 0.0, val_shards: int = 0, num_workers: int = 0
                 ) -> tuple[BatchLoader, BatchLoader | None]:
    """The training loader and, when a validation split is asked for, the validation one (else None).

    pad_id 1 is the original dataset's layout, for shards that come without a tokenizer.
    """
    common = dict(batch_size=batch_size, seq_len=seq_len, seed=seed, vocab_size=vocab_size, device=device,
                  val_fraction=val_fraction, val_shards=val_shards, pad_id=pad_id)
    loader = BatchLoader(data_dir, split="train", num_workers=num_workers, **common)
    val_loader = BatchLoader(data_dir, split="val", **common) if val_fraction > 0 or val_shards > 0 else None
    return loader, val_loader


def step_settings(args: argparse.Namespace) -> StepSettings:
    """The schedule, accumulation, clipping and autocast dtype the options ask for."""
    return StepSettings(LRSchedule(args.lr, args.min_lr, args.warmup, args.max_steps), grad_accum=args.grad_accum,
                        grad_clip=args.grad_clip, amp_dtype=torch.bfloat16 if args.dtype == "bf16" else None)


def restore(trainer: Trainer, loader: BatchLoader, ckpt: dict[str, Any]) -> None:
    """Continue a checkpointed run: weights, optimizer state, data position, RNG states and step count."""
    trainer.model.load_state_dict(ckpt["model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    loader.load_state_dict(ckpt["data"])
    set_rng_state(ckpt["rng"])
    trainer.step = ckpt["step"]


class TrainingRun:
    """What `python -m tachyon.train` does around `Trainer.train_step`: log lines and metrics, evals, the health
    checks, checkpoints and stopping on a signal, in the (locked) run directory."""

    def __init__(self, args: argparse.Namespace, trainer: Trainer, loader: BatchLoader,
                 val_loader: BatchLoader | None, metrics: MetricsLog, tokenizer: Tokenizer | None,
                 tokenizer_path: Path | None, log: Callable[[str], None]) -> None:
        self.args, self.trainer, self.loader, self.val_loader = args, trainer, loader, val_loader
        self.metrics, self.tokenizer, self.tokenizer_path, self.log = metrics, tokenizer, tokenizer_path, log
        self.run_dir = Path(args.save_dir)
        config = trainer.model.config
        self.tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
        self.flops_per_token = flops_per_token(config, args.seq_len)
        self.device_name, self.peak_flops = bf16_peak_flops(trainer.device)
        self.last_path: Path | None = None

    def describe(self) -> str:
        """The line that opens a run: model, device, numerics, step size and run directory."""
        a, config = self.args, self.trainer.model.config
        return (f"model {a.preset}: {total_params(config) / 1e6:.1f}M params, {active_params(config) / 1e6:.1f}M "
                f"active, vocab {config.vocab_size} | {self.device_name}, {a.dtype}, kernels={kernels.get_backend()}, "
                f"compile={a.compile}, grad-ckpt={a.grad_ckpt} | {self.tokens_per_step:,} tokens/step, "
                f"{a.max_steps} steps | run dir {self.run_dir}")

    def diverged(self, why: str) -> TachyonError:
        return TachyonError(f"training diverged: {why}; {saved_so_far(self.run_dir, self.metrics.archive)} "
                            "(try a lower --lr)")

    def save(self) -> Path:
        """Checkpoint the current step; never from a model whose parameters are no longer finite."""
        t = self.trainer
        if not bool(params_finite(t.model)):
            raise self.diverged(f"the parameters are non-finite at step {t.step}, so it was not saved")
        self.last_path = save_checkpoint(self.run_dir, t.step, {
            "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(), "config": t.model.config,
            "data": self.loader.state_dict(), "rng": rng_state(),
            "args": {k: str(v) for k, v in vars(self.args).items()},
            "tokenizer_path": str(Path(self.tokenizer_path).resolve()) if self.tokenizer_path else None,
            "tokenizer_sha256": self.tokenizer.sha256 if self.tokenizer else None}, self.args.keep_last)
        return self.last_path

    def evaluate(self) -> None:
        """Score the validation split's first --eval-batches batches (the same ones every time), if there is one."""
        if self.val_loader is None:
            return
        self.val_loader.reset()
        val_loss = self.trainer.evaluate(self.val_loader, self.args.eval_batches)
        step = self.trainer.step
        self.log(f"step {step:>6} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.1f}")
        self.metrics.write({"kind": "eval", "step": step, "val_loss": val_loss})

    def check_health(self) -> None:
        """Report skipped steps; stop on MAX_BAD_STEPS skipped in a row or on non-finite parameters."""
        stats, step = self.trainer.stats, self.trainer.step
        if (skipped := stats.take_skipped()) > 0:
            self.log(f"step {step}: {skipped} step(s) with a non-finite loss or gradient were skipped")
        if (run_of_bad := stats.bad_streak()) >= MAX_BAD_STEPS:
            raise self.diverged(f"{run_of_bad} non-finite steps in a row up to step {step}")
        if not bool(params_finite(self.trainer.model)):
            raise self.diverged(f"an update made the parameters non-finite by step {step}")

    def log_interval(self) -> None:
        """One log line and metrics record with the means since the last one."""
        t = self.trainer
        summary = t.stats.interval(self.args.grad_accum)
        tok_s = summary.steps * self.tokens_per_step / summary.seconds
        mfu = tok_s * self.flops_per_token / self.peak_flops if self.peak_flops else None
        imbalance = (summary.expert_load.max(dim=1).values * t.model.config.n_routed_experts).max().item()
        mem = peak_memory_gb(t.device)
        self.log(f"step {t.step:>6} | loss {summary.loss:.4f} | ce {summary.ce:.4f} | z {summary.z_loss:.2e} | "
                 f"bal {summary.balance_loss:.4f} | lr {t.lr:.2e} | {tok_s:,.0f} tok/s"
                 + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
                 + f" | mem {mem:.2f} GB | max expert load {imbalance:.2f}x")
        self.metrics.write({"kind": "train", "step": t.step, "loss": summary.loss, "ce": summary.ce,
                            "z_loss": summary.z_loss, "balance_loss": summary.balance_loss, "lr": t.lr,
                            "tokens_per_s": tok_s, "mfu": mfu, "memory_gb": mem,
                            "expert_load": summary.expert_load.tolist()})

    def stopped(self, signals: StopSignals) -> Interrupted:
        """Stop at the end of a step on a signal, saving first when asked to (default: on SIGTERM only)."""
        step, last = self.trainer.step, self.last_path
        save_wanted = self.args.save_on_interrupt if self.args.save_on_interrupt is not None else \
            signals.signum == signal.SIGTERM
        if save_wanted and (last is None or last.name != f"checkpoint_{step}.pt"):
            last = self.save()
        if last is not None and last.name == f"checkpoint_{step}.pt":
            what = f"saved {last}; continue with --resume latest"
        else:
            what = f"not saved (--save-on-interrupt saves); {saved_so_far(self.run_dir, self.metrics.archive)}"
        return Interrupted(f"stopped by {signals.name} after step {step}: {what}", signals.exit_code)

    def after_step(self, signals: StopSignals) -> None:
        """What follows a step: health checks, a log line, an eval and a checkpoint when due, a signal's stop."""
        args, step, stats = self.args, self.trainer.step, self.trainer.stats
        final = step == args.max_steps
        # On the CPU, already synchronised every step, look at the streak every step; on CUDA at log lines only.
        streak_seen = self.trainer.device.type != "cuda" and stats.bad_streak() > 0
        if step % args.log_interval == 0 or final or streak_seen:
            self.check_health()
        if step == 1 or step % args.log_interval == 0 or final:
            self.log_interval()
        if args.eval_interval and step % args.eval_interval == 0 and not final:
            self.evaluate()
        if args.save_interval and step % args.save_interval == 0 and not final:
            self.save()
        if signals.signum is not None and not final:
            raise self.stopped(signals)

    def run(self) -> Path:
        """Train to --max-steps, then eval and save; returns the final checkpoint."""
        t = self.trainer
        bar = tqdm(total=self.args.max_steps, initial=t.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())
        signals = StopSignals()
        try:
            with signals:
                while t.step < self.args.max_steps:
                    t.train_step()
                    bar.update(1)
                    self.after_step(signals)
                self.evaluate()
                self.save()
            self.log(f"saved {self.last_path}")
        except KeyboardInterrupt:  # a second signal, or Ctrl-C where no handler could be installed
            raise Interrupted(f"interrupted by {signals.name} during step {t.step + 1} (abandoned); "
                              f"{saved_so_far(self.run_dir, self.metrics.archive)}", signals.exit_code) from None
        finally:
            bar.close()
        return self.last_path


def _train(args: argparse.Namespace) -> Path:
    """The body of `train`, run while the run directory is locked."""
    if args.kernels is not None:
        kernels.set_backend(args.kernels)
    check_kernel_backend()
    log = tqdm.write
    seed_everything(args.seed)
    data_dir, tokenizer_path, tokenizer = training_data(args, log)
    config = model_config(args, tokenizer)
    resume_path = find_resume(args)
    ckpt = load_resume(resume_path, config, tokenizer, args.tokenizer is not None) if resume_path else None

    loader, val_loader = make_loaders(
        data_dir, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, vocab_size=config.vocab_size,
        device=args.device, pad_id=tokenizer.pad_id if tokenizer is not None else 1,
        val_fraction=args.val_fraction, val_shards=args.val_shards, num_workers=args.num_workers)
    metrics = None
    try:
        if val_loader is None:
            log("no validation split, so no validation loss: pass --val-fraction 0.01 or --val-shards 1 to get one")
        trainer = build_trainer(config, loader, args.device, step_settings(args), seed=args.seed,
                                weight_decay=args.weight_decay, compile=args.compile, grad_ckpt=args.grad_ckpt)
        if ckpt is not None:
            restore(trainer, loader, ckpt)
            log(f"resumed from {resume_path} at step {trainer.step}")
        metrics = MetricsLog(Path(args.save_dir), args.tensorboard, resumed_at=trainer.step if ckpt else None)
        run = TrainingRun(args, trainer, loader, val_loader, metrics, tokenizer, tokenizer_path, log)
        log(run.describe())
        return run.run()
    finally:
        if metrics is not None:
            metrics.close()
        loader.close()
        if val_loader is not None:
            val_loader.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: train(args), interrupted="interrupted before the first step: nothing was saved")


if __name__ == "__main__":
    sys.exit(main())
