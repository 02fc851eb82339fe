"""Checkpoint helpers: wrapper-prefix clean-up, moving an earlier run's files aside, the run lock, stale temps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tachyon.checkpoint import (
    LOCK_NAME,
    RunLock,
    archive_previous_run,
    checkpoint_step,
    clean_state_dict,
    list_checkpoints,
    remove_stale_temps,
)
from tachyon.errors import TachyonError


def test_clean_state_dict_strips_only_wrapper_prefixes() -> None:
    t = torch.zeros(1)
    state = {"_orig_mod.embed.weight": t, "module._orig_mod.norm.weight": t, "blocks.0._orig_mod.attn.q": t,
             "submodule.weight": t, "blocks.1.module.w": t, "module": t}
    assert list(clean_state_dict(state)) == ["embed.weight", "norm.weight", "blocks.0.attn.q", "submodule.weight",
                                             "blocks.1.module.w", "module"]


def _touch(run: Path, *names: str) -> None:
    run.mkdir(parents=True, exist_ok=True)
    for name in names:
        (run / name).write_text(name)


def test_checkpoints_are_listed_by_step_not_by_name(tmp_path: Path) -> None:
    _touch(tmp_path, "checkpoint_10.pt", "checkpoint_9.pt", "checkpoint_100.pt", "notes.txt", "checkpoint_x.pt")
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [9, 10, 100]


def test_a_new_run_moves_everything_of_the_earlier_run(tmp_path: Path) -> None:
    _touch(tmp_path, "checkpoint_1.pt", "checkpoint_2.pt", "metrics.jsonl", "metrics.png", "notes.txt")
    _touch(tmp_path / "tensorboard", "events")
    archive = archive_previous_run(tmp_path)
    assert archive is not None and archive.parent == tmp_path / "previous"
    assert sorted(p.name for p in archive.iterdir()) == ["checkpoint_1.pt", "checkpoint_2.pt", "metrics.jsonl",
                                                         "metrics.png", "tensorboard"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "previous"]
    assert archive_previous_run(tmp_path) is None  # nothing left to move


def test_a_resumed_run_moves_only_later_checkpoints_and_copies_the_metrics(tmp_path: Path) -> None:
    _touch(tmp_path, "checkpoint_2.pt", "checkpoint_4.pt", "checkpoint_6.pt", "metrics.jsonl")
    assert archive_previous_run(tmp_path, after_step=6) is None
    archive = archive_previous_run(tmp_path, after_step=2)
    assert sorted(p.name for p in archive.iterdir()) == ["checkpoint_4.pt", "checkpoint_6.pt", "metrics.jsonl"]
    assert sorted(p.name for p in tmp_path.glob("*.*")) == ["checkpoint_2.pt", "metrics.jsonl"]


def test_archives_made_in_the_same_second_never_share_a_folder(tmp_path: Path) -> None:
    archives = []
    for run in range(3):
        _touch(tmp_path, "checkpoint_1.pt", "metrics.jsonl")
        (tmp_path / "metrics.jsonl").write_text(f"run {run}")
        archives.append(archive_previous_run(tmp_path))
    assert len(set(archives)) == 3
    assert sorted((a / "metrics.jsonl").read_text() for a in archives) == ["run 0", "run 1", "run 2"]


def test_the_run_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()}\\n'.encode())\n"
                               "print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(TachyonError, match=f"in use by another training run \\(PID {holder.pid}\\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead holder's lock: nothing stale to clean up
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_stale_temporary_checkpoints_are_removed(tmp_path: Path) -> None:
    _touch(tmp_path, ".checkpoint_5.pt.tmp-12345", ".checkpoint_6.pt.tmp-99", "checkpoint_4.pt", ".other.tmp-1")
    assert remove_stale_temps(tmp_path) == (2, len(".checkpoint_5.pt.tmp-12345") + len(".checkpoint_6.pt.tmp-99"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "checkpoint_4.pt"]
