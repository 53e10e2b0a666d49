"""Checkpoint directories of the VisionLanguageModel: its tensors checked against its config, in and out.

The files themselves (safetensors, sharded with an index when large, and ``config.json``) are
``checkpoint_files``'s; this module adds what needs the model class: the shapes a config implies,
and reading, writing, loading and saving checked against them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ModelConfig
from .checkpoint_files import CheckpointError  # noqa: F401 - what every reader here raises
from .checkpoint_files import (DEFAULT_MAX_SHARD_BYTES, check_tensors, read_config, read_safetensors_dir,
                               read_unused_vision, state_shapes, write_config, write_safetensors_dir,
                               write_unused_vision)
from .mllm import VisionLanguageModel


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape of the model ``config`` describes (built on the meta device)."""
    with torch.device("meta"):
        return state_shapes(VisionLanguageModel(config))


def write_checkpoint(directory: str | os.PathLike, config: ModelConfig, tensors: dict[str, torch.Tensor], *,
                     unused_vision: dict[str, torch.Tensor] | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Validates ``tensors`` against ``config`` and writes a checkpoint directory."""
    directory = Path(directory)
    config.validate()
    check_tensors(tensors, expected_shapes(config), f"checkpoint for {directory}")
    write_safetensors_dir(directory, tensors, max_shard_bytes=max_shard_bytes)
    if unused_vision:
        write_unused_vision(directory, unused_vision)
    write_config(directory, config)
    return directory


def read_checkpoint(directory: str | os.PathLike):
    """→ (config, tensors, unused_vision) of a checkpoint directory, validated."""
    directory = Path(directory)
    config = read_config(directory)
    tensors = read_safetensors_dir(directory)
    check_tensors(tensors, expected_shapes(config), str(directory))
    return config, tensors, read_unused_vision(directory)


def load_model(directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", **config_overrides) -> VisionLanguageModel:
    """``VisionLanguageModel.from_checkpoint``: a model built from a checkpoint directory."""
    return VisionLanguageModel.from_checkpoint(directory, dtype=dtype, device=device, **config_overrides)


def save_model(model: VisionLanguageModel, directory: str | os.PathLike, *,
               unused_vision: dict[str, torch.Tensor] | None = None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes a VisionLanguageModel as a checkpoint directory."""
    return write_checkpoint(directory, model.config, dict(model.state_dict()),
                            unused_vision=unused_vision, max_shard_bytes=max_shard_bytes)
