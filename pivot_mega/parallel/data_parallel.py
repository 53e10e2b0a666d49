"""Data parallelism with FSDP2: ``fully_shard`` per block (ZeRO-3 style), HSDP, or plain replication.

Replication (DDP style) is FSDP2 over a (dp_replicate, dp_shard=1) mesh: every rank holds whole
parameters and gradients are all-reduced, so sharded and replicated runs share one code path and
both compose with tensor parallelism (parameters that are already DTensors on the tp mesh).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..config import ConfigError
from .mesh import ParallelDims


def mixed_precision_policy(mode: str, device_type: str) -> MixedPrecisionPolicy:
    """bf16: parameters gathered and gradients reduced in bf16, fp32 master weights and optimizer."""
    if mode == "fp32":
        return MixedPrecisionPolicy()
    if device_type != "cuda":
        raise ConfigError(f"parallel.mixed_precision: bf16 needs CUDA devices (this run is on {device_type}); "
                          f"use fp32")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)


def apply_fsdp(model: nn.Module, dims: ParallelDims, root: nn.Module | None = None) -> None:
    """Shards every SigLIP and Qwen2 block, then the rest (embeddings, projector, norm, head) at the root:
    ``model``, or ``root`` holding it (a pipeline stage, so the schedule sees an FSDP module and
    reduces gradients once per step)."""
    config = dims.config
    kwargs = dict(mesh=dims.dp_mesh, mp_policy=mixed_precision_policy(config.mixed_precision, dims.device_type))
    blocks = []
    if getattr(model, "vision", None) is not None:
        blocks += list(model.vision.layers)
    blocks += list(model.language.layers.values())
    for block in blocks:
        fully_shard(block, reshard_after_forward=config.reshard_after_forward, **kwargs)
    # The root's parameters are needed again at once in backward; keeping them gathered saves a round.
    fully_shard(model if root is None else root, reshard_after_forward=False, **kwargs)
