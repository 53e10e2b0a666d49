"""The Triton kernels, run in Triton's CPU interpreter (a separate process, see conftest.py), against
fp64. Tile sizes in the interpreter are 16, so these small shapes cross tile, chunk and vocabulary
split boundaries: V not a multiple of 16, token and vocab chunks not multiples of the tiles.
Tolerances: ``tests/kernels/reference.py::tolerances``.
"""

import pytest
import torch

from tests.kernels.reference import Result, assert_close, make_case, run

# (N, H, V, token_chunk, vocab_chunk)
SHAPES = [(1, 8, 10, 4, 4), (37, 24, 101, 20, 48), (20, 40, 70, 32, 16), (16, 16, 32, 16, 32)]


def _run_triton(pool, case, **kwargs) -> Result:
    from tests.kernels.reference import run_triton

    return Result(**pool.submit(run_triton, case, kwargs).result(timeout=300))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}-t{}-v{}".format(*s))
def test_triton_matches_fp64(triton_interpreter, shape, dtype, seed):
    num_tokens, hidden_size, vocab, token_chunk, vocab_chunk = shape
    case = make_case(seed, num_tokens, hidden_size, vocab, dtype)
    assert_close(_run_triton(triton_interpreter, case, token_chunk=token_chunk, vocab_chunk=vocab_chunk), case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_logits_up_to_1e4(triton_interpreter, dtype, seed):
    case = make_case(seed, 24, 32, 90, dtype, max_logit=1e4)
    got = _run_triton(triton_interpreter, case, token_chunk=16, vocab_chunk=48)
    assert torch.isfinite(got.logprob).all() and torch.isfinite(got.grad_weight).all()
    assert_close(got, case)


def test_triton_equals_chunked(triton_interpreter, seed):
    # Same fp32 maths in a different order: far closer to each other than to any tolerance above.
    case = make_case(seed, 30, 48, 77)
    triton = _run_triton(triton_interpreter, case, token_chunk=12, vocab_chunk=40)
    chunked = run(case, impl="chunked", token_chunk=12, vocab_chunk=40)
    assert (triton.logprob - chunked.logprob).abs().max() <= 1e-5
    assert (triton.grad_hidden - chunked.grad_hidden).abs().max() <= 1e-5 * chunked.grad_hidden.abs().max()
    assert (triton.grad_weight - chunked.grad_weight).abs().max() <= 1e-5 * chunked.grad_weight.abs().max()
    assert triton.num_correct == chunked.num_correct
