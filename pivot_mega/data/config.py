"""Typed data config: which shards, how text is rendered and packed, how images are decoded.

The loader takes the two facts it needs about the model (image size, image-token count and id) as
arguments, so this section stands alone: ``data:`` in a run config, read with ``load_data_config``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, apply_overrides, from_dict, load_yaml

TemplateName = Literal["plain", "qwen2"]
DataMode = Literal["lm", "dpo"]
ImageBackend = Literal["auto", "dali", "python"]
DecodeDevice = Literal["cpu", "mixed"]
DPOLayout = Literal["shared_prefix", "separate"]


@dataclasses.dataclass
class DataConfig:
    """Where the samples come from and how they become packed micro-batches."""

    # Directory written by ``pivot-mega data build-shards`` (holds manifest.json).
    shards: str = ""
    # Any Hugging Face tokenizer directory (Qwen2.5's in real runs).
    tokenizer: str = ""
    # ``plain``: image tokens then the caption (stage 1a); ``qwen2``: ChatML with a system prompt.
    template: TemplateName = "qwen2"
    system_prompt: str = "You are a helpful assistant."
    # ``lm``: one sequence per sample, loss on assistant replies (stages 1a, 1b, SFT; a preference
    # pair contributes its chosen answer). ``dpo``: chosen and rejected sequences of each pair.
    mode: DataMode = "lm"
    # How a DPO pair is laid out in its row. ``shared_prefix``: ``prefix | chosen | rejected``, the
    # template, image tokens and prompt once, each response attending to them and to itself (the
    # language model reads the prefix once). ``separate``: ``prefix + chosen | prefix + rejected``.
    # Both give the same log-probs; attention backends that take one cu_seqlens for queries and keys
    # (flash_attn, varlen, te) need ``separate``.
    dpo_layout: DPOLayout = "shared_prefix"
    # Tokens per packed row. A sample (or a whole DPO pair) must fit in one row: for DPO a row holds
    # the prompt once and both responses (shared_prefix), or both whole sequences (separate).
    max_seq_len: int = 2048
    # Rows per micro-batch: micro-batches are ``[micro_batch_rows, max_seq_len]``.
    micro_batch_rows: int = 1
    # Samples tokenized and packed together; larger windows pack tighter.
    window_size: int = 1024
    # A sample longer than a row is skipped and counted; with true its response is cut instead
    # (never the prompt or an image).
    truncate_response: bool = False
    shuffle: bool = True
    seed: int = 0
    # Image decoding: ``auto`` takes DALI when it is installed, else the python (PIL) backend.
    backend: ImageBackend = "auto"
    # DALI only: ``mixed`` decodes JPEGs on the GPU (nvJPEG); ``cpu`` decodes on the host.
    decode_device: DecodeDevice = "cpu"
    # Decoding threads per rank.
    num_threads: int = 4
    # Micro-batches prepared ahead by a background thread (0: prepare on demand).
    prefetch: int = 2
    # A run stops when more than this fraction of the samples read so far were skipped, counted
    # after at least 100 samples read (the trainer checks the loader's counters).
    max_skipped_fraction: float = 0.01

    def validate(self, where: str = "data") -> "DataConfig":
        for name in ("max_seq_len", "micro_batch_rows", "window_size", "num_threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name}: must be > 0, got {getattr(self, name)}")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ConfigError(f"{where}.max_skipped_fraction: must be in [0, 1], got {self.max_skipped_fraction}")
        if self.prefetch < 0:
            raise ConfigError(f"{where}.prefetch: must be >= 0, got {self.prefetch}")
        if not self.shards:
            raise ConfigError(f"{where}.shards: name the directory written by `pivot-mega data build-shards`")
        if not self.tokenizer:
            raise ConfigError(f"{where}.tokenizer: name a Hugging Face tokenizer directory")
        if self.mode == "dpo" and self.template == "plain":
            raise ConfigError(f"{where}.template: 'plain' renders captions; DPO pairs need 'qwen2'")
        if self.decode_device == "mixed" and self.backend == "python":
            raise ConfigError(f"{where}.decode_device: 'mixed' (GPU decoding) needs backend 'dali' or 'auto'")
        return self


def load_data_config(source: str | os.PathLike | dict[str, Any], overrides: list[str] = (),
                     where: str = "data") -> DataConfig:
    """A validated DataConfig from a YAML file or a mapping, with ``key=value`` overrides.

    Relative ``shards`` and ``tokenizer`` paths in a file are taken relative to that file.
    """
    base_dir = None
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        data, base_dir, where = load_yaml(path), path.parent, f"{where} ({path})"
    apply_overrides(data, list(overrides))
    config = from_dict(DataConfig, data, where=where)
    if base_dir is not None:
        for name in ("shards", "tokenizer"):
            value = getattr(config, name)
            if value and not Path(value).is_absolute():
                setattr(config, name, str(base_dir / value))
    return config.validate(where)
