"""The trainer end to end on tiny shards: logging, checkpoints, exact resume, and every user mistake."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from tachyon.checkpoint import load_checkpoint
from tachyon.config import PRESETS, ModelConfig
from tachyon.train import main

# A preset small enough that a training step takes milliseconds on the CPU.
PICO = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=128, d_shared_ff=64,
                   n_routed_experts=4, max_seq_len=128)
VOCAB = PICO.vocab_size


@pytest.fixture(autouse=True)
def _pico_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PRESETS, "pico", PICO)


def make_shards(folder: Path, rows: int = 64, width: int = 64, ids: tuple[int, int] = (2, 400), n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(folder / f"shard_{i:05d}.npy", rng.integers(*ids, size=(rows, width), dtype=np.int32))
    return folder


def base_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["--preset", "pico", "--data-dir", str(data), "--save-dir", str(run), "--batch-size", "2",
            "--seq-len", "32", "--log-interval", "1", "--warmup", "2", "--lr", "1e-3", "--device", "cpu", *extra]


def logged(run: Path, kind: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_trains_logs_evaluates_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    assert main(base_args(data, run, "--max-steps", "4", "--val-fraction", "0.1", "--eval-batches", "2")) == 0
    out = capsys.readouterr().out
    assert "step      4 | loss" in out and "tok/s" in out and "val loss" in out
    records = logged(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert len(records[0]["expert_load"]) == PICO.n_layers  # one row of expert shares per layer
    assert logged(run, "eval")[0]["step"] == 4
    ckpt = load_checkpoint(run / "checkpoint_4.pt")
    assert ckpt["step"] == 4 and ckpt["config"]["vocab_size"] == VOCAB
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])


def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    data = make_shards(tmp_path / "data")
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(base_args(data, whole, "--max-steps", "6", "--save-interval", "3", "--keep-last", "5")) == 0
    part.mkdir()
    (part / "checkpoint_3.pt").write_bytes((whole / "checkpoint_3.pt").read_bytes())
    assert main(base_args(data, part, "--max-steps", "6", "--resume", "latest")) == 0
    uninterrupted = {r["step"]: r["loss"] for r in logged(whole)}
    resumed = {r["step"]: r["loss"] for r in logged(part)}
    assert sorted(resumed) == [4, 5, 6]
    for step, loss in resumed.items():
        assert loss == pytest.approx(uninterrupted[step], abs=1e-6)
    a, b = load_checkpoint(whole / "checkpoint_6.pt")["model"], load_checkpoint(part / "checkpoint_6.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def expect_error(capsys: pytest.CaptureFixture, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_unknown_preset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_shards(tmp_path / "data")
    argv = base_args(data, tmp_path / "run")
    argv[1] = "huge"
    expect_error(capsys, argv, "unknown preset 'huge'", "nano, tiny, small, medium, large")


def test_missing_or_empty_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expect_error(capsys, base_args(tmp_path / "nowhere", tmp_path / "run"), "shard_")
    (tmp_path / "empty").mkdir()
    expect_error(capsys, base_args(tmp_path / "empty", tmp_path / "run"), "shard_")


def test_token_ids_beyond_the_vocab(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_shards(tmp_path / "data", ids=(VOCAB, VOCAB + 10))
    expect_error(capsys, base_args(data, tmp_path / "run", "--max-steps", "2"), str(VOCAB))


def test_seq_len_above_the_context(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_shards(tmp_path / "data", width=256)
    argv = base_args(data, tmp_path / "run")
    argv[argv.index("--seq-len") + 1] = "256"
    expect_error(capsys, argv, "--seq-len 256", "max_seq_len 128")


def test_resume_with_nothing_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_shards(tmp_path / "data")
    expect_error(capsys, base_args(data, tmp_path / "run", "--resume", "latest"), "no checkpoint")


def test_checkpoint_of_another_config_is_refused_and_left_intact(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    assert main(base_args(data, run, "--max-steps", "1")) == 0
    before = digest(run / "checkpoint_1.pt")
    argv = base_args(data, run, "--max-steps", "2", "--resume", "latest")
    argv[1] = "nano"
    expect_error(capsys, argv, "another config", "d_model 64 (checkpoint) vs 256 (requested)")
    assert digest(run / "checkpoint_1.pt") == before


def test_diverging_run_stops_and_keeps_the_last_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    assert main(base_args(data, run, "--max-steps", "2")) == 0
    before = digest(run / "checkpoint_2.pt")
    from tachyon.model import TachyonLM

    forward = TachyonLM.forward

    def poisoned(self, idx, targets=None, **kw):
        out = forward(self, idx, targets, **kw)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(TachyonLM, "forward", poisoned)
    expect_error(capsys, base_args(data, run, "--max-steps", "8", "--resume", "latest"), "diverged",
                 "3 non-finite steps")
    assert digest(run / "checkpoint_2.pt") == before
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_2.pt"]


def test_new_run_moves_an_earlier_run_aside(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    assert main(base_args(data, run, "--max-steps", "3")) == 0
    old = digest(run / "checkpoint_3.pt")
    bad = make_shards(tmp_path / "bad", ids=(VOCAB, VOCAB + 10))
    expect_error(capsys, base_args(bad, run, "--max-steps", "2"), str(VOCAB))  # fails before any step
    assert digest(run / "checkpoint_3.pt") == old and not (run / "previous").exists()
    assert main(base_args(data, run, "--max-steps", "2")) == 0
    assert "moved to" in capsys.readouterr().out
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_2.pt"]
    assert [r["step"] for r in logged(run)] == [1, 2]
    (archived,) = (run / "previous").iterdir()
    assert digest(archived / "checkpoint_3.pt") == old and (archived / "metrics.jsonl").exists()


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path: Path) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    assert main(base_args(data, run, "--max-steps", "4", "--save-interval", "2", "--keep-last", "2")) == 0
    (run / "checkpoint_4.pt").unlink()  # as if the run had died after logging step 4, before saving it
    assert main(base_args(data, run, "--max-steps", "4", "--resume", "latest")) == 0
    assert [r["step"] for r in logged(run)] == [1, 2, 3, 4]


def test_resume_from_an_older_checkpoint_moves_later_ones_aside(tmp_path: Path) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    assert main(base_args(data, run, "--max-steps", "6", "--save-interval", "2", "--keep-last", "5")) == 0
    later = {name: digest(run / name) for name in ("checkpoint_4.pt", "checkpoint_6.pt")}
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a torn last line, as from a run killed mid-write
    assert main(base_args(data, run, "--max-steps", "4", "--resume", str(run / "checkpoint_2.pt"))) == 0
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_2.pt", "checkpoint_4.pt"]
    (archived,) = (run / "previous").iterdir()
    assert {name: digest(archived / name) for name in later} == later  # the later run's saves, untouched
    assert (archived / "metrics.jsonl").exists()
    assert [r["step"] for r in logged(run)] == [1, 2, 3, 4]


def test_grad_clip_zero_means_no_clipping(tmp_path: Path) -> None:
    data = make_shards(tmp_path / "data")
    assert main(base_args(data, tmp_path / "off", "--max-steps", "3", "--grad-clip", "0")) == 0
    assert main(base_args(data, tmp_path / "huge", "--max-steps", "3", "--grad-clip", "1e30")) == 0
    assert [r["loss"] for r in logged(tmp_path / "off")] == [r["loss"] for r in logged(tmp_path / "huge")]


def test_a_skipped_step_stays_out_of_the_logged_loss(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from tachyon.model import TachyonLM

    forward, calls = TachyonLM.forward, []

    def nan_on_second_call(self, idx, targets=None, **kw):
        out = forward(self, idx, targets, **kw)
        calls.append(1)
        return out._replace(loss=out.loss * float("nan")) if len(calls) == 2 else out

    monkeypatch.setattr(TachyonLM, "forward", nan_on_second_call)
    data = make_shards(tmp_path / "data")
    argv = base_args(data, tmp_path / "run", "--max-steps", "3")
    argv[argv.index("--log-interval") + 1] = "3"
    assert main(argv) == 0
    assert "1 step(s) with a non-finite loss or gradient were skipped" in capsys.readouterr().out
    assert all(np.isfinite(r["loss"]) for r in logged(tmp_path / "run"))


def test_eval_batches_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_shards(tmp_path / "data")
    expect_error(capsys, base_args(data, tmp_path / "run", "--eval-batches", "0"), "--eval-batches must be at least 1")


def test_bad_preset_and_seq_len_fail_before_the_embedded_corpus_is_built(capsys: pytest.CaptureFixture,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_build(*args, **kwargs):
        raise AssertionError("the embedded corpus was built for a run that cannot start")

    monkeypatch.setattr("tachyon.train.embedded_default", must_not_build)
    expect_error(capsys, ["--seq-len", "100000", "--device", "cpu"], "--seq-len 100000", "max_seq_len")
    expect_error(capsys, ["--preset", "huge", "--device", "cpu"], "unknown preset 'huge'")


# ------------------------------------------------------------------------------------------- one run per directory


def test_a_second_run_in_a_locked_run_dir_is_refused_naming_the_holder(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    from tachyon.checkpoint import RunLock

    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    assert main(base_args(data, run, "--max-steps", "2")) == 0
    before = {p.name: digest(p) for p in run.iterdir() if p.is_file()}
    with RunLock(run):  # another trainer holds the directory (flock conflicts across open files, even in-process)
        expect_error(capsys, base_args(data, run, "--max-steps", "2"), f"{run} is in use by another training run",
                     f"(PID {os.getpid()})")
    assert {p.name: digest(p) for p in run.iterdir() if p.is_file()} == before and not (run / "previous").exists()
    assert main(base_args(data, run, "--max-steps", "2")) == 0  # released: the next run goes ahead


# ------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "-0.001", "--lr must be above 0"),
    ("--lr", "nan", "--lr must be a finite number"),
    ("--lr", "inf", "--lr must be a finite number"),
    ("--min-lr", "-0.0001", "--min-lr must be 0 or more"),
    ("--min-lr", "1", "is above --lr"),
    ("--warmup", "-5", "--warmup must be at least 0"),
    ("--save-interval", "-1", "--save-interval must be at least 0"),
    ("--eval-interval", "-1", "--eval-interval must be at least 0"),
    ("--keep-last", "-2", "--keep-last must be at least 0"),
    ("--grad-clip", "-1", "--grad-clip must be 0 or more"),
    ("--grad-clip", "nan", "--grad-clip must be a finite number"),
    ("--weight-decay", "-0.1", "--weight-decay must be 0 or more"),
    ("--val-shards", "-1", "--val-shards must be at least 0"),
    ("--num-workers", "-3", "--num-workers must be at least 0"),
    ("--val-fraction", "nan", "--val-fraction must be a finite number"),
    ("--seed", "-1", "--seed must be at least 0"),
])
def test_every_numeric_option_is_checked_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         option: str, value: str, message: str) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    expect_error(capsys, base_args(data, run, "--max-steps", "2", option, value), message)
    assert not run.exists()


def test_a_bad_kernels_environment_value_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """TACHYON_KERNELS=nonsense (read when kernels was imported) is refused before any work, in one line."""
    import kernels._backend

    monkeypatch.setattr(kernels._backend, "_backend", "nonsense")
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    expect_error(capsys, base_args(data, run, "--max-steps", "1"), "unknown $TACHYON_KERNELS value 'nonsense'")
    assert not (run / "checkpoint_1.pt").exists()


def test_an_update_that_makes_parameters_non_finite_stops_the_run_and_is_never_saved(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    step, calls = torch.optim.AdamW.step, []

    def overflowing_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second update overflows one weight, as --lr 1e30 would
            self.param_groups[0]["params"][0].data[0, 0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    argv = base_args(data, run, "--max-steps", "2", "--save-interval", "1")
    expect_error(capsys, argv, "diverged", "non-finite by step 2", f"last good checkpoint {run / 'checkpoint_1.pt'}")
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == ["checkpoint_1.pt"]
    assert all(torch.isfinite(t).all() for t in load_checkpoint(run / "checkpoint_1.pt")["model"].values())


# ------------------------------------------------------------------------------------------- I/O failures


def test_an_unwritable_run_dir_is_found_before_training(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_load(*args, **kwargs):
        raise AssertionError("data was read for a run that cannot save")

    monkeypatch.setattr("tachyon.train.BatchLoader", must_not_load)
    data = make_shards(tmp_path / "data")
    (tmp_path / "file").write_text("not a folder")
    expect_error(capsys, base_args(data, tmp_path / "file" / "run"), f"run directory {tmp_path / 'file' / 'run'} "
                 "is not writable", "--save-dir")


def test_a_full_disk_at_save_is_one_line_and_keeps_the_last_good_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import tachyon.checkpoint

    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    save, calls = tachyon.checkpoint.torch.save, []

    def disk_fills_up(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(tachyon.checkpoint.torch, "save", disk_fills_up)
    expect_error(capsys, base_args(data, run, "--max-steps", "3", "--save-interval", "1"),
                 f"could not write checkpoint {run / 'checkpoint_2.pt'}", "unexpected pos", "GB free in",
                 f"the last good checkpoint {run / 'checkpoint_1.pt'} is kept")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))) == \
        ["checkpoint_1.pt"]
    assert load_checkpoint(run / "checkpoint_1.pt")["step"] == 1


# ------------------------------------------------------------------------------------------- signals


def signal_in_forward(monkeypatch: pytest.MonkeyPatch, signum: int, at_call: int, times: int = 1) -> None:
    """Deliver `signum` to this process `times` times during the `at_call`-th forward (as a scheduler or Ctrl-C)."""
    from tachyon.model import TachyonLM

    forward, calls = TachyonLM.forward, []

    def signalled(self, idx, targets=None, **kw):
        calls.append(1)
        if len(calls) == at_call:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return forward(self, idx, targets, **kw)

    monkeypatch.setattr(TachyonLM, "forward", signalled)


def test_sigterm_finishes_the_step_saves_and_exits_143(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    signal_in_forward(monkeypatch, signal.SIGTERM, at_call=2)
    assert main(base_args(data, run, "--max-steps", "6")) == 143
    assert capsys.readouterr().err.splitlines()[-1] == ("stopped by SIGTERM after step 2: saved "
                                                        f"{run / 'checkpoint_2.pt'}; continue with --resume latest")
    assert load_checkpoint(run / "checkpoint_2.pt")["step"] == 2
    monkeypatch.undo()
    monkeypatch.setitem(PRESETS, "pico", PICO)
    assert main(base_args(data, run, "--max-steps", "4", "--resume", "latest")) == 0
    assert [r["step"] for r in logged(run)] == [1, 2, 3, 4]


def test_ctrl_c_stops_after_the_step_without_saving_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    signal_in_forward(monkeypatch, signal.SIGINT, at_call=2)
    assert main(base_args(data, run, "--max-steps", "6")) == 130
    assert capsys.readouterr().err.splitlines()[-1] == ("stopped by SIGINT after step 2: not saved "
                                                        "(--save-on-interrupt saves); no checkpoint of this run was "
                                                        "saved")
    assert not list(run.glob("*checkpoint_*"))


def test_a_second_ctrl_c_abandons_the_step(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    assert main(base_args(data, run, "--max-steps", "1")) == 0
    signal_in_forward(monkeypatch, signal.SIGINT, at_call=1, times=2)
    assert main(base_args(data, run, "--max-steps", "6", "--resume", "latest", "--save-on-interrupt")) == 130
    assert capsys.readouterr().err.splitlines()[-1] == ("interrupted by SIGINT during step 2 (abandoned); the last "
                                                        f"good checkpoint {run / 'checkpoint_1.pt'} is untouched")


def test_ctrl_c_during_a_save_lets_the_save_finish(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import tachyon.checkpoint

    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    save = tachyon.checkpoint.torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(tachyon.checkpoint.torch, "save", interrupted_save)
    assert main(base_args(data, run, "--max-steps", "6", "--save-interval", "2")) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (f"stopped by SIGINT after step 2: saved "
                                                        f"{run / 'checkpoint_2.pt'}; continue with --resume latest")
    assert load_checkpoint(run / "checkpoint_2.pt")["step"] == 2 and not list(run.glob(".checkpoint_*"))


def test_a_killed_runs_temporary_checkpoints_are_removed_at_start(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    run.mkdir()
    (run / ".checkpoint_40.pt.tmp-4242").write_bytes(b"x" * 2_000_000)
    assert main(base_args(data, run, "--max-steps", "1")) == 0
    assert not list(run.glob(".checkpoint_*"))
    assert "removed 1 temporary checkpoint file(s) (2.0 MB) left by a killed run" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- smaller defects


def test_resume_needs_a_whole_training_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    assert main(base_args(data, run, "--max-steps", "1")) == 0
    ckpt = torch.load(run / "checkpoint_1.pt", weights_only=False)
    del ckpt["config"]
    torch.save(ckpt, tmp_path / "checkpoint_1.pt")
    expect_error(capsys, base_args(data, tmp_path / "other", "--resume", str(tmp_path / "checkpoint_1.pt")),
                 "cannot be resumed: it has no 'config'")


def test_resume_naming_a_run_directory_takes_its_newest_checkpoint(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    data, run = make_shards(tmp_path / "data"), tmp_path / "run"
    assert main(base_args(data, run, "--max-steps", "2", "--save-interval", "1")) == 0
    assert main(base_args(data, tmp_path / "next", "--max-steps", "3", "--resume", str(run))) == 0
    assert f"resumed from {run / 'checkpoint_2.pt'} at step 2" in capsys.readouterr().out
    expect_error(capsys, base_args(data, tmp_path / "x", "--resume", str(data)), f"no checkpoint_<step>.pt in {data}")


def test_a_data_dir_naming_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_shards(tmp_path / "data")
    expect_error(capsys, base_args(data / "shard_00000.npy", tmp_path / "run"), "is a file, not a folder")


def test_resume_refuses_a_rebuilt_default_tokenizer_and_warns_for_an_explicit_one(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from tachyon.tokenizer import train_bpe

    data, run = make_shards(tmp_path / "data", ids=(2, 250)), tmp_path / "run"
    old = train_bpe(["alpha beta gamma " * 40], tmp_path / "old.json", vocab_size=300)
    new = train_bpe(["delta epsilon zeta " * 40], tmp_path / "new.json", vocab_size=300)
    argv = [a for a in base_args(data, run) if a not in ("--data-dir", str(data))]  # the embedded default run
    monkeypatch.setattr("tachyon.train.embedded_default", lambda **kw: (data, old))
    assert main([*argv, "--max-steps", "1"]) == 0
    monkeypatch.setattr("tachyon.train.embedded_default", lambda **kw: (data, new))  # the cache was rebuilt
    expect_error(capsys, [*argv, "--max-steps", "2", "--resume", "latest"], "was trained with the tokenizer of sha256",
                 f"but {new} has sha256")
    assert main([*argv, "--max-steps", "2", "--resume", "latest", "--tokenizer", str(new)]) == 0
    assert "warning: checkpoint" in capsys.readouterr().err
