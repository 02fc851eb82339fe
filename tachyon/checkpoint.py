"""Checkpoints: atomic save, keep-last-N, load with key clean-up, resume lookup, safetensors export.

One file per save, `checkpoint_<step>.pt` in the run directory, written under a temporary name
and renamed, so a run that dies mid-save never leaves a damaged or half-written checkpoint.
`python -m tachyon.checkpoint export CKPT OUT.safetensors` writes the model weights alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import TachyonError, run_cli
from .model import TachyonLM

DEFAULT_RUN_DIR = Path("runs") / "default"  # where `python -m tachyon.train` with no arguments saves
_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")
_WRAPPER_PREFIXES = ("_orig_mod", "module")


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
    archive = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    archive.mkdir(parents=True, exist_ok=True)
    for path in copied:
        shutil.copy2(path, archive / path.name)
    for path in moved:
        os.replace(path, archive / path.name)
    return archive


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
    tmp = run_dir / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (or the original trainer) with clean model keys."""
    path = Path(path)
    if not path.is_file():
        raise TachyonError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unreadable file
        raise TachyonError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise TachyonError(f"{path} is not a Tachyon checkpoint (no 'model' entry)")
    ckpt["model"] = clean_state_dict(ckpt["model"])
    return ckpt


def config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a stored dict, ignoring fields this version does not know."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in values.items() if k in known})


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[TachyonLM, dict[str, Any]]:
    """A TachyonLM from a .pt checkpoint or a .safetensors export, and the file's metadata.

    The metadata holds at least 'config' (dict) and, when recorded, 'tokenizer_path'.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
    else:
        ckpt = load_checkpoint(path)
        state = ckpt.pop("model")
        meta = {k: v for k, v in ckpt.items() if k in ("config", "tokenizer_path", "tokenizer_sha256", "step")}
    if "config" not in meta:
        raise TachyonError(f"{path} records no model config")
    model = TachyonLM(config_from_dict(meta["config"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise TachyonError(f"{path} does not match the model it describes: {first}") from None
    return model.to(device), meta


def export_safetensors(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """Write the model weights of a checkpoint (plus config and tokenizer path) to a safetensors file."""
    from safetensors.torch import save_file

    ckpt = load_checkpoint(ckpt_path)
    meta = {"config": json.dumps(ckpt["config"])}
    for key in ("tokenizer_path", "tokenizer_sha256", "step"):
        if ckpt.get(key) is not None:
            meta[key] = str(ckpt[key])
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in ckpt["model"].items()}, str(tmp), metadata=meta)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
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
    if "config" in meta:
        meta["config"] = json.loads(meta["config"])
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
