"""One training step, shared by `python -m tachyon.train` and `python -m bench.throughput`.

`build_trainer` makes the model (seeded), its AdamW and a `Trainer` over any source of (inputs, targets)
batches; `Trainer.train_step()` runs one optimizer step: the learning rate of the schedule, forward and
backward over the micro-batches, gradient clipping, the update unless the gradient is non-finite, and the
device-side sums the log lines report (`RunningStats`). The trainer adds evals, log lines, checkpoints and
signals around it (tachyon.train); the benchmark times the very same call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .config import ModelConfig
from .model import ModelOutput, TachyonLM
from .optim import LRSchedule, make_optimizer

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each (batch, seq_len) int64 on the model's device
DEFAULT_WEIGHT_DECAY = 0.1
DEFAULT_GRAD_CLIP = 1.0


@dataclass(frozen=True)
class StepSettings:
    """How an optimizer step runs, apart from the objects it runs on."""

    schedule: LRSchedule
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = DEFAULT_GRAD_CLIP  # clip the gradient norm to this; 0: no clipping
    amp_dtype: torch.dtype | None = None  # autocast dtype of forward and backward; None: the parameters' (fp32)

    @property
    def max_norm(self) -> float:
        return self.grad_clip if self.grad_clip > 0 else math.inf


class Interval(NamedTuple):
    """The means a log line shows over the steps since the previous one (NaN when every step was skipped)."""

    loss: float
    ce: float
    z_loss: float
    balance_loss: float
    expert_load: torch.Tensor  # (n_layers, E) share of routed assignments per expert, on the CPU
    steps: int
    seconds: float


class RunningStats:
    """Loss parts, expert load and skipped-step counts summed on the device, so a step never waits for the host.

    `interval()` reads them (one sync) at a log line and starts the next interval.
    """

    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        self.sums = torch.zeros(4, device=device)  # loss, ce, z_loss, balance over the applied steps' micro-batches
        self.step_sums = torch.zeros(4, device=device)  # the same for the current step only
        self.fractions = torch.zeros(config.n_layers, config.n_routed_experts, device=device)
        self.streak = torch.zeros((), device=device)  # consecutive skipped steps
        self.skipped = torch.zeros((), device=device)  # skipped steps not yet reported
        self.applied = torch.zeros((), device=device)  # steps of this interval whose update was applied
        self.steps, self.start = 0, time.perf_counter()

    def add(self, out: ModelOutput) -> None:
        """Count one micro-batch's losses and expert load."""
        self.step_sums += torch.stack([out.loss, out.ce, out.z_loss, out.balance_loss]).detach().float()
        self.fractions += out.expert_fraction.detach()

    def end_step(self, bad: torch.Tensor) -> None:
        """Close a step; `bad` is 1.0 when it was skipped, whose non-finite losses stay out of the means."""
        self.streak = (self.streak + bad) * bad
        self.skipped += bad
        self.applied += 1 - bad
        self.sums += torch.where(bad > 0, 0.0, self.step_sums)
        self.step_sums.zero_()
        self.steps += 1

    def take_skipped(self) -> int:
        """Skipped steps since the last call (a host sync)."""
        count = int(self.skipped.item())
        self.skipped.zero_()
        return count

    def bad_streak(self) -> int:
        """How many steps in a row, up to the last one, were skipped (a host sync)."""
        return int(self.streak.item())

    def interval(self, grad_accum: int) -> Interval:
        """The means since the last call, then start a new interval."""
        loss, ce, z, bal = (self.sums / (self.applied * grad_accum)).tolist()
        load = (self.fractions / (max(self.steps, 1) * grad_accum)).cpu()
        summary = Interval(loss, ce, z, bal, load, self.steps, time.perf_counter() - self.start)
        self.sums.zero_()
        self.applied.zero_()
        self.fractions.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return summary


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


def params_finite(model: torch.nn.Module) -> torch.Tensor:
    """A 0-d bool tensor on the model's device: are all parameters finite? One fused norm, no host sync.

    Non-finite parameters stay non-finite (every later loss is non-finite, so every later step is skipped), so
    checking at log and save points is enough to catch an update that overflowed.
    """
    norms = torch._foreach_norm([p.detach() for p in model.parameters()])
    return torch.stack(norms).isfinite().all()


def _no_mark(phase: str) -> None:
    """The default of train_step's `mark`: no timing."""


class Trainer:
    """A model, its optimizer, a source of batches, the step settings and the step count.

    `step_model` is what runs forward (the model, or its torch.compile wrapper); `model` holds the
    parameters that are clipped, checked and saved.
    """

    def __init__(self, model: TachyonLM, optimizer: torch.optim.Optimizer, batches: Iterator[Batch],
                 settings: StepSettings, compile: bool = False) -> None:
        self.model, self.optimizer, self.batches, self.settings = model, optimizer, batches, settings
        self.step_model = torch.compile(model) if compile else model
        self.device = next(model.parameters()).device
        self.stats = RunningStats(model.config, self.device)
        self.step = 0  # optimizer steps done
        self.lr = settings.schedule(0)  # the learning rate of the latest step

    def autocast(self) -> AbstractContextManager:
        """The autocast context of forward passes (none in fp32)."""
        dtype = self.settings.amp_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def train_step(self, mark: Callable[[str], object] = _no_mark) -> torch.Tensor:
        """One optimizer step; returns 1.0 (on the device) when it was skipped for a non-finite gradient, else 0.0.

        The learning rate comes from the schedule at the current step; the gradient is averaged over
        `grad_accum` micro-batches and clipped; `mark(phase)` is called as each phase (forward, backward,
        optimizer) ends, for a benchmark's breakdown. Nothing here waits for the device except the
        non-finite check of a non-fused optimizer.
        """
        self.lr = self.settings.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        accum = self.settings.grad_accum
        for _ in range(accum):
            x, y = next(self.batches)
            with torch.profiler.record_function("forward"), self.autocast():
                out = self.step_model(x, y)
            mark("forward")
            with torch.profiler.record_function("backward"):
                (out.loss / accum).backward()
            mark("backward")
            self.stats.add(out)
        with torch.profiler.record_function("optimizer"):
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_norm)
            bad = guarded_step(self.optimizer, norm)
            self.optimizer.zero_grad(set_to_none=True)
        self.stats.end_step(bad)
        self.step += 1
        mark("optimizer")
        return bad

    @torch.no_grad()
    def evaluate(self, loader: Iterator[Batch], batches: int) -> float:
        """Mean cross-entropy over the next `batches` batches of `loader` (reset it first to score the same ones)."""
        self.step_model.eval()
        total = torch.zeros((), device=self.device)
        for _ in range(batches):
            x, y = next(loader)
            with self.autocast():
                total += self.step_model(x, y).ce.float()
        self.step_model.train()
        return (total / batches).item()


def build_trainer(config: ModelConfig, batches: Iterator[Batch], device: torch.device, settings: StepSettings, *,
                  seed: int, weight_decay: float = DEFAULT_WEIGHT_DECAY, compile: bool = False,
                  grad_ckpt: bool = False) -> Trainer:
    """A fresh model drawn from `seed` on `device`, its AdamW (fused on CUDA) and a Trainer over `batches`.

    The same arguments give the same weights and, over the same batches, the same losses, whoever calls it.
    """
    torch.manual_seed(seed)
    model = TachyonLM(config).to(device)
    model.gradient_checkpointing = grad_ckpt
    optimizer = make_optimizer(model, settings.schedule.lr, weight_decay)
    return Trainer(model, optimizer, batches, settings, compile=compile)
