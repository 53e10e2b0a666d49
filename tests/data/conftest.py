"""Shared fixtures of the data tests: one tiny tokenizer per session."""

import pytest

from tests.data.helpers import image_token_id, make_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def image_token(tokenizer_dir) -> int:
    return image_token_id(tokenizer_dir)
