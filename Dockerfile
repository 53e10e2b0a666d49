# pivot_mega on NVIDIA's PyTorch container. CUDA, cuDNN, NCCL, torch, Transformer Engine, Nsight Systems
# (and flash-attn, where the release ships it) come with the image and are kept as they are: the
# image's torch is pinned for every pip call, so a requirement that wanted another one fails the build
# instead of replacing it.
#
#   docker build -t pivot-mega:0.1 .
#   docker run --gpus all --rm pivot-mega:0.1        # smoke test: 2 timed steps of the tiny model
#
# Release 25.12: PyTorch 2.10 (NVIDIA build), CUDA 13.1, Python 3.12. Pick another release with
# --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3 (torch >= 2.10: the varlen attention path).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# The image's own /etc/pip/constraint.txt pins every package it holds; the project pins some of them
# differently (transformers, numpy...), so it is replaced by one that keeps only torch and the
# packages built against it: torch itself, its Triton, torchvision/torchaudio, torchao, Transformer
# Engine, flash-attn, apex.
RUN pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|torchao|triton|pytorch-triton|flash[-_]attn|transformer[-_]engine[-_a-z0-9]*|apex)==' \
      > /etc/pip/pivot-image-constraints.txt \
 && python -c 'import torch; print(torch.__version__)' > /etc/pip/pivot-torch-version.txt \
 && cat /etc/pip/pivot-image-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip/pivot-image-constraints.txt

WORKDIR /opt/pivot_mega
COPY . .

# The package without its dependencies, then its pins and those of the gpu extra (Liger kernels; DALI's
# CUDA 12 build, as setup.py pins it: it brings its own CUDA 12 libraries as wheels, and a driver new
# enough for the CUDA 13 image runs CUDA 12 code) minus torch; then a check that torch is unchanged.
# torchao (precision.fp8: torchao) is the image's, built for its torch.
RUN pip install --no-cache-dir --no-deps . \
 && python tools/requirements_from_metadata.py pivot_mega gpu > /tmp/requirements.txt \
 && cat /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && test "$(python -c 'import torch; print(torch.__version__)')" = "$(cat /etc/pip/pivot-torch-version.txt)" \
 && python -c 'import pivot_mega.training.trainer, pivot_mega.precision, pivot_mega.kernels' \
 && pivot-mega --help > /dev/null

# No Docker HEALTHCHECK: a periodic check would take GPU time from a training run, and pyxis/enroot
# ignore it. The default command is the smoke test instead.
CMD ["pivot-mega", "bench", "--preset", "tiny", "--steps", "2"]
