"""Tachyon: Mixture-of-Experts language-model pretraining with fused Triton kernels."""

from .config import PRESETS, ModelConfig
from .generate import generate, generate_ids
from .model import TachyonLM

__version__ = "0.1.0"
__all__ = ["PRESETS", "ModelConfig", "TachyonLM", "__version__", "generate", "generate_ids"]
