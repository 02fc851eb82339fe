"""Device facts for MFU: the dense bf16 tensor-core peak of known GPUs."""

from __future__ import annotations

import torch

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, by a substring of the device name.
_BF16_PEAK = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
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
