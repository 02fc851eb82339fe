"""Device facts: the dense bf16 tensor-core peak of known GPUs (for MFU), and turning --device into a device."""

from __future__ import annotations

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


def resolve_device(name: str, prefer_mps: bool = False) -> str:
    """'auto' -> cuda, else (with prefer_mps) mps, else cpu; a named device is checked to exist on this machine.

    A CUDA device is made current (so cuda:1 runs its kernels on GPU 1). Only cpu, cuda[:N] and mps are accepted.
    """
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if prefer_mps and mps_ok else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TachyonError(f"--device {name} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise TachyonError(f"--device {name}: only auto, cpu, cuda, cuda:N and mps are supported")
    if device.type == "mps" and not mps_ok:
        raise TachyonError(f"--device {name} was asked for but this PyTorch build or machine has no MPS: "
                           "use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TachyonError(f"--device {name} was asked for but no CUDA GPU is available: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TachyonError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        torch.cuda.set_device(device)
    return name
