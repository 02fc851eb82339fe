"""The shared helpers every entry point uses: --device resolution, the autocast dtype, peak memory, atomic writes."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch

from tachyon.errors import TachyonError
from tachyon.files import atomic_write, temp_path
from tachyon.hardware import autocast_dtype, peak_memory_gb, resolve_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_devices_resolve_to_torch_devices_and_auto_never_picks_mps() -> None:
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    assert autocast_dtype(torch.device("cpu")) is None
    for name, message in [("cuda", "no CUDA GPU is available"), ("tpu", "is not a device"),
                          ("meta", "only auto, cpu, cuda, cuda:N and mps")]:
        with pytest.raises(TachyonError, match=message):
            resolve_device(name)


def test_cpu_peak_memory_is_the_process_peak_rss() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    assert before <= peak_memory_gb(torch.device("cpu")) <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "meta.json"
    atomic_write(path, lambda f: f.write(b"old"))

    def fails_halfway(f) -> None:
        f.write(b"new, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, fails_halfway)
    assert path.read_bytes() == b"old" and not temp_path(path).exists()
    assert atomic_write(path, lambda f: f.write(b"new")) == path and path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]
