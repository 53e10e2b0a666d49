"""Shared-prefix DPO gives the separate layout's numbers: log-probs, every DPO loss, gradients of every tower.

The same random pairs (responses of different lengths, a one-token response) and LM samples, packed
into rows both ways: ``prefix + chosen | prefix + rejected`` and ``prefix | chosen | rejected``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pivot_mega.batch import IGNORE_INDEX
from pivot_mega.data.packing import build_micro_batch
from pivot_mega.data.templates import Sequence, Unit, pair_unit
from pivot_mega.models.layers import available_backends
from pivot_mega.parallel import token_logprobs
from pivot_mega.training.losses import DPOConfig, dpo_loss, sequence_logprob_sums
from tests.hf_models import tiny_model

SEQ_LEN = 160


def _rows(case, rng, shared_prefix: bool, response_lengths=((9, 4), (1, 12), (6, 6))):
    """Two rows: pairs with an image each and an LM sample between them; → (rows, images [U, 3, H, W])."""
    vocab, t = case.vocab, case.image_tokens

    def tokens(n):
        return [int(x) for x in rng.integers(0, case.image_token_id, n)]

    units, index = [], 0
    for chosen_len, rejected_len in response_lengths:
        prompt = tokens(3) + [case.image_token_id] * t + tokens(int(rng.integers(2, 7)))
        chosen, rejected = tokens(chosen_len), tokens(rejected_len)
        units.append(pair_unit(index, f"pair-{index}", (prompt, [IGNORE_INDEX] * len(prompt), 1),
                               (chosen, chosen), (rejected, rejected), ["jpg"], shared_prefix=shared_prefix))
        index += 1
        if index == 1:  # an LM sample (no image) between the first and second pair
            ids = tokens(14)
            labels = [IGNORE_INDEX] * 5 + ids[5:]
            units.append(Unit(index, f"lm-{index}", [Sequence(np.array(ids), np.array(labels), 0)], []))
            index += 1
    assert vocab > case.image_token_id
    return [units[:2], units[2:]]


def _batch(case, seed, shared_prefix: bool, dtype=torch.float32, **kwargs):
    rng = np.random.default_rng(seed)  # the same draws for both layouts
    batch = build_micro_batch(_rows(case, rng, shared_prefix, **kwargs), SEQ_LEN, pad_token_id=0)
    distinct = list(dict.fromkeys(batch.image_refs))
    gen = torch.Generator().manual_seed(seed)
    pixels = {ref: torch.randn(3, case.image_size, case.image_size, generator=gen) for ref in sorted(distinct)}
    batch.images = torch.stack([pixels[ref] for ref in distinct]).to(dtype)
    batch.image_index = torch.tensor([distinct.index(ref) for ref in batch.image_refs])
    return batch


def _forward(model, batch):
    """→ (per-sequence log-prob sums [N], token counts [N]) with grad."""
    hidden = model(batch.input_ids, batch.images, packed=batch.packed, image_index=batch.image_index,
                   return_hidden=True)
    logprobs = token_logprobs(hidden, model.language.head_weight, batch.targets)
    return sequence_logprob_sums(logprobs, batch.targets.sequence, batch.targets.num_sequences)


def _pairs(batch) -> tuple[torch.Tensor, torch.Tensor]:
    sequence = batch.segment_sequence
    return sequence[batch.pair_segments[:, 0]], sequence[batch.pair_segments[:, 1]]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "mpo"])
def test_shared_prefix_equals_separate(loss_type, seed):
    model, case = tiny_model(seed, attention_backend="sdpa")
    results = {}
    for shared in (False, True):
        batch = _batch(case, seed, shared)
        model.zero_grad(set_to_none=True)
        sums, counts = _forward(model, batch)
        chosen, rejected = _pairs(batch)
        reference = sums.detach() + torch.linspace(-0.5, 0.5, len(sums))  # any constants, the same both ways
        losses, _ = dpo_loss(sums[chosen], sums[rejected], reference[chosen], reference[rejected], counts[chosen],
                             counts[rejected], DPOConfig(loss_type=loss_type, beta=0.3))
        (losses.sum() + 0.1 * -sums[2]).backward()  # and the LM sample's NLL
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[shared] = (sums.detach(), counts, losses.detach(), grads, batch)
    (s_sums, s_counts, s_losses, s_grads, s_batch), (t_sums, t_counts, t_losses, t_grads, t_batch) = \
        results[False], results[True]
    assert t_batch.num_tokens < s_batch.num_tokens  # the prompts once
    assert torch.equal(s_counts, t_counts) and len(t_counts) == 7  # 3 pairs + 1 LM sample
    assert torch.allclose(t_sums, s_sums, rtol=1e-5, atol=0)
    assert torch.allclose(t_losses, s_losses, rtol=1e-5, atol=1e-7)
    # Relative to each tensor's largest gradient; key biases, whose gradient is 0 in exact arithmetic (softmax
    # ignores a constant shift), are rounding noise: for them the floor is 1e-6 of the model's largest gradient.
    floor = 1e-6 * max(g.abs().max() for g in s_grads.values())
    for name, grad in s_grads.items():
        assert (t_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max() + floor, name  # vision, projector, LM


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_every_cpu_backend_gives_the_separate_log_probs(backend, seed):
    # flex_attention runs forward only on the CPU (its backward is CUDA's): a forward check here.
    model, case = tiny_model(seed, attention_backend=backend)
    with torch.no_grad():
        separate, _ = _forward(model, _batch(case, seed, False))
        shared, _ = _forward(model, _batch(case, seed, True))
    assert torch.allclose(shared, separate, rtol=1e-5, atol=0)


def test_shared_prefix_equals_separate_in_fp64(seed):
    model, case = tiny_model(seed)
    model = model.double()
    out = []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        sums, _ = _forward(model, _batch(case, seed, shared, dtype=torch.float64))
        sums.sum().backward()
        out.append((sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (s_sums, s_grads), (t_sums, t_grads) = out
    assert ((t_sums - s_sums).abs() / s_sums.abs()).max() <= 1e-10
    floor = 1e-12 * max(g.abs().max() for g in s_grads.values())
    for name, grad in s_grads.items():
        assert (t_grads[name] - grad).abs().max() <= 1e-10 * grad.abs().max() + floor, name


def test_a_branch_never_sees_its_sibling(seed):
    """Changing the chosen responses' tokens moves their log-probs, never the rejected ones'."""
    model, case = tiny_model(seed)
    batch = _batch(case, seed, shared_prefix=True)
    with torch.no_grad():
        before, _ = _forward(model, batch)
        chosen, rejected = _pairs(batch)
        ids = batch.input_ids.clone().view(-1)
        for segment in batch.pair_segments[:, 0].tolist():
            start, end = batch.packed.cu_seqlens[segment:segment + 2].tolist()
            ids[start:end] = (ids[start:end] + 1) % case.image_token_id
        batch.input_ids = ids.view(batch.input_ids.shape)
        after, _ = _forward(model, batch)
    assert torch.equal(after[rejected], before[rejected])
    assert not torch.allclose(after[chosen], before[chosen])


def test_the_last_prefix_position_predicts_both_first_tokens(seed):
    _, case = tiny_model(seed)
    batch = _batch(case, seed, shared_prefix=True)
    cu, targets = batch.packed.cu_seqlens.tolist(), batch.targets
    for chosen, rejected in batch.pair_segments.tolist():
        last = cu[chosen] - 1  # the prefix (segment chosen - 1) ends just before the chosen branch
        at = targets.positions == last
        assert targets.tokens[at].tolist() == [int(batch.input_ids.view(-1)[cu[chosen]]),
                                               int(batch.input_ids.view(-1)[cu[rejected]])]
        assert targets.sequence[at].tolist() == [int(batch.segment_sequence[chosen]),
                                                 int(batch.segment_sequence[rejected])]
    # the aligned labels seen from the token side are the same as the separate layout's, branch by branch
    assert torch.equal(batch.labels.view(-1)[cu[batch.pair_segments[0, 1]]],
                       batch.input_ids.view(-1)[cu[batch.pair_segments[0, 1]]])
