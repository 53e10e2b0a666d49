"""Test-wide settings: offline Hugging Face, few threads, and a fresh, reported seed per test."""

import os

# Before anything imports transformers / tokenizers: tests build their data in code and must never
# reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# More threads than cores makes the small matmuls of these tests slower, not faster.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SEED_ENV = "PIVOT_TEST_SEED"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """One tiny byte-level BPE tokenizer with Qwen's special tokens per session."""
    from tests.data.helpers import make_tokenizer
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def image_token(tokenizer_dir) -> int:
    """The tokenizer's ``<|image_pad|>`` id."""
    from tests.data.helpers import image_token_id
    return image_token_id(tokenizer_dir)


@pytest.fixture
def seed(request) -> int:
    """Seeds torch, numpy and random with a fresh seed (or $PIVOT_TEST_SEED) and returns it.

    A failing test's report names the seed, so ``PIVOT_TEST_SEED=<seed> pytest <test id>`` repeats it.
    """
    value = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(
                    ("seed", f"this test ran with seed {value}; repeat it with "
                             f"{SEED_ENV}={value} python -m pytest '{item.nodeid}'"))
    return report
