"""Smoke tests of the benchmark tools: `python -m bench.throughput` on the CPU and `python -m bench.report`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import report, throughput
from tachyon import train
from tachyon.config import PRESETS, ModelConfig

# A model small enough for the Triton interpreter to run a training step in a few seconds.
TINY = ["--set", "n_layers=1", "--set", "d_model=64", "--set", "n_heads=2", "--set", "n_kv_heads=1",
        "--set", "d_ff=64", "--set", "d_shared_ff=32", "--set", "vocab_size=256"]


def test_nano_on_cpu_prints_tokens_per_second(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The issue's check, `--preset nano --device cpu --steps 3`, plus --out to see the JSON it would save."""
    out = tmp_path / "run.json"
    assert throughput.main(["--preset", "nano", "--device", "cpu", "--steps", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "[reference]" in text
    payload = json.loads(out.read_text())
    (rec,) = payload["records"]
    assert rec["tokens_per_s"] > 0 and rec["steps"] == 3 and rec["batch_size"] == 2 and rec["seq_len"] == 128
    assert payload["config"]["vocab_size"] == 8192 and payload["environment"]["git_commit"]


def test_benchmark_times_the_trainers_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.throughput and `python -m tachyon.train` run one step (two micro-batches) on the same seed and shards:
    the same weights, batches, step and metrics give exactly the same loss."""
    monkeypatch.setitem(PRESETS, "pico", ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                                                     d_ff=128, d_shared_ff=64, n_routed_experts=4, max_seq_len=64))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        np.save(data / f"shard_{i:05d}.npy", np.random.default_rng(i).integers(2, 500, (32, 64), dtype=np.int32))
    common = ["--preset", "pico", "--data-dir", str(data), "--batch-size", "2", "--seq-len", "32",
              "--grad-accum", "2", "--device", "cpu", "--seed", "7"]
    assert train.main([*common, "--save-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 0
    (trained,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    out = tmp_path / "bench.json"
    assert throughput.main([*common, "--steps", "1", "--warmup", "0", "--no-save", "--out", str(out)]) == 0
    (timed,) = json.loads(out.read_text())["records"]
    assert timed["data"] == str(data) and trained["step"] == 1
    assert timed["loss"] == trained["loss"]
    other = tmp_path / "other.json"  # another seed: other weights and batches, so the equality above is no accident
    assert throughput.main([*common[:-1], "8", "--steps", "1", "--warmup", "0", "--no-save", "--out", str(other)]) == 0
    assert json.loads(other.read_text())["records"][0]["loss"] != trained["loss"]


def test_both_backends_print_the_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    """Triton through the interpreter on a CPU-only machine (not possible where CUDA is: use the GPU there)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    argv = ["--preset", "nano", "--device", device, "--no-compile", "--no-save", "--kernels", "both",
            "--batch-size", "1", "--seq-len", "16",
            "--steps", "1", "--warmup", "0", "--profile", *TINY]
    assert throughput.main(argv) == 0
    text = capsys.readouterr().out
    assert "[   triton]" in text and "[reference]" in text and "triton / reference:" in text
    assert "step-time breakdown" in text and "backward" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--memory-test"], "--memory-test needs a CUDA device"),
    (["--set", "n_layers=two"], "'two' is not a number"),
    (["--set", "depth=2"], "expected FIELD=VALUE with FIELD one of vocab_size"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_options_are_one_line_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert throughput.main(["--device", "cpu", "--no-save", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


@pytest.mark.parametrize(("capacity", "start"), [(1, 1), (37, 1), (37, 8), (64, 1), (5, 16), (0, 4), (10_000, 1)])
def test_largest_fitting_doubles_then_bisects(capacity: int, start: int) -> None:
    tried = []

    def fits(n: int) -> bool:
        tried.append(n)
        return n <= capacity

    assert throughput.largest_fitting(fits, start=start, limit=4096) == min(capacity, 4096)
    assert len(tried) <= 2 * 13  # logarithmic in the limit


def _write(path: Path, name: str, records: list[dict], commit: str = "abc1234") -> None:
    env = {"device": "NVIDIA H100 80GB HBM3", "git_commit": commit, "torch": "2.9.0"}
    path.write_text(json.dumps({"name": name, "created": "20260101T000000Z", "environment": env,
                                "records": records}))


def test_report_turns_results_into_a_table_and_a_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = {"preset": "tiny", "compile": True, "batch_size": 32, "seq_len": 2048, "grad_accum": 1}
    _write(tmp_path / "throughput-h100-1.json", "throughput", [
        {**common, "kernels": "triton", "tokens_per_s": 510_000.0, "mfu": 0.33, "peak_memory_gb": 41.5},
        {**common, "kernels": "reference", "tokens_per_s": 300_000.0, "mfu": None},
    ])
    _write(tmp_path / "micro-h100-1.json", "micro", [
        {"op": "rms_norm", "impl": "triton", "pass": "fwd", "shape": "65536x512", "dtype": "bf16", "ms": 0.05,
         "gbps": 2700.0},
        {"op": "rms_norm", "impl": "reference", "pass": "fwd", "shape": "65536x512", "dtype": "bf16", "ms": 0.2},
        {"op": "swiglu", "impl": "triton", "ms": 0.1},  # no reference, no pass/shape/dtype: still listed
        {"op": "grouped_gemm_up", "impl": "triton", "shape": "tiny,T=16384", "ms": 0.9, "tflops": 610.0},
        {"op": "grouped_gemm_up", "impl": "dense_matmul", "shape": "tiny,T=16384", "ms": 0.81, "tflops": 680.0},
        {"op": "decode", "impl": "cached", "shape": "nano 512 new", "seconds": 0.5, "tokens_per_s": 1024.0},
        {"impl": "triton"},  # not a usable record
    ])
    (tmp_path / "broken.json").write_text("{")
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n{report.START_MARKER}\nstale\n{report.END_MARKER}\ntail\n")

    assert report.main(["--results-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| tiny | triton | yes | 32 x 2048 | 510,000 | 33.0% | 41.5 GB | NVIDIA H100 80GB HBM3 | `abc1234` |" in text
    assert "1.70x" in text and "4.00x" in text and "2,700 GB/s" in text and "swiglu" in text
    assert "0.90x" in text and "vs dense_matmul" not in text  # grouped GEMM against cuBLAS (chart label only)
    assert "| cached | nano 512 new | 1,024.0 |" in text  # decode rates get their own table, not the throughput one
    assert text.count("| tiny |") == 2
    assert "commit(s) `abc1234` on NVIDIA H100 80GB HBM3" in text
    png = tmp_path / "speedups.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert report.main(["--results-dir", str(tmp_path), "--readme", str(readme)]) == 0
    updated = readme.read_text()
    assert "stale" not in updated and updated.startswith("# T\n") and updated.endswith(f"{report.END_MARKER}\ntail\n")
    assert "](speedups.png)" in updated


def test_report_with_no_results_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["--results-dir", str(tmp_path / "missing")]) == 0
    assert "No benchmark results yet" in capsys.readouterr().out
    assert not (tmp_path / "missing").exists()


def test_report_without_markers_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert report.main(["--results-dir", str(tmp_path), "--readme", str(readme)]) == 1
    assert "perf:start" in capsys.readouterr().err
