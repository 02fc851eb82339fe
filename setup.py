"""Tachyon: a Mixture-of-Experts LM trainer whose hot paths are hand-written Triton kernels."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="tachyon",
    version="0.1.0",
    description="Fast small-scale Mixture-of-Experts pretraining with fused Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tachyon", "tachyon.*", "kernels", "kernels.*", "bench", "bench.*"]),
    install_requires=[
        "torch>=2.5,<3",
        "triton>=3.1,<4; platform_system == 'Linux'",
        "numpy>=1.24,<3",
        "tokenizers>=0.19,<1",
        "huggingface_hub>=0.23,<3",
        "safetensors>=0.4,<1",
        "tqdm>=4.60,<5",
    ],
    extras_require={
        "dev": [
            "pytest>=8,<10",
            "pytest-benchmark>=4,<6",
            "hypothesis>=6.100,<7",
            "ruff>=0.5,<1",
            "matplotlib>=3.7,<4",
        ],
        "flash": ["flash-attn>=2.5,<3"],
        "plot": ["matplotlib>=3.7,<4"],
    },
)
