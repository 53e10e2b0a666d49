"""Shared helpers of the evaluation tests: a tiny checkpoint that uses the session tokenizer's image token
(``tokenizer_dir`` and ``image_token`` come from tests/conftest.py)."""

from pathlib import Path

import pytest

from pivot_mega.config import load_model_config
from pivot_mega.models import VisionLanguageModel
from pivot_mega.models.checkpoint_io import save_model
from pivot_mega.presets import model_preset_path

TINY_CONFIG = model_preset_path("tiny")


def tiny_model(image_token: int, seed: int = 0) -> VisionLanguageModel:
    """model_tiny.yaml (64 px, patch 16: 16 image tokens, 4 x 4 grid) with the tokenizer's image token."""
    config = load_model_config(TINY_CONFIG, [f"image_token_id={image_token}", "attention=sdpa"])
    return VisionLanguageModel(config).init_weights(seed).eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, image_token) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(tiny_model(image_token, seed=0), path)
    return path
