"""HF checkpoints in and out.

In: a SigLIP dir + a Qwen2 dir (fresh MLLM, random projector); an HF LLaVA dir
(``LlavaForConditionalGeneration``, legacy or current key layout); a LLaVA-NeXT / PIVOT reference
checkpoint (``model.vision_tower.vision_tower.*``, ``model.mm_projector.*``, ``model.layers.*``).
Out: an HF LLaVA dir (loads in transformers, same logits) or the SigLIP encoder alone as a
``SiglipVisionModel`` dir. Tensors keep their dtype unless asked; only safetensors are read.

Each source is split into three HF-named parts (SigLIP tower, projector, Qwen2ForCausalLM) and one
table maps those to our names, so every format shares the same checks and messages.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..config import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig, from_dict, load_yaml
from ..data.tokenizer import copy_tokenizer_files
from ..models.checkpoint_files import (DEFAULT_MAX_SHARD_BYTES, CheckpointError, check_tensors, read_json,
                                       read_safetensors_dir, write_safetensors_dir)
from ..models.checkpoint_io import expected_shapes, read_checkpoint, write_checkpoint
from ..models.mllm import init_parameters
from ..models.projector import Projector

log = logging.getLogger(__name__)

IMAGE_TOKENS = ("<image>", "<|image_pad|>")
# Tensors of LLaVA-NeXT checkpoints that a square-image (non-anyres) model never uses.
IGNORED_REFERENCE_TENSORS = ("model.image_newline",)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no config.json (expected a Hugging Face model directory)")
    return read_json(path)


# ----------------------------------------------------------------------------------------------
# HF configs -> ours


def vision_config_from_hf(hf: dict, select_layer: int, source: str) -> VisionConfig:
    if hf.get("model_type") == "siglip":
        hf = hf.get("vision_config") or {}
    model_type = hf.get("model_type", "siglip_vision_model")
    if model_type == "siglip2_vision_model" or "num_patches" in hf:
        raise CheckpointError(
            f"{source}: NaFlex SigLIP2 ({model_type}) is not supported; use a fixed-resolution SigLIP2 "
            f"checkpoint such as google/siglip2-so400m-patch16-384 (model_type siglip)")
    if model_type != "siglip_vision_model":
        raise CheckpointError(f"{source}: vision model_type {model_type!r} is not supported (expected SigLIP: "
                              f"'siglip' or 'siglip_vision_model')")
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise CheckpointError(f"{source}: vision hidden_act {act!r} is not supported (SigLIP uses gelu_pytorch_tanh)")
    try:
        return VisionConfig(
            hidden_size=hf.get("hidden_size", 768), intermediate_size=hf.get("intermediate_size", 3072),
            num_hidden_layers=hf.get("num_hidden_layers", 12), num_attention_heads=hf.get("num_attention_heads", 12),
            image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
            num_channels=hf.get("num_channels", 3), layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
            select_layer=select_layer)
    except TypeError as e:
        raise CheckpointError(f"{source}: bad vision config: {e}") from e


def language_config_from_hf(hf: dict, source: str) -> LanguageConfig:
    model_type = hf.get("model_type")
    if model_type != "qwen2" and model_type not in ("llava_qwen",):
        raise CheckpointError(f"{source}: language model_type {model_type!r} is not supported "
                              f"(expected qwen2: Qwen2 / Qwen2.5)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: rope_type {rope_type!r} is not supported (only default RoPE)")
    if hf.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (Qwen2 uses silu)")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise CheckpointError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return LanguageConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads", heads), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


def load_vision_config_file(path: str | os.PathLike, select_layer: int) -> VisionConfig:
    """A vision config from an HF dir / config.json, or from one of our YAML vision presets."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix in (".yaml", ".yml"):
        data = load_yaml(path)
        data.setdefault("select_layer", select_layer)
        return from_dict(VisionConfig, data, where=str(path))
    return vision_config_from_hf(_read_json(path), select_layer, str(path))


# ----------------------------------------------------------------------------------------------
# name tables: HF part names <-> ours


def _vision_name(hf_name: str, num_built: int) -> str | None:
    """SigLIP-tower-relative HF name → our name, or None for a tensor past the selected layer."""
    name = hf_name.removeprefix("vision_model.")
    if name.startswith("embeddings."):
        return "vision." + name
    if name.startswith("encoder.layers."):
        index = int(name.split(".")[2])
        return "vision." + name.removeprefix("encoder.") if index < num_built else None
    return None


def _language_name(hf_name: str) -> str | None:
    if hf_name == "lm_head.weight":
        return "language.lm_head.weight"
    if hf_name.startswith("model."):
        return "language." + hf_name.removeprefix("model.")
    return None


def assemble(config: ModelConfig, vision: dict[str, torch.Tensor], projector: dict[str, torch.Tensor],
             language: dict[str, torch.Tensor], source: str, origin: dict[tuple[str, str], str] | None = None):
    """HF-named parts → (our tensors, unused SigLIP tensors), checked against ``config``.

    ``origin`` maps (part, part-relative name) to the key in the source files, for error messages.
    """
    origin = origin or {}
    tensors, unused, names, unknown = {}, {}, {}, []
    built = config.vision.num_layers_built
    for hf_name, tensor in vision.items():
        ours = _vision_name(hf_name, built)
        plain = hf_name.removeprefix("vision_model.")
        if ours is not None:
            tensors[ours], names[ours] = tensor, origin.get(("vision", hf_name), hf_name)
        elif plain.startswith(("encoder.layers.", "post_layernorm.", "head.")):
            unused[plain] = tensor
        else:
            unknown.append(origin.get(("vision", hf_name), hf_name))
    for hf_name, tensor in projector.items():
        ours = "projector." + hf_name
        tensors[ours], names[ours] = tensor, origin.get(("projector", hf_name), hf_name)
    for hf_name, tensor in language.items():
        ours = _language_name(hf_name)
        if ours is None:
            unknown.append(origin.get(("language", hf_name), hf_name))
            continue
        tensors[ours], names[ours] = tensor, origin.get(("language", hf_name), hf_name)
    if unknown:
        raise CheckpointError(f"{source}: unexpected tensors {sorted(unknown)[:10]}")
    if config.language.tie_word_embeddings and "language.lm_head.weight" in tensors:
        head, embed = tensors.pop("language.lm_head.weight"), tensors.get("language.embed_tokens.weight")
        if embed is None or not torch.equal(head, embed):
            raise CheckpointError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from "
                                  f"embed_tokens.weight; set tie_word_embeddings false in its config")
    check_tensors(tensors, expected_shapes(config), source, names=names)
    return tensors, unused


def _split(tensors: dict[str, torch.Tensor], prefixes: dict[str, tuple[str, str]]):
    """Groups keys by the first matching prefix: prefix → (part, replacement for the prefix).

    Returns (groups, origin, leftovers); origin maps (part, new name) back to the file's key.
    """
    groups = {part: {} for part, _ in prefixes.values()}
    origin, leftovers = {}, []
    for key, tensor in tensors.items():
        for prefix, (part, replacement) in prefixes.items():
            if key.startswith(prefix):
                name = replacement + key.removeprefix(prefix)
                groups[part][name] = tensor
                origin[(part, name)] = key
                break
        else:
            leftovers.append(key)
    return groups, origin, leftovers


# ----------------------------------------------------------------------------------------------
# import


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return tensors if dtype is None else {k: v.to(dtype) for k, v in tensors.items()}


def _image_token_from_tokenizer(directory: Path) -> int | None:
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    added = {t["content"]: t["id"] for t in json.loads(path.read_text()).get("added_tokens", [])}
    return next((added[t] for t in IMAGE_TOKENS if t in added), None)


def _resolve_image_token(explicit: int | None, directory: Path, source: str) -> int:
    if explicit is not None:
        return explicit
    found = _image_token_from_tokenizer(directory)
    if found is None:
        raise CheckpointError(
            f"{source}: cannot tell which token id marks image positions (its tokenizer.json has none of "
            f"{list(IMAGE_TOKENS)}); pass --image-token-id (Qwen2.5: 151655 = <|image_pad|>)")
    return found


def import_vision_llm(vision_dir, llm_dir, *, select_layer: int = -2, image_token_id: int | None = None,
                      seed: int = 0, dtype: torch.dtype | None = None):
    """SigLIP dir + Qwen2 dir → (config, tensors, unused); the projector is freshly initialised."""
    vision_dir, llm_dir = Path(vision_dir), Path(llm_dir)
    vision_hf = _read_json(vision_dir / "config.json")
    llm_hf = _read_json(llm_dir / "config.json")
    config = ModelConfig(vision=vision_config_from_hf(vision_hf, select_layer, str(vision_dir)),
                         projector=ProjectorConfig(),
                         language=language_config_from_hf(llm_hf, str(llm_dir)),
                         image_token_id=_resolve_image_token(image_token_id, llm_dir, str(llm_dir)))
    config.validate()
    vision = read_safetensors_dir(vision_dir)
    if vision_hf.get("model_type") == "siglip":  # the full two-tower SigLIP: keep the image tower
        vision = {k: v for k, v in vision.items() if k.startswith("vision_model.")}
    language = read_safetensors_dir(llm_dir)
    projector = Projector(config.projector, config.vision.hidden_size, config.language.hidden_size)
    init_parameters(projector, seed, prefix="projector.")
    projector_dtype = next(iter(language.values())).dtype
    projector = {k: v.to(projector_dtype) for k, v in projector.state_dict().items()}
    origin = {("vision", k): f"{vision_dir.name}/{k}" for k in vision}
    origin.update({("language", k): f"{llm_dir.name}/{k}" for k in language})
    tensors, unused = assemble(config, vision, projector, language, f"{vision_dir} + {llm_dir}", origin)
    return config, _cast(tensors, dtype), _cast(unused, dtype)


def import_llava(llava_dir, *, dtype: torch.dtype | None = None):
    """HF LlavaForConditionalGeneration dir (SigLIP + Qwen2) → (config, tensors, unused)."""
    llava_dir = Path(llava_dir)
    hf = _read_json(llava_dir / "config.json")
    source = str(llava_dir)
    if hf.get("model_type") != "llava":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not an HF LLaVA "
                              f"(expected 'llava'); LLaVA-NeXT/PIVOT training checkpoints use --llava-next")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy != "full":
        raise CheckpointError(f"{source}: vision_feature_select_strategy {strategy!r} drops the first patch "
                              f"of SigLIP (which has no CLS token); only 'full' is supported")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"{source}: vision_feature_layer {layer!r} (several layers) is not supported")
    if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias", True):
        raise CheckpointError(f"{source}: only the mlp2x_gelu projector (gelu, with biases) is supported")
    image_token = hf.get("image_token_index", hf.get("image_token_id"))
    config = ModelConfig(vision=vision_config_from_hf(hf.get("vision_config") or {}, layer, source),
                         language=language_config_from_hf(hf.get("text_config") or {}, source),
                         image_token_id=image_token)
    config.validate()
    weights = read_safetensors_dir(llava_dir)
    current = any(k.startswith("model.language_model.") for k in weights)
    prefixes = ({"model.vision_tower.": ("vision", ""), "model.multi_modal_projector.": ("projector", ""),
                 "model.language_model.": ("language", "model."), "lm_head.": ("language", "lm_head.")}
                if current else
                {"vision_tower.": ("vision", ""), "multi_modal_projector.": ("projector", ""),
                 "language_model.": ("language", "")})
    groups, origin, leftovers = _split(weights, prefixes)
    if leftovers:
        raise CheckpointError(f"{source}: unexpected tensors {sorted(leftovers)[:10]}")
    tensors, unused = assemble(config, groups["vision"], groups["projector"], groups["language"], source, origin)
    return config, _cast(tensors, dtype), _cast(unused, dtype)


def import_llava_next(ref_dir, *, vision_config: str | os.PathLike | None = None,
                      image_token_id: int | None = None, dtype: torch.dtype | None = None):
    """LLaVA-NeXT / PIVOT reference checkpoint → (config, tensors, unused).

    Its SigLIP tower deletes the encoder's last layer and feeds the projector the output of the last
    layer it keeps, so the stored layer count fixes the feature layer. The checkpoint does not say
    how many attention heads the tower has: that comes from ``vision_config`` (an HF SigLIP dir or
    config.json, or a YAML preset from examples/configs/models/).
    """
    ref_dir = Path(ref_dir)
    hf = _read_json(ref_dir / "config.json")
    source = str(ref_dir)
    if hf.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"{source}: mm_projector_type {hf.get('mm_projector_type')!r} is not supported "
                              f"(only mlp2x_gelu)")
    weights = read_safetensors_dir(ref_dir)
    for key in IGNORED_REFERENCE_TENSORS:
        if weights.pop(key, None) is not None:
            log.info("%s: not imported: %s (used only by any-res image layouts)", source, key)
    groups, origin, _ = _split(weights, {
        "model.vision_tower.vision_tower.": ("vision", ""), "model.mm_projector.0.": ("projector", "linear_1."),
        "model.mm_projector.2.": ("projector", "linear_2."), "model.mm_projector.": ("projector", ""),
        "": ("language", "")})
    if not groups["vision"]:
        raise CheckpointError(f"{source}: no model.vision_tower.vision_tower.* tensors; not a LLaVA-NeXT/PIVOT "
                              f"checkpoint with its vision tower saved")
    if vision_config is None:
        raise CheckpointError(
            f"{source}: the checkpoint names its vision tower {hf.get('mm_vision_tower')!r} but does not store "
            f"its shape; pass --vision-config (that SigLIP's HF dir or config.json, or a preset such as "
            f"examples/configs/models/siglip2-so400m-patch16-384.yaml)")
    vision = load_vision_config_file(vision_config, select_layer=-1)
    stored = {int(k.split(".")[3]) for k in groups["vision"] if k.startswith("vision_model.encoder.layers.")}
    if not stored or stored != set(range(len(stored))) or len(stored) > vision.num_hidden_layers:
        raise CheckpointError(f"{source}: vision tower layers {sorted(stored)} do not fit {vision_config} "
                              f"({vision.num_hidden_layers} layers)")
    vision.select_layer = len(stored) - vision.num_hidden_layers - 1
    config = ModelConfig(vision=vision, language=language_config_from_hf(hf | {"model_type": "qwen2"}, source),
                         image_token_id=_resolve_image_token(image_token_id, ref_dir, source))
    config.validate()
    tensors, unused = assemble(config, groups["vision"], groups["projector"], groups["language"], source, origin)
    return config, _cast(tensors, dtype), _cast(unused, dtype)


def import_hf(out, *, llava=None, llava_next=None, vision=None, llm=None, vision_config=None,
              select_layer: int = -2, image_token_id: int | None = None, seed: int = 0,
              dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ModelConfig:
    """Writes a pivot_mega checkpoint at ``out`` from exactly one kind of HF source."""
    kinds = [k for k, v in (("llava", llava), ("llava_next", llava_next), ("vision+llm", vision or llm)) if v]
    if len(kinds) != 1:
        raise CheckpointError("give exactly one source: --llava DIR, --llava-next DIR, or --vision DIR --llm DIR")
    if llava:
        config, tensors, unused = import_llava(llava, dtype=dtype)
        tokenizer_dir = llava
    elif llava_next:
        config, tensors, unused = import_llava_next(llava_next, vision_config=vision_config,
                                                    image_token_id=image_token_id, dtype=dtype)
        tokenizer_dir = llava_next
    else:
        if not (vision and llm):
            raise CheckpointError("--vision and --llm go together: a SigLIP dir and a Qwen2 dir")
        config, tensors, unused = import_vision_llm(vision, llm, select_layer=select_layer,
                                                    image_token_id=image_token_id, seed=seed, dtype=dtype)
        tokenizer_dir = llm
    write_checkpoint(out, config, tensors, unused_vision=unused, max_shard_bytes=max_shard_bytes)
    copy_tokenizer_files(tokenizer_dir, out)
    return config


# ----------------------------------------------------------------------------------------------
# export


def _hf_vision(config: ModelConfig, tensors: dict, unused: dict):
    """Our vision tensors + unused ones → (SiglipVisionModel config dict, tower-relative tensors)."""
    vision = config.vision
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("vision.layers."):
            out["encoder." + name.removeprefix("vision.")] = tensor
        elif name.startswith("vision."):
            out[name.removeprefix("vision.")] = tensor
    out.update(unused)
    num_layers = len({k.split(".")[2] for k in out if k.startswith("encoder.layers.")})
    if "post_layernorm.weight" not in out:
        # A tower trained from scratch has no post-layernorm; write an identity-initialised one so the
        # HF model is complete. The selected features never pass through it.
        dtype = tensors["vision.embeddings.patch_embedding.weight"].dtype
        out["post_layernorm.weight"] = torch.ones(vision.hidden_size, dtype=dtype)
        out["post_layernorm.bias"] = torch.zeros(vision.hidden_size, dtype=dtype)
    hf = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
          "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
          "num_hidden_layers": num_layers, "num_attention_heads": vision.num_attention_heads,
          "image_size": vision.image_size, "patch_size": vision.patch_size, "num_channels": vision.num_channels,
          "layer_norm_eps": vision.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0,
          "vision_use_head": any(k.startswith("head.") for k in out)}
    feature_layer = -(num_layers - vision.num_layers_built) - 1
    return hf, out, feature_layer


def _hf_text(language) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": language.vocab_size,
            "hidden_size": language.hidden_size, "intermediate_size": language.intermediate_size,
            "num_hidden_layers": language.num_hidden_layers, "num_attention_heads": language.num_attention_heads,
            "num_key_value_heads": language.num_key_value_heads, "rms_norm_eps": language.rms_norm_eps,
            "rope_theta": language.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": language.rope_theta},
            "max_position_embeddings": language.max_position_embeddings,
            "tie_word_embeddings": language.tie_word_embeddings, "hidden_act": "silu",
            "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0}


def _preprocessor(vision: VisionConfig) -> dict:
    # Bilinear (PIL's is antialiased), as the training loader resizes (DALI's linear filter), so models
    # are evaluated on the pixels they were trained on; SigLIP's own processors use bicubic.
    return {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "do_rescale": True,
            "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "rescale_factor": 1 / 255, "resample": 2,
            "size": {"height": vision.image_size, "width": vision.image_size}}


def _dtype_name(tensors: dict) -> str:
    return str(next(iter(tensors.values())).dtype).removeprefix("torch.")


def export_hf(ckpt, out, *, format: str = "llava", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes an HF LLaVA dir (``format='llava'``) or a SiglipVisionModel dir (``'siglip'``)."""
    config, tensors, unused = read_checkpoint(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vision_hf, vision_tensors, feature_layer = _hf_vision(config, tensors, unused)
    if format == "siglip":
        # ``vision_model.`` prefix: the layout every transformers release loads into SiglipVisionModel.
        write_safetensors_dir(out, {"vision_model." + k: v for k, v in vision_tensors.items()},
                              max_shard_bytes=max_shard_bytes)
        vision_hf["dtype"] = _dtype_name(tensors)
        (out / "config.json").write_text(json.dumps(vision_hf, indent=2) + "\n")
        (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor(config.vision), indent=2) + "\n")
        return out
    if format != "llava":
        raise CheckpointError(f"unknown export format {format!r} (llava or siglip)")
    weights = {"vision_tower." + k: v for k, v in vision_tensors.items()}
    for name, tensor in tensors.items():
        if name.startswith("projector."):
            weights["multi_modal_projector." + name.removeprefix("projector.")] = tensor
        elif name == "language.lm_head.weight":
            weights["language_model.lm_head.weight"] = tensor
        elif name.startswith("language."):
            weights["language_model.model." + name.removeprefix("language.")] = tensor
    write_safetensors_dir(out, weights, max_shard_bytes=max_shard_bytes)
    hf = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
          "image_token_index": config.image_token_id, "image_seq_length": config.num_image_tokens,
          "vision_feature_layer": feature_layer, "vision_feature_select_strategy": "full",
          "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
          "tie_word_embeddings": config.language.tie_word_embeddings, "dtype": _dtype_name(tensors),
          "vision_config": vision_hf, "text_config": _hf_text(config.language)}
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor(config.vision), indent=2) + "\n")
    if copy_tokenizer_files(ckpt, out):
        _make_processor(out, config)
    return out


LLAVA_IMAGE_TOKEN = "<image>"


def _make_processor(out: Path, config: ModelConfig) -> None:
    """Makes the export loadable with ``AutoProcessor`` as ``LlavaProcessor`` (lmms-eval's ``llava_hf``).

    LlavaProcessor expands the text ``<image>`` into ``image_seq_length`` image tokens; Qwen2.5 names
    its image token ``<|image_pad|>``, so in the exported tokenizer files that token (same id) is
    renamed ``<image>``. The processor config gives the patch size and the ``full`` feature strategy
    (every patch token, no CLS), which LlavaProcessor needs to count the tokens.
    """
    tokenizer_json = out / "tokenizer.json"
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text())
        added = data.get("added_tokens", [])
        image = next((t for t in added if t["id"] == config.image_token_id), None)
        taken = any(t["content"] == LLAVA_IMAGE_TOKEN and t["id"] != config.image_token_id for t in added)
        if image is None or taken:
            problem = ("is not one of its added tokens" if image is None
                       else f"is not {LLAVA_IMAGE_TOKEN}, which names another token")
            log.warning("export %s: the image token (id %d) %s in %s; the model loads, but AutoProcessor will not "
                        "make LlavaProcessor inputs for it (no processor_config.json written)", out,
                        config.image_token_id, problem, tokenizer_json)
            return
        old = image["content"]
        if old != LLAVA_IMAGE_TOKEN:
            image["content"] = LLAVA_IMAGE_TOKEN
            vocab = data.get("model", {}).get("vocab")
            if isinstance(vocab, dict) and old in vocab:
                vocab[LLAVA_IMAGE_TOKEN] = vocab.pop(old)
            tokenizer_json.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
            config_path = out / "tokenizer_config.json"
            if config_path.is_file():
                tok_config = json.loads(config_path.read_text())
                entry = tok_config.get("added_tokens_decoder", {}).get(str(config.image_token_id))
                if entry is not None:
                    entry["content"] = LLAVA_IMAGE_TOKEN
                for key in ("additional_special_tokens", "extra_special_tokens"):
                    value = tok_config.get(key)
                    if isinstance(value, list) and old in value:
                        tok_config[key] = [LLAVA_IMAGE_TOKEN if v == old else v for v in value]
                tok_config["image_token"] = LLAVA_IMAGE_TOKEN
                config_path.write_text(json.dumps(tok_config, ensure_ascii=False, indent=2) + "\n")
    processor = {"processor_class": "LlavaProcessor", "patch_size": config.vision.patch_size,
                 "vision_feature_select_strategy": "full", "num_additional_image_tokens": 0,
                 "image_token": LLAVA_IMAGE_TOKEN}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
