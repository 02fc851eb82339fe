"""Device facts: --device into a torch.device, the autocast dtype, peak memory, and the dense bf16 peak of known
GPUs (for MFU)."""

from __future__ import annotations

import resource

import torch

from .errors import TachyonError

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, by a substring of the device name.
_BF16_PEAK = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM; also matches GH200
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}


def bf16_peak_flops(device: torch.device | str | None = None) -> tuple[str, float | None]:
    """(device name, dense bf16 peak FLOP/s or None when the device is unknown or not a GPU)."""
    if device is not None and torch.device(device).type != "cuda":
        return "cpu", None
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in _BF16_PEAK.items():
        if key in name:
            return name, peak
    return name, None


def resolve_device(name: str = "auto") -> torch.device:
    """The device `--device NAME` means: 'auto' is CUDA when available, else the CPU (MPS only when named).

    A named device is checked to exist on this machine, and a CUDA device is made current (so cuda:1 runs
    its kernels on GPU 1). Only cpu, cuda[:N] and mps are accepted. Training, generation and the benchmark
    all resolve --device here, so 'auto' means the same machine part everywhere.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TachyonError(f"--device {name} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise TachyonError(f"--device {name}: only auto, cpu, cuda, cuda:N and mps are supported")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise TachyonError(f"--device {name} was asked for but this PyTorch build or machine has no MPS: "
                           "use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TachyonError(f"--device {name} was asked for but no CUDA GPU is available: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TachyonError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        torch.cuda.set_device(device)
    return device


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The half-precision autocast dtype for running the model on `device`: bf16 on a CUDA GPU that has it,
    else None (fp32). Training (`--dtype auto`), `generate()` and the generate CLI all ask here."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process on `device`, in GB: the CUDA allocator's peak since its last reset, or the
    process's peak resident set size on the CPU (what the trainer's log lines and the benchmark report)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def check_kernel_backend() -> str:
    """The kernel backend in force, or a TachyonError (one line) when $TACHYON_KERNELS names none.

    kernels checks the variable only when it is used, so a CLI asks here first instead of failing
    with a traceback in the middle of a run.
    """
    import kernels  # here, not at module level: hardware is imported where Triton must not be

    try:
        return kernels.get_backend()
    except ValueError as e:
        raise TachyonError(f"{e} (or pass --kernels where the command has it)") from None
