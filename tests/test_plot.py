"""`python -m tachyon.plot`: a PNG from metrics.jsonl, and clear errors without the file or matplotlib."""

import json
import sys
from pathlib import Path

import pytest

from tachyon import plot
from tachyon.errors import TachyonError

HAS_MPL = __import__("importlib.util").util.find_spec("matplotlib") is not None


def write_metrics(run_dir: Path, torn_tail: bool = False) -> None:
    lines = []
    for step in range(0, 100, 10):
        lines.append({"kind": "train", "step": step, "loss": 5 - step / 50, "ce": 4.9 - step / 50,
                      "lr": 3e-4 * min(1, (step + 1) / 30), "tokens_per_s": 1000 + step})
        if step % 30 == 0:
            lines.append({"kind": "eval", "step": step, "val_loss": 5.1 - step / 50})
    text = "\n".join(json.dumps(r) for r in lines) + "\n"
    (run_dir / "metrics.jsonl").write_text(text + ('{"kind": "train", "st' if torn_tail else ""), encoding="utf-8")


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib (the plot extra) is not installed")
def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_metrics(tmp_path, torn_tail=True)  # a run killed mid-line still plots
    train, evals = plot.read_metrics(tmp_path / "metrics.jsonl")
    assert len(train) == 10 and [e["step"] for e in evals] == [0, 30, 60, 90]
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "sub" / "m.png")]) == 0
    png = (tmp_path / "sub" / "m.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "wrote" in capsys.readouterr().out
    assert plot.plot_run(tmp_path) == tmp_path / "metrics.png" and (tmp_path / "metrics.png").is_file()


def test_plot_errors(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.jsonl not found" in err and err.count("\n") == 1
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n', encoding="utf-8")
    with pytest.raises(TachyonError, match=r"metrics\.jsonl:2 is not valid JSON"):
        plot.read_metrics(tmp_path / "metrics.jsonl")
    write_metrics(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(TachyonError, match=r"pip install 'tachyon\[plot\]'"):
        plot.plot_run(tmp_path)
