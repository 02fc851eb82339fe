"""Fault tests: trainers killed with SIGKILL mid-save, and damaged shard and checkpoint files.

Whatever happens to a run or a file, the outcome is either a working result or one clean TachyonError: every
checkpoint left behind loads, `--resume latest` carries on, and no damaged input gives a traceback.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tachyon.checkpoint import checkpoint_step, list_checkpoints, load_checkpoint, load_model
from tachyon.config import PRESETS, ModelConfig
from tachyon.data import BatchLoader, check_shards
from tachyon.errors import TachyonError
from tachyon.model import TachyonLM
from tachyon.train import main

from .test_train import PICO, base_args, make_shards

REPO = Path(__file__).resolve().parents[1]
# A trainer in a subprocess, on the pico preset, whose fsync sleeps a little: each checkpoint's temporary file
# then stays on disk long enough for the test to kill the process while it is being written.
RUNNER = """
import json, os, sys, time
from tachyon.config import PRESETS, ModelConfig
PRESETS["pico"] = ModelConfig(**json.loads(sys.argv[1]))
fsync = os.fsync
os.fsync = lambda fd: (time.sleep(0.05), fsync(fd))
from tachyon.train import main
sys.exit(main(sys.argv[2:]))
"""


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the trainer ended early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the trainer never got there"
        time.sleep(0.005)


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_leaves_every_checkpoint_loadable_and_resume_continues(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    argv = base_args(data, run, "--max-steps", "1000", "--save-interval", "1", "--keep-last", "0")
    temps = lambda: list(run.glob(".checkpoint_*.pt.tmp-*"))  # noqa: E731
    rng = random.Random(0)
    for kill_round in range(3):
        resume = ["--resume", "latest"] if list_checkpoints(run) else []
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(dataclasses.asdict(PICO)), *argv, *resume],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        saved_before = len(list_checkpoints(run))
        _wait_for(lambda n=saved_before: len(list_checkpoints(run)) > n, proc)  # this run saved once
        if kill_round < 2:
            _wait_for(lambda: temps(), proc)  # killed while a temporary file is being written
        else:
            time.sleep(rng.uniform(0.05, 0.3))  # killed anywhere
        proc.kill()
        proc.wait()
        proc.stderr.close()
    for path in list_checkpoints(run):
        assert load_checkpoint(path)["step"] == checkpoint_step(path)
    latest = checkpoint_step(list_checkpoints(run)[-1])
    monkeypatch.setitem(PRESETS, "pico", PICO)
    argv = base_args(data, run, "--max-steps", str(latest + 2), "--resume", "latest")
    assert main(argv) == 0
    assert load_checkpoint(run / f"checkpoint_{latest + 2}.pt")["step"] == latest + 2
    assert not temps()


# ------------------------------------------------------------------------------------------------ damaged files


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


GOOD_SHARD = _npy_bytes(np.arange(2, 2 + 8 * 16, dtype=np.int32).reshape(8, 16))
OTHER_SHARDS = [_npy_bytes(a) for a in (np.zeros((8, 16), np.float32), np.zeros(8, np.int64),
                                        np.array([{"ids": 1}], dtype=object), np.zeros((8, 16), np.uint64) - 1)]


def _damage(good: bytes, how: tuple) -> bytes:
    kind, a, b = how
    if kind == "truncate":
        return good[:a % len(good)]
    if kind == "flip":
        damaged = bytearray(good)
        damaged[a % len(good)] ^= 1 << (b % 8)
        return bytes(damaged)
    return bytes([a % 256]) * (b % 200)  # not a file of this kind at all


DAMAGE = st.tuples(st.sampled_from(["truncate", "flip", "flip", "garbage"]), st.integers(0, 1 << 20),
                   st.integers(0, 1 << 10))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(how=DAMAGE, other=st.sampled_from([None, *OTHER_SHARDS]))
def test_a_damaged_or_wrong_typed_shard_is_read_or_refused_cleanly(how: tuple, other: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "shard_00000.npy").write_bytes(other if other is not None else _damage(GOOD_SHARD, how))
        try:
            with BatchLoader(folder, batch_size=2, seq_len=8, vocab_size=200) as loader:
                for _ in range(5):
                    next(loader)
        except TachyonError:
            pass
        check_shards(folder, vocab_size=200, progress=False)  # reports problems; never raises for a damaged shard


TINY = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, d_shared_ff=16,
                   n_routed_experts=2, max_seq_len=16)


def _checkpoint_bytes(payload: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


_STATE = TachyonLM(TINY).state_dict()
GOOD_CHECKPOINT = _checkpoint_bytes({"model": _STATE, "config": dataclasses.asdict(TINY), "step": 3})
WRONG_TYPED = [_checkpoint_bytes(p) for p in (
    [1, 2, 3], "a string", {"model": "weights"}, {"model": {"embed.weight": "x"}, "config": {}},
    {"model": _STATE}, {"model": _STATE, "config": "nano"},
    {"model": _STATE, "config": {**dataclasses.asdict(TINY), "d_model": "wide"}},
    {"model": _STATE, "config": {**dataclasses.asdict(TINY), "n_layers": 10**9}},
    {"model": _STATE, "config": {**dataclasses.asdict(TINY), "d_model": 32}},
    {"model": {k: v[..., :1] for k, v in _STATE.items()}, "config": dataclasses.asdict(TINY)},
)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(how=DAMAGE, other=st.sampled_from([None, *WRONG_TYPED]))
def test_a_damaged_or_wrong_typed_checkpoint_loads_or_is_refused_cleanly(how: tuple, other: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "checkpoint_3.pt")
        path.write_bytes(other if other is not None else _damage(GOOD_CHECKPOINT, how))
        try:
            model, meta = load_model(path)
        except TachyonError:
            return
        assert isinstance(model, TachyonLM) and isinstance(meta["config"], dict)
