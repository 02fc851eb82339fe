"""The benchmark harness's contract without a GPU: bench.harness.bench (min/median/reps, L2 flush only on
CUDA and outside the timed region, repetitions sized from an estimate), the copy-bandwidth reference at
the op's byte count, the shape/skip helper, the results writer, bench_moe's autotuner records and
bench.report reading per-role grouped-GEMM records beside old result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import triton

from bench import harness, report
from bench.bench_moe import autotune_here, config_records, config_variant


class FakeClock:
    """Milliseconds of fake time, advanced by the fake work and read by the fake CUDA events."""

    def __init__(self) -> None:
        self.now_ms = 0.0
        self.log: list[str] = []


class FakeEvent:
    def __init__(self, clock: FakeClock, name: str) -> None:
        self.clock, self.name, self.at = clock, name, None

    def record(self) -> None:
        self.at = self.clock.now_ms
        self.clock.log.append(self.name)

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.at - self.at


class FakeFlush:
    """Stands in for the 256 MB buffer: writing it takes a long fake time, which must not be timed."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.writes = clock, 0

    def zero_(self) -> None:
        self.writes += 1
        self.clock.now_ms += 1000.0
        self.clock.log.append("flush")


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeClock, FakeFlush]:
    """CUDA events, synchronize and the flush buffer replaced by fakes on one fake clock."""
    clock = FakeClock()
    flush = FakeFlush(clock)
    names = iter(["start", "end"] * 10_000)
    monkeypatch.setattr(harness, "_cuda_event", lambda: FakeEvent(clock, next(names)))
    monkeypatch.setattr(harness, "_l2_flush_buffer", lambda device: flush)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    return clock, flush


def work(clock: FakeClock, durations_ms: list[float]):
    """A function that takes the next of durations_ms (the last one repeated) each call, on the fake clock."""
    remaining = list(durations_ms)

    def fn() -> None:
        clock.now_ms += remaining.pop(0) if len(remaining) > 1 else remaining[0]
        clock.log.append("fn")

    return fn


def test_cuda_timing_flushes_outside_the_timed_region(fake_cuda) -> None:
    clock, flush = fake_cuda
    # untimed first call, 2 warm-up calls, then 4 timed calls of 4, 1, 2 and 9 ms
    timing = harness.bench(work(clock, [50, 50, 50, 4, 1, 2, 9]), "cuda", reps=4, warmup=2)
    assert (timing.min_s, timing.median_s, timing.reps) == (1e-3, 3e-3, 4)  # median of an even count: (2 + 4) / 2
    assert flush.writes == 4
    timed = clock.log[clock.log.index("flush"):]
    assert timed == ["flush", "start", "fn", "end"] * 4
    assert clock.log[:3] == ["fn", "fn", "fn"]  # the untimed call and the warm-up come first, unflushed


def test_cuda_reps_are_sized_from_an_estimate(fake_cuda) -> None:
    clock, flush = fake_cuda
    fn = work(clock, [10.0])
    timing = harness.bench(fn, "cuda")  # 10 ms a call: 25 ms of warm-up is 2 calls, 100 ms of reps is 10
    assert timing.reps == 10
    assert clock.log.count("fn") == 1 + harness.ESTIMATE_CALLS + 2 + 10
    assert flush.writes == harness.ESTIMATE_CALLS + 10
    slow = harness.bench(work(clock, [80.0]), "cuda")  # slower than REP_MS: still MIN_REPS timed calls
    assert slow.reps == harness.MIN_REPS
    assert slow.median_s == pytest.approx(0.080)


def test_cpu_timing_is_one_unflushed_call_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "_l2_flush_buffer", lambda device: pytest.fail("flushed on the CPU"))
    calls = []
    timing = harness.bench(lambda: calls.append(1), "cpu")
    assert (len(calls), timing.reps) == (1, 1)
    assert timing.min_s == timing.median_s >= 0


def test_cpu_timing_takes_min_and_median_of_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([0.0, 4.0, 10.0, 11.0, 20.0, 22.0, 30.0, 39.0])  # start/stop pairs: 4, 1, 2 and 9 s
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(ticks))
    timing = harness.bench(lambda: None, "cpu", reps=4)
    assert (timing.min_s, timing.median_s, timing.reps) == (1.0, 3.0, 4)
    assert timing.fields() == {"ms": 3000.0, "ms_min": 1000.0, "reps": 4}


def test_copy_bandwidth_is_measured_at_the_ops_byte_count(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = []

    def fake_bench(fn, device):
        fn()  # the copy itself, so its buffers' size can be seen
        sizes.append(fn.__closure__[0].cell_contents.numel())
        return harness.Timing(min_s=1e-3, median_s=2e-3, reps=5)

    monkeypatch.setattr(harness, "bench", fake_bench)
    harness.copy_bandwidth_gbps.cache_clear()
    assert harness.copy_bandwidth_gbps("cpu", 4000) == pytest.approx(4000 / 2e-3 / 1e9)  # bytes moved / median
    assert harness.copy_bandwidth_gbps("cpu", 10_000) == pytest.approx(10_000 / 2e-3 / 1e9)
    assert sizes == [2000, 5000]  # half read, half written
    harness.copy_bandwidth_gbps.cache_clear()


def test_shapes_skip_past_this_machines_list() -> None:
    gpu, cpu = [(1,), (2,), (3,)], [(9,)]
    assert harness.shape_indices(gpu, cpu) == [0, 1, 2]
    assert harness.pick_shape(gpu, cpu, 0, on_gpu=False) == (9,)
    assert harness.pick_shape(gpu, cpu, 2, on_gpu=True) == (3,)
    with pytest.raises(pytest.skip.Exception, match="GPU-only shape"):
        harness.pick_shape(gpu, cpu, 1, on_gpu=False)


def test_results_file_is_rewritten_in_place(tmp_path: Path) -> None:
    path = tmp_path / "micro-run.json"
    assert harness.write_results("micro", [{"op": "a", "ms": 1.0}], path=path) == path
    harness.write_results("micro", [{"op": "a", "ms": 1.0}, {"op": "b", "ms": 2.0}], path=path)
    assert [r["op"] for r in json.loads(path.read_text())["records"]] == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["micro-run.json"]  # no temporary file left


def _config(tma: bool, bm: int = 128, **extra) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 64, "USE_TMA": tma, **extra}, num_warps=8,
                         num_stages=3)


def test_config_variants() -> None:
    assert config_variant(triton.Config({"BLOCK_M": 64}, num_warps=4)) == "pointer"
    assert config_variant(_config(False)) == "pointer"
    assert config_variant(_config(True)) == "tma"
    assert config_variant(_config(True, PERMUTE_A=True, WARP_SPECIALIZE=True)) == "tma-permuted-ws"


def test_autotuner_timings_become_one_record_per_config() -> None:
    pointer, tma, broken = _config(False), _config(True), _config(True, bm=256)
    timings = {pointer: [2.0, 1.9, 2.2], broken: [float("inf")] * 3, tma: [1.0, 0.9, 1.1]}
    rows = config_records(timings, tma, flops=4e12, winner_time=harness.Timing(1e-3, 1e-3, 10))
    assert [(r["variant"], r["winner"], r["ms"], r["tflops"]) for r in rows] == [
        ("tma", True, 1.0, 4000.0), ("pointer", False, 2.0, 2000.0), ("tma", False, None, None)]
    assert rows[0]["config"] == "128x128x64 w8 s3" and rows[0]["ms_p20"] == 0.9
    alone = config_records(None, pointer, flops=4e12, winner_time=harness.Timing(1e-3, 2e-3, 7))
    assert [(r["winner"], r["timed_by"], r["ms"], r["reps"], r["tflops"]) for r in alone] == [
        (True, "harness", 2.0, 7, 2000.0)]


class FakeTuner:
    """What autotune_here uses of triton's Autotuner: its cache, and the timings it keeps after tuning."""

    def __init__(self, candidates: int) -> None:
        self.cache = {("N", "K"): "an earlier shape's choice"}
        self.configs_timings = {"stale": [9.0, 9.0, 9.0]}
        self.candidates = candidates

    def run(self) -> None:
        self.best_config = self.cache.get(("N", "K"), "chosen here")
        if self.best_config == "chosen here" and self.candidates > 1:  # triton times only when it must choose
            self.configs_timings = {"chosen here": [1.0, 0.9, 1.1], "other": [2.0, 1.9, 2.1]}
        self.cache[("N", "K")] = self.best_config


def test_autotune_here_retunes_and_drops_stale_timings() -> None:
    tuner = FakeTuner(candidates=2)
    timings, winner = autotune_here(tuner, tuner.run, "cpu")
    assert (winner, sorted(timings)) == ("chosen here", ["chosen here", "other"])
    single = FakeTuner(candidates=1)
    assert autotune_here(single, single.run, "cpu") == (None, "chosen here")


def _write(path: Path, created: str, records: list[dict]) -> None:
    env = {"device": "NVIDIA H100", "git_commit": "abc1234"}
    path.write_text(json.dumps({"name": "micro", "created": created, "environment": env, "records": records}))


def test_report_reads_per_role_gemm_records_and_old_files(tmp_path: Path) -> None:
    shape = "small,T=16384,E=8,d=768,f=896,balanced"
    role = {"role": "down", "shape": shape, "dtype": "bfloat16"}
    _write(tmp_path / "micro-new.json", "20270101T000000Z", [
        {"op": "grouped_gemm", "impl": "triton", **role, "ms": 0.5, "ms_min": 0.45, "reps": 50, "tflops": 450.0,
         "config": "128x256x64 w8 s3", "variant": "tma"},
        {"op": "grouped_gemm", "impl": "dense_matmul", **role, "ms": 0.45, "ms_min": 0.44, "reps": 50,
         "tflops": 500.0},
        {"op": "grouped_gemm", "impl": "torch_grouped_mm", **role, "skipped": "RuntimeError: not on sm_80"},
        {"op": "grouped_gemm_config", "impl": "triton", **role, "config": "128x256x64 w8 s3", "variant": "tma",
         "winner": True, "ms": 0.5, "tflops": 450.0},
        {"op": "grouped_gemm_config", "impl": "triton", **role, "config": "128x128x64 w4 s4", "variant": "tma",
         "winner": False, "ms": 0.6, "tflops": 375.0},
        {"op": "grouped_gemm_config", "impl": "triton", **role, "config": "128x128x64 w4 s4", "variant": "pointer",
         "winner": False, "ms": 0.7, "tflops": 321.4},
        {"op": "grouped_gemm_config", "impl": "triton", **role, "config": "64x256x64 w4 s4", "variant": "pointer",
         "winner": False, "ms": None, "tflops": None},
        {"op": "moe_layer_fwd_bwd", "impl": "triton", "shape": shape, "ms": 2.0, "ms_min": 1.9, "reps": 20},
        {"op": "moe_layer_fwd_bwd", "impl": "reference", "shape": shape, "ms": 12.0, "ms_min": 11.0, "reps": 5},
    ])
    _write(tmp_path / "micro-old.json", "20260101T000000Z", [  # before min times and per-role records
        {"op": "grouped_gemm_up", "impl": "triton", "shape": "tiny,T=16384", "ms": 1.0, "tflops": 300.0},
        {"op": "grouped_gemm_up", "impl": "dense_matmul", "shape": "tiny,T=16384", "ms": 0.8, "tflops": 375.0},
    ])
    results = report.load_results(tmp_path)
    assert (len(results.gemm), len(results.gemm_configs), len(results.micro)) == (2, 4, 4)
    [group] = report.gemm_rows(results)
    assert set(group["impls"]) == {"triton", "dense_matmul"}
    best = report.best_by_variant(group["configs"])
    assert {v: c["tflops"] for v, c in best.items()} == {"tma": 450.0, "pointer": 321.4}
    text = report.render_markdown(results, chart_link=None)
    gemm_line = next(line for line in text.splitlines() if line.startswith(f"| {shape} | down |"))
    assert gemm_line.split(" | ")[2:12] == ["bfloat16", "0.500 (0.450)", "450.0", "tma 128x256x64 w8 s3",
                                            "500.0", "0.90", "-", "-", "321.4", "450.0"]
    # micro columns: triton, reference, dense_matmul
    assert "| moe_layer_fwd_bwd | - | " + shape + " | - | 2.000 (1.900) | 12.000 (11.000) | - | 6.00x |" in text
    assert "| grouped_gemm_up | - | tiny,T=16384 | - | 1.000 | - | 0.800 | 0.80x |" in text  # old file, median only
