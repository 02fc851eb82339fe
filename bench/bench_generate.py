"""Decode throughput for nano: KV-cached generation vs a full forward over the prefix per token, and the
compiled decode step (torch.compile, CUDA graphs; GPU only) vs eager.

Both generate 512 tokens greedily after an 8-token prompt (nano's context is stretched to 520
so they fit). The cached run is timed whole, by bench.harness.bench with one repetition (on a
GPU after one untimed run). The uncached baseline's cost per token depends
only on the prefix length, so by default it times a full forward at every STRIDE-th length and
scales by STRIDE (same total work, ~1/8 of the wall time, keeping the file under a minute on a
2-core CPU); TACHYON_BENCH_UNCACHED_STRIDE=1 runs every step exactly. pytest-benchmark's table
shows the wall time of what ran (for uncached: the sampled forwards); the printed record line
holds the 512-token seconds, tokens/s and the cached/uncached ratio.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.harness import bench
from tachyon.config import PRESETS
from tachyon.generate import generate_ids
from tachyon.model import TachyonLM

NEW_TOKENS = 512
PROMPT_LEN = 8
STRIDE = int(os.environ.get("TACHYON_BENCH_UNCACHED_STRIDE", "8"))
_RESULTS: dict[str, float] = {}  # mode -> tokens/s, to print the ratio once both ran


@pytest.fixture(scope="module")
def nano(device: str) -> TachyonLM:
    torch.manual_seed(0)
    config = PRESETS["nano"].replace(max_seq_len=PROMPT_LEN + NEW_TOKENS)
    return TachyonLM(config).to(device).eval()


def _prompt(device: str) -> torch.Tensor:
    return torch.arange(2, 2 + PROMPT_LEN, device=device)[None]


def _cached_decode_seconds(model: TachyonLM, device: str) -> float:
    """Seconds for NEW_TOKENS greedy steps of KV-cached generation (timed here, so --benchmark-disable works)."""

    def decode() -> None:
        count = sum(1 for _ in generate_ids(model, _prompt(device), NEW_TOKENS, temperature=0))
        assert count == NEW_TOKENS

    return bench(decode, device, reps=1).median_s


@torch.no_grad()
def _uncached_decode_seconds(model: TachyonLM, device: str) -> float:
    """Seconds for NEW_TOKENS greedy steps that each run a full forward over the whole sequence."""
    seq = torch.randint(2, model.config.vocab_size, (1, PROMPT_LEN + NEW_TOKENS), device=device)
    forward = lambda length: lambda: model(seq[:, :length]).logits[:, -1].argmax(-1)
    return sum(bench(forward(PROMPT_LEN + step), device, reps=1).median_s * STRIDE
               for step in range(0, NEW_TOKENS, STRIDE))


@pytest.mark.parametrize("mode", ["cached", "uncached"])
def test_decode_throughput(benchmark, record, nano: TachyonLM, device: str, mode: str) -> None:
    with torch.no_grad():  # warm up both paths (allocator, first-call costs)
        nano(_prompt(device))
        list(generate_ids(nano, _prompt(device), 4, temperature=0))
    decode = _cached_decode_seconds if mode == "cached" else _uncached_decode_seconds
    seconds = benchmark.pedantic(decode, args=(nano, device), rounds=1, iterations=1)
    tokens_per_s = NEW_TOKENS / seconds
    _RESULTS[mode] = tokens_per_s
    fields = dict(op="decode", impl=mode, shape=f"nano prompt {PROMPT_LEN} + {NEW_TOKENS} new", device=device,
                  threads=torch.get_num_threads(), seconds=seconds, tokens_per_s=tokens_per_s)
    if mode == "uncached":
        fields["stride"] = STRIDE
    if "cached" in _RESULTS and "uncached" in _RESULTS:
        fields["cached_over_uncached"] = _RESULTS["cached"] / _RESULTS["uncached"]
    record(**fields)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_decode_compiled_vs_eager(benchmark, record, nano: TachyonLM, device: str, mode: str) -> None:
    """KV-cached decode tokens/s with decode_one_token eager vs under torch.compile(fullgraph=True) (CUDA graphs)."""
    if mode == "compiled" and device != "cuda":
        pytest.skip("Inductor's CPU C++ build takes minutes on two cores: compiled decode is timed on a GPU")
    compile = mode == "compiled"
    list(generate_ids(nano, _prompt(device), 8, temperature=0, compile=compile))  # compile + warm up, untimed

    def decode() -> None:
        steps = generate_ids(nano, _prompt(device), NEW_TOKENS, temperature=0, compile=compile)
        assert sum(1 for _ in steps) == NEW_TOKENS

    seconds = benchmark.pedantic(lambda: bench(decode, device, reps=1).median_s, rounds=1, iterations=1)
    _RESULTS[mode] = NEW_TOKENS / seconds
    fields = dict(op="decode", impl=mode, shape=f"nano prompt {PROMPT_LEN} + {NEW_TOKENS} new", device=device,
                  threads=torch.get_num_threads(), seconds=seconds, tokens_per_s=NEW_TOKENS / seconds)
    if "eager" in _RESULTS and "compiled" in _RESULTS:
        fields["compiled_over_eager"] = _RESULTS["compiled"] / _RESULTS["eager"]
    record(**fields)
