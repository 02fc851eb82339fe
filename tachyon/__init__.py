"""Tachyon: Mixture-of-Experts language-model pretraining with fused Triton kernels.

Generation lives in `tachyon.generate` (`from tachyon.generate import generate`), kept out of
this file so that `python -m tachyon.generate` runs the module fresh.
"""

from .config import PRESETS, ModelConfig
from .model import TachyonLM

__version__ = "0.1.0"
__all__ = ["PRESETS", "ModelConfig", "TachyonLM", "__version__"]
