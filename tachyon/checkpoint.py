"""Checkpoints: atomic save, keep-last-N, load with key clean-up, resume lookup, safetensors export.

One file per save, `checkpoint_<step>.pt` in the run directory, written under a temporary name
and renamed, so a run that dies mid-save never leaves a damaged or half-written checkpoint.
`python -m tachyon.checkpoint export CKPT OUT.safetensors` writes the model weights alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, total_params
from .errors import TachyonError, run_cli
from .files import atomic_write
from .model import TachyonLM
from .tokenizer import Tokenizer, check_same_tokenizer, load_tokenizer

DEFAULT_RUN_DIR = Path("runs") / "default"  # where `python -m tachyon.train` with no arguments saves
_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")
_TEMP_GLOB = ".checkpoint_*.pt.tmp-*"  # what save_checkpoint leaves when its process is killed mid-write
_WRAPPER_PREFIXES = ("_orig_mod", "module")
LOCK_NAME = ".lock"
RESUME_KEYS = ("model", "optimizer", "config", "data", "rng", "step")  # what --resume needs in a checkpoint


def free_space(path: str | Path) -> str:
    """The free space on the filesystem holding `path`, in words, for disk-full messages."""
    try:
        return f"{shutil.disk_usage(path).free / 1e9:.2f} GB free"
    except OSError:
        return "free space unknown"


def io_reason(exc: BaseException) -> str:
    """One line for an I/O failure: the OS's words for an OSError, the first line of anything else."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def prepare_run_dir(run_dir: str | Path) -> Path:
    """Create the run directory if needed and prove it writable now, before any training work is spent."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as exc:
        raise TachyonError(f"run directory {run_dir} is not writable ({io_reason(exc)}); pass --save-dir with a "
                           "folder you can write to") from None
    return run_dir


class RunLock:
    """An exclusive lock on a run directory, held for a whole run, so two runs never write into one directory.

    It is an OS lock (`flock` on run_dir/.lock), so the kernel drops it when the process ends however it ends
    (kill -9 included): it never goes stale. The holder writes its PID into the file so a refused run can name it.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise TachyonError naming the process that holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TachyonError(f"cannot open the run lock {self.path} ({io_reason(exc)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TachyonError(f"{self.path.parent} is in use by another training run (PID {holder}); wait for it "
                               "to finish, or pass another --save-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_stale_temps(run_dir: str | Path) -> tuple[int, int]:
    """Delete the temporary files of checkpoint saves that were killed mid-write; returns (files, bytes).

    Call it only while holding the RunLock: then no live process can be writing them.
    """
    count = size = 0
    for tmp in Path(run_dir).glob(_TEMP_GLOB):
        try:
            size += tmp.stat().st_size
            tmp.unlink()
            count += 1
        except FileNotFoundError:
            pass
    return count, size


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the names wrappers add: leading `module.` (DDP) and `_orig_mod.` (torch.compile).

    `_orig_mod.` is also dropped inside a name (a compiled submodule); nothing else is changed.
    """
    cleaned = {}
    for key, value in state.items():
        parts = key.split(".")
        while len(parts) > 1 and parts[0] in _WRAPPER_PREFIXES:
            parts.pop(0)
        cleaned[".".join(p for p in parts if p != "_orig_mod")] = value
    return cleaned


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint files, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if _NAME.match(p.name)), key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint in `run_dir`, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def archive_previous_run(run_dir: str | Path, after_step: int | None = None) -> Path | None:
    """Move an earlier run's files out of the way, into run_dir/previous/<time>/; returns that folder or None.

    A new run (after_step None) moves every checkpoint, metrics.jsonl, metrics.png and tensorboard/:
    mixing two runs' checkpoints would make resume and keep-last pick the wrong files. A run resumed
    at `after_step` moves only the checkpoints past that step (and keeps a copy of the metrics they
    belong to), since its own saves would otherwise interleave with them. Nothing is deleted.
    """
    run_dir = Path(run_dir)
    if after_step is None:
        extras = [run_dir / name for name in ("metrics.jsonl", "metrics.png", "tensorboard")]
        moved, copied = list_checkpoints(run_dir) + [p for p in extras if p.exists()], []
    else:
        moved = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) > after_step]
        copied = [p for p in (run_dir / "metrics.jsonl",) if moved and p.exists()]
    if not moved:
        return None
    archive = _new_archive_dir(run_dir / "previous")
    for path in copied:
        shutil.copy2(path, archive / path.name)
    for path in moved:
        os.replace(path, archive / path.name)
    return archive


def _new_archive_dir(parent: Path) -> Path:
    """A fresh folder parent/<time>-<pid>[-N]: created here, so two archives (even in one second) never share one."""
    parent.mkdir(parents=True, exist_ok=True)
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for n in itertools.count():
        folder = parent / (base if n == 0 else f"{base}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def checkpoint_step(path: str | Path) -> int:
    """The step in a `checkpoint_<step>.pt` file name."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named checkpoint_<step>.pt")
    return int(match.group(1))


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write `state` to run_dir/checkpoint_<step>.pt atomically, then keep only the newest `keep_last`.

    `state` holds at least 'model' (a state dict) and 'config' (a ModelConfig); model keys are
    cleaned of wrapper prefixes and the config is stored as a plain dict.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(state, step=step, model=clean_state_dict(state["model"]))
    if isinstance(payload["config"], ModelConfig):
        payload["config"] = dataclasses.asdict(payload["config"])
    path = run_dir / f"checkpoint_{step}.pt"
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as a RuntimeError
        kept = latest_checkpoint(run_dir)
        raise TachyonError(f"could not write checkpoint {path} ({io_reason(exc)}; {free_space(run_dir)} in "
                           f"{run_dir}); " + (f"the last good checkpoint {kept} is kept" if kept else
                                              "no checkpoint of this run was saved")) from None
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (or the original trainer) with clean model keys.

    Anything that is not such a file (missing, a directory, damaged, another kind of pickle) is a TachyonError.
    """
    path = Path(path)
    if path.is_dir():
        raise TachyonError(f"checkpoint {path} is a directory, not a checkpoint file; pass one of its "
                           "checkpoint_<step>.pt files")
    if not path.is_file():
        raise TachyonError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unreadable file
        raise TachyonError(f"cannot read checkpoint {path}: {type(e).__name__}: {io_reason(e)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise TachyonError(f"{path} is not a Tachyon checkpoint (no 'model' state dict)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        raise TachyonError(f"{path} is not a Tachyon checkpoint (its 'model' entry is not a state dict of tensors)")
    ckpt["model"] = clean_state_dict(ckpt["model"])
    return ckpt


def config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a stored dict, ignoring fields this version does not know."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in values.items() if k in known})


def checkpoint_config(meta: dict[str, Any], path: str | Path) -> ModelConfig:
    """The ModelConfig a checkpoint (or export) records, or a TachyonError when it records none or a broken one."""
    values = meta.get("config")
    if not isinstance(values, dict):
        raise TachyonError(f"{path} records no model config; it was not saved by tachyon.train")
    try:
        config = config_from_dict(values)
        total_params(config)  # arithmetic on every field: wrong types fail here
    except Exception as e:  # noqa: BLE001 - wrong types or values anywhere in the stored dict
        raise TachyonError(f"{path} records an invalid model config ({type(e).__name__}: {io_reason(e)})") from None
    return config


def check_resumable(ckpt: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint that lacks what resuming needs (an export, or another trainer's file)."""
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if missing:
        raise TachyonError(f"{path} cannot be resumed: it has no {', '.join(repr(k) for k in missing)} "
                           "(only checkpoints saved by tachyon.train resume; start a new run instead)")


def _check_shapes(config: ModelConfig, state: dict[str, torch.Tensor], path: Path) -> None:
    """Compare the state dict with the model the config describes, before any memory is spent on the model.

    The parameter count comes first (arithmetic only), so an absurd config from a damaged file is refused before
    even the meta-device model (which still builds every module object) is made.
    """
    have_params, want_params = sum(v.numel() for v in state.values()), total_params(config)
    if have_params != want_params:
        raise TachyonError(f"{path} does not match the model it describes: {have_params:,} parameters in the file, "
                           f"{want_params:,} in its config")
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in TachyonLM(config).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    for key in sorted(wanted.keys() | have.keys()):
        if wanted.get(key) != have.get(key):
            raise TachyonError(f"{path} does not match the model it describes: {key} is {have.get(key)} in the "
                               f"file but {wanted.get(key)} in its config")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[TachyonLM, dict[str, Any]]:
    """A TachyonLM from a .pt checkpoint or a .safetensors export, and the file's metadata.

    The metadata holds at least 'config' (dict) and, when recorded, 'tokenizer_path', 'tokenizer_sha256'
    and 'step' (int). The config and the weights' shapes are checked before any memory is allocated.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
    else:
        ckpt = load_checkpoint(path)
        state = ckpt.pop("model")
        meta = {k: v for k, v in ckpt.items() if k in ("config", "tokenizer_path", "tokenizer_sha256", "step")}
    config = checkpoint_config(meta, path)
    _check_shapes(config, state, path)
    model = TachyonLM(config)
    model.load_state_dict(state)
    return model.to(device), meta


def checkpoint_tokenizer(meta: dict[str, Any], path: str | Path, override: str | Path | None = None) -> Tokenizer:
    """The tokenizer to use with a loaded checkpoint: `override`, else the one it records; checked by hash.

    A recorded tokenizer whose file changed since is refused; an explicit override that differs gets a warning.
    """
    tokenizer_path = override or meta.get("tokenizer_path")
    if not tokenizer_path:
        raise TachyonError(f"{path} records no tokenizer: pass --tokenizer PATH")
    tokenizer = load_tokenizer(tokenizer_path)
    check_same_tokenizer(meta.get("tokenizer_sha256"), tokenizer, f"checkpoint {path}", explicit=override is not None)
    return tokenizer


def export_safetensors(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """Write the model weights of a checkpoint (plus config and tokenizer path) to a safetensors file."""
    from safetensors.torch import save

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise TachyonError(f"export writes safetensors: name the output *.safetensors, not {out_path.name} "
                           "(load_model reads a file by its suffix)")
    if not out_path.parent.is_dir():
        raise TachyonError(f"folder {out_path.parent} for {out_path.name} does not exist; create it first")
    ckpt = load_checkpoint(ckpt_path)
    meta = {"config": json.dumps(dataclasses.asdict(checkpoint_config(ckpt, ckpt_path)))}
    for key in ("tokenizer_path", "tokenizer_sha256", "step"):
        if ckpt.get(key) is not None:
            meta[key] = str(ckpt[key])
    tensors = {k: v.contiguous() for k, v in ckpt["model"].items()}
    try:
        atomic_write(out_path, lambda f: f.write(save(tensors, metadata=meta)))
    except OSError as exc:
        raise TachyonError(f"could not write {out_path} ({io_reason(exc)}; {free_space(out_path.parent)})") from None
    return out_path


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise TachyonError(f"cannot read {path}: {e}") from None
    meta: dict[str, Any] = dict(raw)
    try:
        if "config" in meta:
            meta["config"] = json.loads(meta["config"])
        if "step" in meta:
            meta["step"] = int(meta["step"])  # safetensors metadata holds strings only
    except ValueError as e:
        raise TachyonError(f"{path} has damaged metadata ({e})") from None
    return clean_state_dict(state), meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tachyon.checkpoint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a checkpoint's model weights to a .safetensors file")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path)
    args = parser.parse_args(argv)

    def command() -> None:
        out = export_safetensors(args.checkpoint, args.out)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")

    return run_cli(command)


if __name__ == "__main__":
    sys.exit(main())
