"""Shared fixtures of the evaluation tests: a tiny tokenizer, a tiny checkpoint that uses its image token."""

from pathlib import Path

import pytest

from pivot_mega.config import load_model_config
from pivot_mega.models import VisionLanguageModel
from pivot_mega.models.checkpoint_io import save_model
from tests.data.helpers import image_token_id, make_tokenizer

TINY_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "model_tiny.yaml"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def image_token(tokenizer_dir) -> int:
    return image_token_id(tokenizer_dir)


def tiny_model(image_token: int, seed: int = 0) -> VisionLanguageModel:
    """model_tiny.yaml (64 px, patch 16: 16 image tokens, 4 x 4 grid) with the tokenizer's image token."""
    config = load_model_config(TINY_CONFIG, [f"image_token_id={image_token}", "attention=sdpa"])
    return VisionLanguageModel(config).init_weights(seed).eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, image_token) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(tiny_model(image_token, seed=0), path)
    return path
