"""Model stack: SigLIP vision tower, mlp2x_gelu projector, Qwen2 decoder, and the MLLM that joins them."""

from .checkpoint_files import CheckpointError
from .checkpoint_io import load_model, save_model
from .layers import AttentionBackendError, PackedSeqs, available_backends
from .mllm import ImageTokenMismatchError, VisionLanguageModel
from .projector import Projector
from .qwen2 import Qwen2LanguageModel
from .siglip import SiglipVisionTower

__all__ = [
    "AttentionBackendError", "CheckpointError", "ImageTokenMismatchError", "PackedSeqs", "Projector",
    "Qwen2LanguageModel", "SiglipVisionTower", "VisionLanguageModel", "available_backends",
    "load_model", "save_model",
]
