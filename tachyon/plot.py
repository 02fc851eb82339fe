"""`python -m tachyon.plot RUN_DIR [--out PNG]`: draw a run's metrics.jsonl (loss, val loss, lr, tokens/s) to a PNG.

The trainer appends one JSON object per logged step ("kind": "train": step, loss, ce, lr, tokens_per_s) and per
evaluation ("kind": "eval": step, val_loss); lines without "kind" count as train lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import TachyonError, run_cli


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl file; a torn last line (a run killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise TachyonError(f"{path} not found; pass the run directory of a `python -m tachyon.train` run "
                           "(it writes metrics.jsonl there)")
    train, evals = [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue
            raise TachyonError(f"{path}:{n} is not valid JSON; metrics.jsonl holds one JSON object per line") from None
        (evals if record.get("kind") == "eval" else train).append(record)
    if not train and not evals:
        raise TachyonError(f"{path} holds no metrics yet; wait for the first logged step")
    return train, evals


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw train/val loss, learning rate and tokens/s against step to a PNG (default RUN_DIR/metrics.png)."""
    try:
        import matplotlib
    except ImportError:
        raise TachyonError("plotting needs matplotlib: pip install 'tachyon[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out) if out else run_dir / "metrics.png"

    def series(records: list[dict], key: str) -> tuple[list, list]:
        pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, (ax_loss, ax_lr, ax_tps) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_loss.plot(*series(train, "loss"), label="train loss", lw=1)
    if any("ce" in r for r in train):
        ax_loss.plot(*series(train, "ce"), label="train cross-entropy", lw=1, alpha=0.6)
    if evals:
        ax_loss.plot(*series(evals, "val_loss"), "o-", label="val loss", ms=3)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_lr.plot(*series(train, "lr"), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_tps.plot(*series(train, "tokens_per_s"), color="tab:red")
    ax_tps.set_ylabel("tokens / s")
    ax_tps.set_xlabel("step")
    for ax in (ax_loss, ax_lr, ax_tps):
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; user errors print one `error:` line and return 2."""
    parser = argparse.ArgumentParser(prog="python -m tachyon.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    return run_cli(lambda: print(f"wrote {plot_run(args.run_dir, args.out)}"))


if __name__ == "__main__":
    sys.exit(main())
