"""Tachyon: Mixture-of-Experts language-model pretraining with fused Triton kernels.

`TachyonLM`, `ModelConfig` and `PRESETS` are loaded on first use, so that `python -m tachyon.config`
(or any other submodule run as a script) starts fresh. Generation lives in `tachyon.generate`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["PRESETS", "ModelConfig", "TachyonLM", "__version__"]
_LAZY = {"PRESETS": "config", "ModelConfig": "config", "TachyonLM": "model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
