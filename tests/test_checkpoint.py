"""Checkpoint helpers: wrapper-prefix clean-up and moving an earlier run's files aside."""

from __future__ import annotations

from pathlib import Path

import torch

from tachyon.checkpoint import archive_previous_run, checkpoint_step, clean_state_dict, list_checkpoints


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
