"""``parallel.compile``: compiled blocks and flex_attention keep one graph per shape family, so a
run whose shapes change from step to step does not recompile at every step (nor, past dynamo's
recompile limit, fall back to eager)."""

import pytest
import torch
import torch._dynamo

from pivot_mega.models import VisionLanguageModel, layers
from pivot_mega.parallel import ParallelConfig, build_mesh, parallelize
from tests.distributed import run_workers
from tests.parallel.test_equivalence import tiny_config


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_vision_blocks_take_any_image_count_without_recompiling(fresh_dynamo, seed):
    """A micro-batch's distinct images vary from step to step: after one batch of several images and
    one of a single image (which torch specialises), no other count compiles again."""
    config = tiny_config()
    dims = build_mesh(ParallelConfig(compile=True), config, device_type="cpu")
    with torch.device("meta"):
        model = VisionLanguageModel(config)
    vision = parallelize(model, dims, seed=seed, device="cpu").modules[0].vision
    size = config.vision.image_size

    def step(images: int) -> None:
        vision(torch.randn(images, 3, size, size)).square().mean().backward()

    step(3)
    step(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for images in (2, 5, 4):
            step(images)


@pytest.mark.slow
def test_compiled_flex_attention_takes_new_lengths_without_recompiling(fresh_dynamo):
    """The first new length recompiles into a kernel for any length; later ones reuse it."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def attend(length: int) -> torch.Tensor:
        q, k, v = (torch.randn(1, 2, length, 16) for _ in range(3))
        mask = create_block_mask(causal, 1, None, length, length, device="cpu")
        return layers._compiled_flex()(q, k, v, block_mask=mask)

    attend(128)
    attend(256)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for length in (384, 512):
            assert attend(length).shape == (1, 2, length, 16)


def _tensor_parallel_vision_worker(rank, world_size, seed):
    config = tiny_config()
    dims = build_mesh(ParallelConfig(tensor_model_parallel_size=world_size, compile=True), config, device_type="cpu")
    with torch.device("meta"):
        model = VisionLanguageModel(config)
    vision = parallelize(model, dims, seed=seed, device="cpu").modules[0].vision
    size = config.vision.image_size
    for images in (3, 1, 2, 5):
        with torch._dynamo.config.patch(error_on_recompile=images == 5):
            vision(torch.randn(images, 3, size, size)).square().mean().backward()
    return True


@pytest.mark.slow
@pytest.mark.multiproc
def test_tensor_parallel_vision_blocks_compile_for_any_image_count(seed):
    """Only the image count is dynamic: symbolic patch and hidden sizes (``dynamic=True``) do not trace
    through the column/row-parallel DTensors."""
    assert run_workers(_tensor_parallel_vision_worker, 2, seed) == [True, True]
