"""pivot_mega: Megatron-style trainer for LLaVA-style MLLMs (SigLIP -> mlp2x_gelu -> Qwen2.5)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "pivot_mega" / "__init__.py").read_text(),
                    re.MULTILINE).group(1)

setup(
    name="pivot_mega",
    version=VERSION,
    description="Megatron-style training of LLaVA-style MLLMs through the PIVOT stages",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pivot_mega", "pivot_mega.*", "kernels", "kernels.*"]),
    install_requires=[
        # Not pinned exactly: NGC containers ship their own CUDA build of torch, which must be kept.
        # `make setup` installs torch==2.13.0 first (the version the tests run on).
        "torch>=2.6",
        "transformers==5.23.0",
        "safetensors==0.8.0",
        "pyyaml==6.0.3",
        "numpy==2.4.6",
        "tqdm==4.70.1",
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",
            "pytest-timeout==2.4.0",
        ],
        # Optional GPU packages. triton 3.7.1 is the version torch 2.13.0's CUDA wheels require; on
        # another torch, keep the triton that came with it. flash-attn, Transformer Engine and DALI
        # are not listed: they come with NGC PyTorch containers (or need a CUDA-specific install).
        "gpu": [
            "triton==3.7.1",
            "liger-kernel==0.8.5",
        ],
    },
    entry_points={"console_scripts": ["pivot-mega = pivot_mega.cli:main"]},
)
