"""The files of a model checkpoint directory: safetensors tensors and ``config.json``, never pickles.

A pivot_mega checkpoint directory holds
  config.json                   {"format": "pivot_mega", "format_version": 1, "model": ModelConfig}
  model.safetensors             or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  vision_unused.safetensors     (optional) SigLIP tensors past the selected layer (later layers,
                                post_layernorm, head) under their HF names, kept so an exported
                                encoder is the whole original model with the trained layers swapped in.
The same reader/writer serves HF directories (``model.safetensors[.index.json]``).

This module knows no model class: ``build_model`` is given the class to build, and the shapes that
tensors are checked against come from the caller (``checkpoint_io.expected_shapes`` for
VisionLanguageModel). So the model can load itself from here without an import circle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import ConfigError, ModelConfig, from_dict, to_dict

FORMAT_NAME = "pivot_mega"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
UNUSED_VISION_FILE = "vision_unused.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class CheckpointError(ValueError):
    """A checkpoint cannot be read: missing/extra/mis-shaped tensors, wrong format or config."""


# ----------------------------------------------------------------------------------------------
# safetensors directories


def read_safetensors_dir(directory: str | os.PathLike, stem: str = "model") -> dict[str, torch.Tensor]:
    """All tensors of ``stem.safetensors`` or of the shards named by ``stem.safetensors.index.json``."""
    directory = Path(directory)
    single, index = directory / f"{stem}.safetensors", directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map (tensor name -> shard file)")
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, files = None, [single.name]
    else:
        pickles = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f"; it holds pickle files {pickles}, which are never loaded (unpickling runs code): "
                f"re-save them as safetensors (save_pretrained(..., safe_serialization=True))"
                if pickles else "")
        raise CheckpointError(f"{directory}: no {single.name} or {index.name}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{index}: names shard {name}, which does not exist")
        for key, tensor in _read_safetensors_file(path).items():
            if key in tensors:
                raise CheckpointError(f"{path}: tensor {key} appears in more than one shard")
            tensors[key] = tensor
    if weight_map is not None and set(weight_map) != set(tensors):
        missing = sorted(set(weight_map) - set(tensors))[:5]
        extra = sorted(set(tensors) - set(weight_map))[:5]
        raise CheckpointError(f"{index}: index and shards disagree (indexed but absent: {missing}; "
                              f"present but not indexed: {extra})")
    return tensors


def _read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    # The header is read (and checked against the file's size) at open; a tensor past a truncated end
    # fails at get_tensor. Both are the file's fault: name it, with the reader's reason.
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def read_json(path: Path) -> dict:
    """A JSON object file of a checkpoint; CheckpointError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_safetensors_dir(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], *,
                          stem: str = "model", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Writes tensors (sorted by name) as one file, or as shards plus an index when over the limit."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], directory / f"{stem}.safetensors", metadata=metadata)
        return [f"{stem}.safetensors"]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for name, shard in zip(names, shards):
        save_file(shard, directory / name, metadata=metadata)
        weight_map.update({key: name for key in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def read_unused_vision(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The SigLIP tensors past the selected layer that a checkpoint keeps, or {} when it has none."""
    directory = Path(directory)
    if not (directory / UNUSED_VISION_FILE).is_file():
        return {}
    return read_safetensors_dir(directory, stem=UNUSED_VISION_FILE.removesuffix(".safetensors"))


def write_unused_vision(directory: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())},
              Path(directory) / UNUSED_VISION_FILE, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# checks against expected shapes


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter / buffer name → shape of a model's state dict (a model on the meta device will do)."""
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                  source: str, *, names: dict[str, str] | None = None) -> None:
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped tensor.

    ``names`` maps our names back to the source's own names, so the message says what the user's
    files call each tensor.
    """
    names = names or {}
    show = lambda key: f"{names[key]} (-> {key})" if key in names else key  # noqa: E731
    problems = []
    for key in sorted(set(expected) - set(tensors)):
        problems.append(f"missing tensor {key} (expected shape {list(expected[key])})")
    for key in sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected tensor {show(key)} with shape {list(tensors[key].shape)}")
    for key in sorted(set(tensors) & set(expected)):
        if tuple(tensors[key].shape) != expected[key]:
            problems.append(f"tensor {show(key)} has shape {list(tensors[key].shape)}, "
                            f"the config expects {list(expected[key])}")
    for key in sorted(set(tensors) & set(expected)):
        if not tensors[key].is_floating_point():
            problems.append(f"tensor {show(key)} has dtype {tensors[key].dtype}, expected a float type")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(f"{source}: {len(problems)} problem(s) with the weights:\n  " + "\n  ".join(shown))


# ----------------------------------------------------------------------------------------------
# config.json


def write_config(directory: str | os.PathLike, config: ModelConfig) -> None:
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": to_dict(config)}
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_config(directory: str | os.PathLike) -> ModelConfig:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a pivot_mega checkpoint (no config.json)")
    meta = read_json(path)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path}: not a pivot_mega checkpoint (format {meta.get('format')!r}, model_type "
            f"{meta.get('model_type')!r}); HF directories are imported with `pivot-mega convert import-hf`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')} is not supported "
                              f"(this pivot_mega reads {FORMAT_VERSION})")
    try:
        return from_dict(ModelConfig, meta["model"], where=f"{path}:model").validate()
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


# ----------------------------------------------------------------------------------------------
# a model from a checkpoint directory


def build_model(model_class, directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu", **config_overrides) -> nn.Module:
    """``model_class(config)`` with the checkpoint's config and tensors; ``dtype=None`` keeps the stored dtype.

    ``config_overrides`` set run-time fields (``attention``...; ``activation_checkpointing`` takes effect
    where ``parallel.parallelize`` applies it); the
    structural ones cannot change at load. The tensors are checked against the model's own names and
    shapes first: one error lists every problem.
    """
    config = read_config(directory)
    tensors = read_safetensors_dir(directory)
    with torch.device("meta"):
        expected = state_shapes(model_class(config))
    check_tensors(tensors, expected, str(directory))
    structural = {"vision", "projector", "language", "image_token_id"} & set(config_overrides)
    if structural:
        raise CheckpointError(f"{directory}: cannot override structural fields {sorted(structural)} at load")
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise CheckpointError(f"unknown model config field {key!r}")
        setattr(config, key, value)
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)
