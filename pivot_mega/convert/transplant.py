"""PIVOT's step 3: the vision encoder of a (DPO-trained) checkpoint in a fresh MLLM.

    transplant("ckpt/dpo", "Qwen2.5-1.5B-Instruct/", "ckpt/transplant", seed=0)  # new LLM, new projector
    transplant_siglip("ckpt/dpo", "hf/siglip-pivot")                             # the encoder alone

The new checkpoint holds the source's vision tensors bit for bit (and its ``vision_unused.safetensors``,
so its SigLIP export is the source's), the language tower of the new LLM (an HF Qwen2 directory or a
pivot_mega checkpoint) and a projector drawn afresh with PyTorch's default Linear init, seeded per
name as ``models.mllm.initial_value`` draws it. It is the starting point of stage 1a (projector) and
1b (projector + LLM) with the vision tower frozen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from ..config import ModelConfig, ProjectorConfig
from ..data.tokenizer import copy_tokenizer_files
from ..models.checkpoint_files import DEFAULT_MAX_SHARD_BYTES, FORMAT_NAME, CheckpointError, read_safetensors_dir
from ..models.checkpoint_io import read_checkpoint, write_checkpoint
from ..models.mllm import init_parameters
from ..models.projector import Projector
from .hf import (_image_token_from_tokenizer, _read_json, _resolve_image_token, assemble, export_hf,
                 language_config_from_hf)

log = logging.getLogger(__name__)


class TransplantError(CheckpointError):
    """The encoder and the new LLM cannot be joined; the message names the file and the values."""


@dataclasses.dataclass
class _LanguageSide:
    """The new LLM: its config, its tensors (our names for a pivot_mega checkpoint, HF names for an
    HF directory) and the image token id its tokenizer uses."""

    config: object
    tensors: dict[str, torch.Tensor]
    hf_names: bool
    image_token_id: int
    directory: Path


def _is_pivot_checkpoint(directory: Path) -> bool:
    path = directory / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT_NAME
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _read_source(vision_from: str | os.PathLike):
    source = Path(vision_from)
    if not _is_pivot_checkpoint(source):
        raise TransplantError(
            f"--vision-from {source}: not a pivot_mega checkpoint (no config.json with format "
            f"'{FORMAT_NAME}'); an HF LLaVA or LLaVA-NeXT/PIVOT directory is first imported with "
            f"`pivot-mega convert import-hf`")
    config, tensors, unused = read_checkpoint(source)
    check_unused_vision(config, tensors, unused, source)
    return config, tensors, unused


def check_unused_vision(config: ModelConfig, tensors: dict[str, torch.Tensor], unused: dict[str, torch.Tensor],
                        source: Path) -> None:
    """The SigLIP tensors past the selected layer (``vision_unused.safetensors``) must continue the
    encoder: layers numbered from ``num_layers_built`` on, shaped as the built layers, a post-layernorm
    of the encoder's width. Otherwise its SigLIP export would not be a working model."""
    vision = config.vision
    built = vision.num_layers_built
    problems = []
    layers = sorted({int(k.split(".")[2]) for k in unused if k.startswith("encoder.layers.")})
    if layers and layers != list(range(built, built + len(layers))):
        problems.append(f"holds encoder layers {layers}, which do not continue the {built} built layers "
                        f"(expected {built}, {built + 1}, ...)")
    if built + len(layers) > vision.num_hidden_layers:
        problems.append(f"holds {len(layers)} layers past the {built} built ones, more than the encoder's "
                        f"num_hidden_layers {vision.num_hidden_layers}")
    for key, tensor in sorted(unused.items()):
        if key.startswith("encoder.layers."):
            rest = key.split(".", 3)[3]
            like = tensors.get(f"vision.layers.0.{rest}")
            if like is None and built:
                problems.append(f"tensor {key} has no counterpart vision.layers.0.{rest} in the encoder")
            elif like is not None and tensor.shape != like.shape:
                problems.append(f"tensor {key} has shape {list(tensor.shape)}, the encoder's layers have "
                                f"{list(like.shape)}")
        elif key.startswith("post_layernorm.") and tuple(tensor.shape) != (vision.hidden_size,):
            problems.append(f"tensor {key} has shape {list(tensor.shape)}, expected [{vision.hidden_size}] "
                            f"(the encoder's hidden_size)")
        elif not key.startswith(("encoder.layers.", "post_layernorm.", "head.")):
            problems.append(f"unexpected tensor {key}")
    if problems:
        raise TransplantError(f"{source / 'vision_unused.safetensors'}: " + "; ".join(problems))


def _read_language_side(llm: str | os.PathLike, image_token_id: int | None) -> _LanguageSide:
    directory = Path(llm)
    if _is_pivot_checkpoint(directory):
        config, tensors, _ = read_checkpoint(directory)
        token = config.image_token_id if image_token_id is None else image_token_id
        from_tokenizer = _image_token_from_tokenizer(directory)
        if from_tokenizer is not None and from_tokenizer != token:
            raise TransplantError(
                f"--llm {directory}: its tokenizer.json marks images with token id {from_tokenizer} but "
                f"{'--image-token-id' if image_token_id is not None else 'its config.json'} says {token}")
        language = {k: v for k, v in tensors.items() if k.startswith("language.")}
        return _LanguageSide(config.language, language, False, token, directory)
    hf = _read_json(directory / "config.json")
    if hf.get("model_type") in ("llava", "siglip", "siglip_vision_model"):
        raise TransplantError(
            f"--llm {directory}: model_type {hf.get('model_type')!r} is not a language model; give a Qwen2 / "
            f"Qwen2.5 directory (Qwen2ForCausalLM) or a pivot_mega checkpoint (import an HF LLaVA first with "
            f"`pivot-mega convert import-hf --llava`)")
    language_config = language_config_from_hf(hf, str(directory))
    token = _resolve_image_token(image_token_id, directory, f"--llm {directory}")
    from_tokenizer = _image_token_from_tokenizer(directory)
    if image_token_id is not None and from_tokenizer is not None and from_tokenizer != image_token_id:
        raise TransplantError(f"--llm {directory}: its tokenizer.json marks images with token id {from_tokenizer}, "
                              f"but --image-token-id says {image_token_id}")
    return _LanguageSide(language_config, read_safetensors_dir(directory), True, token, directory)


def _check_fit(config: ModelConfig, side: _LanguageSide, vision_from: Path) -> None:
    """What the LLM side needs from the encoder: an image token inside its vocabulary, and room in
    its positions for an image's tokens."""
    language = config.language
    problems = []
    if not 0 <= config.image_token_id < language.vocab_size:
        problems.append(f"the image token id {config.image_token_id} (from the LLM's tokenizer or "
                        f"--image-token-id) is outside its vocabulary of {language.vocab_size}")
    if config.num_image_tokens >= language.max_position_embeddings:
        problems.append(f"the encoder of {vision_from} gives {config.num_image_tokens} tokens per image "
                        f"({config.vision.image_size} px / patch {config.vision.patch_size}), which does not fit "
                        f"the LLM's max_position_embeddings {language.max_position_embeddings}")
    if problems:
        raise TransplantError(f"--llm {side.directory}: " + "; ".join(problems))


def transplant_tensors(vision_from: str | os.PathLike, llm: str | os.PathLike, *, seed: int = 0,
                       image_token_id: int | None = None, dtype: torch.dtype | None = None):
    """→ (config, tensors, unused vision tensors, the LLM's directory) of the transplanted model."""
    vision_from = Path(vision_from)
    source_config, source_tensors, unused = _read_source(vision_from)
    side = _read_language_side(llm, image_token_id)
    config = dataclasses.replace(source_config, vision=dataclasses.replace(source_config.vision),
                                 projector=ProjectorConfig(), language=side.config,
                                 image_token_id=side.image_token_id)
    _check_fit(config, side, vision_from)
    config.validate()

    vision = {k: v for k, v in source_tensors.items() if k.startswith("vision.")}
    language_dtype = next(iter(side.tensors.values())).dtype
    vision_dtype = next(iter(vision.values())).dtype
    if dtype is None and vision_dtype != language_dtype:
        raise TransplantError(
            f"the encoder of {vision_from} is {vision_dtype} but the LLM in {side.directory} is {language_dtype}; "
            f"a model of mixed dtypes does not run: pass --dtype (e.g. bf16) to cast both")
    projector = Projector(config.projector, config.vision.hidden_size, config.language.hidden_size)
    init_parameters(projector, seed, prefix="projector.")
    projector = {k: v.to(language_dtype) for k, v in projector.state_dict().items()}

    if side.hf_names:
        # Through the importer's table and checks: HF names, tied heads, every shape against the config.
        hf_vision = {("encoder." + k.removeprefix("vision.") if k.startswith("vision.layers.")
                      else k.removeprefix("vision.")): v for k, v in vision.items()}
        origin = {("language", k): f"{side.directory.name}/{k}" for k in side.tensors}
        tensors, _ = assemble(config, hf_vision, projector, side.tensors, f"{vision_from} + {side.directory}", origin)
    else:
        tensors = {**vision, **{"projector." + k: v for k, v in projector.items()}, **side.tensors}
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
        unused = {k: v.to(dtype) for k, v in unused.items()}
    return config, tensors, unused, side.directory


def transplant(vision_from: str | os.PathLike, llm: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0,
               image_token_id: int | None = None, dtype: torch.dtype | None = None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ModelConfig:
    """Writes a pivot_mega checkpoint at ``out``: the encoder of ``vision_from``, the language tower of
    ``llm`` (HF Qwen2 dir or pivot_mega checkpoint, whose tokenizer files are copied along) and a
    projector initialised from ``seed``. ``dtype`` casts every tensor (needed when the two differ)."""
    config, tensors, unused, llm_dir = transplant_tensors(vision_from, llm, seed=seed,
                                                          image_token_id=image_token_id, dtype=dtype)
    write_checkpoint(out, config, tensors, unused_vision=unused, max_shard_bytes=max_shard_bytes)
    copy_tokenizer_files(llm_dir, out)
    log.info("transplant: encoder of %s + language model of %s + projector (seed %d) -> %s",
             vision_from, llm_dir, seed, out)
    return config


def transplant_siglip(vision_from: str | os.PathLike, out: str | os.PathLike, *,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes the encoder of ``vision_from`` alone as an HF ``SiglipVisionModel`` directory."""
    _read_source(vision_from)
    return export_hf(vision_from, out, format="siglip", max_shard_bytes=max_shard_bytes)
