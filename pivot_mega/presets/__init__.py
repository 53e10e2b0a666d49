"""Model presets shipped inside the package: ``model_*.yaml`` here, their tower sections in ``models/``.

Package data, so a wheel, an editable install and the repository find them the same way
(``importlib.resources``). No torch here: the CLI lists the names in ``--help``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# Name (``pivot-mega bench --preset NAME``) → model config file in this folder.
MODEL_PRESETS = {
    "tiny": "model_tiny.yaml",
    "small": "model_small.yaml",
    "pivot-1.5b": "model_pivot_so400m_qwen2.5_1.5b.yaml",
    "pivot-7b": "model_pivot_so400m_qwen2.5_7b.yaml",
}


def presets_dir() -> Path:
    """The folder holding the preset YAML files."""
    root = resources.files(__name__)
    # The presets name their tower files by relative path, so they must be real files on disk.
    if not isinstance(root, Path):
        raise FileNotFoundError(f"pivot_mega presets: {root} is not a folder on disk (a zipped install?); "
                                f"install pivot_mega as a regular package")
    return root


def model_preset_path(name: str) -> Path:
    """The model config file of preset ``name`` (one of :data:`MODEL_PRESETS`)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"model preset {name!r}: not one of {', '.join(MODEL_PRESETS)}")
    return presets_dir() / MODEL_PRESETS[name]
