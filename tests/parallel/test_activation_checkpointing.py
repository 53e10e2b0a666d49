"""Activation checkpointing, applied from outside the model (``parallelize``): the same gradients and
parameter names, and a recompute in backward of exactly the blocks it is applied to."""

import pytest
import torch

from pivot_mega.parallel import apply_activation_checkpointing
from tests.hf_models import mllm_inputs, tiny_model


def test_activation_checkpointing_gives_the_same_gradients(seed):
    results = []
    for enabled in (False, True):
        model, case = tiny_model(seed)
        if enabled:
            apply_activation_checkpointing(model, every=1)
        model.train()
        ids, pixels = mllm_inputs(case, seed)
        model(ids, pixels).float().logsumexp(-1).mean().backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert list(results[0]) == list(results[1])
    for name, grad in results[0].items():
        assert torch.allclose(grad, results[1][name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("every", [1, 2])
def test_every_kth_block_runs_again_in_backward(every, seed):
    model, case = tiny_model(seed)
    blocks = {f"language.layers.{key}": int(key) for key in model.language.layers}
    blocks |= {f"vision.layers.{i}": i for i in range(len(model.vision.layers))}
    apply_activation_checkpointing(model, every)
    calls = dict.fromkeys(blocks, 0)
    for name in blocks:
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: calls.__setitem__(name, calls[name] + 1))
    ids, pixels = mllm_inputs(case, seed)
    with torch.no_grad():
        model(ids, pixels)
    assert set(calls.values()) == {1}
    model(ids, pixels).float().logsumexp(-1).mean().backward()
    assert calls == {name: 3 if index % every == 0 else 2 for name, index in blocks.items()}
