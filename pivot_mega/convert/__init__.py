"""Checkpoint conversion between Hugging Face formats and pivot_mega checkpoints."""

from .hf import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
