"""Pieces the command modules share: dtype names, size arguments, the line on a written model.

Below every ``*/commands.py`` and knowing none of them, so that each command module imports this and
only the entry point (``cli.py``) imports the command modules.
"""

from __future__ import annotations

# --dtype spellings → torch attribute; names only, so that parsers are built without importing torch.
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                     "fp32": "float32", "float32": "float32"}


def torch_dtype(name: str | None):
    """'bf16' → ``torch.bfloat16`` (any key of ``TORCH_DTYPE_NAMES``); None → None (keep the stored dtype)."""
    if name is None:
        return None
    import torch

    return getattr(torch, TORCH_DTYPE_NAMES[name])


def parse_size(text: str) -> int:
    """'5GB', '200MB', '64KB' or a byte count → bytes (an argparse ``type=``)."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    text = text.strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


# argparse names a type in its error ("invalid _size value: 'zz'"): kept as users have seen it.
parse_size.__name__ = "_size"


def describe_model(config, *, vision: str = "SigLIP", projector: str = "mlp2x_gelu", language: str = "Qwen2") -> str:
    """One line on a model config's towers, for the commands that write checkpoints."""
    v, lang = config.vision, config.language
    return (f"{vision} {v.hidden_size}d x {v.num_layers_built} layers (select_layer {v.select_layer}, "
            f"{config.num_image_tokens} tokens/image) -> {projector} -> {language} {lang.hidden_size}d x "
            f"{lang.num_hidden_layers} layers, vocab {lang.vocab_size}, image token {config.image_token_id}")
