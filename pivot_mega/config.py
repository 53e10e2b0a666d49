"""Typed configuration: dataclasses filled from YAML, with ``--set a.b=c`` overrides.

Unknown keys are errors (a typo must never silently fall back to a default). A section given as a
string is a path to a YAML file holding that section, resolved relative to the file that names it,
so model presets in ``examples/configs/models/`` compose into run configs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key and the file."""


@dataclasses.dataclass
class VisionConfig:
    """SigLIP vision tower (``SiglipVisionModel``) shape; names follow the HF config."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    # Which hidden state feeds the projector, in HF ``hidden_states`` indexing: 0 = patch embeddings,
    # k = output of layer k, -1 = output of the last layer, -2 = penultimate (PIVOT, LLaVA).
    # Layers after the selected one are never built.
    select_layer: int = -2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_layers_built(self) -> int:
        if self.select_layer < 0:
            return self.num_hidden_layers + 1 + self.select_layer
        return self.select_layer

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, where: str = "vision") -> None:
        _require_positive(self, where, "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "image_size", "patch_size", "num_channels")
        _require(self.hidden_size % self.num_attention_heads == 0, where,
                 f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                 f"{self.num_attention_heads}")
        _require(self.image_size % self.patch_size == 0, where,
                 f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _require(-self.num_hidden_layers - 1 <= self.select_layer <= self.num_hidden_layers, where,
                 f"select_layer {self.select_layer} is outside [-{self.num_hidden_layers + 1}, "
                 f"{self.num_hidden_layers}] for num_hidden_layers {self.num_hidden_layers}")


@dataclasses.dataclass
class ProjectorConfig:
    """Vision → language projector. ``mlp2x_gelu``: Linear → GELU (erf) → Linear, with biases."""

    type: Literal["mlp2x_gelu"] = "mlp2x_gelu"


@dataclasses.dataclass
class LanguageConfig:
    """Qwen2 / Qwen2.5 decoder shape; names follow the HF ``Qwen2Config``."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, where: str = "language") -> None:
        _require_positive(self, where, "vocab_size", "hidden_size", "intermediate_size",
                          "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                          "max_position_embeddings")
        _require(self.hidden_size % self.num_attention_heads == 0, where,
                 f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                 f"{self.num_attention_heads}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, where,
                 f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                 f"num_key_value_heads {self.num_key_value_heads}")
        _require(self.head_dim % 2 == 0, where, f"head_dim {self.head_dim} must be even for RoPE")


AttentionBackend = Literal["auto", "sdpa", "varlen", "flex", "flash_attn", "te"]


@dataclasses.dataclass
class ModelConfig:
    """The whole MLLM: structure (vision, projector, language, image token) plus run-time choices."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
    language: LanguageConfig = dataclasses.field(default_factory=LanguageConfig)
    # Token id that marks image positions in input_ids; Qwen2.5's ``<|image_pad|>`` by default.
    image_token_id: int = 151655
    attention: AttentionBackend = "auto"
    # Recompute each block's activations in backward; ``checkpoint_every: k`` does every k-th block.
    activation_checkpointing: bool = False
    checkpoint_every: int = 1

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def validate(self) -> "ModelConfig":
        self.vision.validate("model.vision")
        self.language.validate("model.language")
        _require(0 <= self.image_token_id < self.language.vocab_size, "model.image_token_id",
                 f"{self.image_token_id} is not a token id of a vocabulary of {self.language.vocab_size}")
        _require(self.checkpoint_every >= 1, "model.checkpoint_every",
                 f"must be >= 1, got {self.checkpoint_every}")
        return self


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def _require_positive(config: Any, where: str, *names: str) -> None:
    # Checked first so that a zero head count is a ConfigError, not a ZeroDivisionError later.
    for name in names:
        value = getattr(config, name)
        _require(value > 0, f"{where}.{name}", f"must be > 0, got {value}")


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


class _PresetSection(dict):
    """A section read from a preset file; keeps the file's path for relative paths and errors."""

    def __init__(self, data: dict, path: Path):
        super().__init__(data)
        self.path = path


def _preset_path(data: str | os.PathLike, base_dir: Path | None) -> Path:
    path = Path(data)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def from_dict(cls: type, data: Any, *, where: str = "", base_dir: Path | None = None) -> Any:
    """Builds dataclass ``cls`` from ``data`` with type checks; unknown keys raise ConfigError."""
    if isinstance(data, (str, os.PathLike)) and dataclasses.is_dataclass(cls):
        path = _preset_path(data, base_dir)
        return from_dict(cls, load_yaml(path), where=f"{where} ({path})", base_dir=path.parent)
    if isinstance(data, _PresetSection):
        where, base_dir = f"{where} ({data.path})", data.path.parent
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        values[name] = _coerce(hints[name], value, key, base_dir)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, base_dir: Path | None) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where=key, base_dir=base_dir)
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def inline_presets(cls: type, data: Any, base_dir: Path | None = None) -> Any:
    """Replaces sections of ``cls`` given as preset paths by the presets' contents, recursively.

    Overrides can then reach into a preset (``language.num_hidden_layers=3`` with
    ``language: models/qwen2.5-1.5b.yaml``); ``from_dict`` still reports the preset's file in errors.
    """
    if isinstance(data, (str, os.PathLike)):
        path = _preset_path(data, base_dir)
        loaded = load_yaml(path)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a {cls.__name__} section must be a mapping, "
                              f"got {type(loaded).__name__}")
        data = _PresetSection(loaded, path)
    if isinstance(data, _PresetSection):
        base_dir = data.path.parent
    if not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if name in hints and dataclasses.is_dataclass(hints[name]):
            data[name] = inline_presets(hints[name], value, base_dir)
    return data


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-6`` as a float (YAML 1.2); PyYAML's 1.1 rules want ``1.0e-6``
    and would hand a typed field the string ``"1e-6"``."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.load(f, Loader=_YamlLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return {} if data is None else data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies ``a.b=c`` overrides (values parsed as YAML scalars) to a nested dict, in place."""
    if not isinstance(data, dict):
        raise ConfigError(f"--set {list(overrides)}: the config is not a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a section")
        try:
            node[keys[-1]] = parse_yaml(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from e
    return data


def load_model_config(path: str | os.PathLike, overrides: list[str] = ()) -> ModelConfig:
    """Reads a model config YAML (sections may name preset files) and validates it."""
    path = Path(path)
    data = load_yaml(path)
    # Presets are inlined before each override, so an override may also swap a whole section for
    # another preset file and then set a key inside it.
    for item in overrides:
        apply_overrides(inline_presets(ModelConfig, data, path.parent), [item])
    return from_dict(ModelConfig, data, where=str(path), base_dir=path.parent).validate()
