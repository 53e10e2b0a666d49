"""The batch contract: packed layouts, next-token targets, micro-batches moved and blanked."""

import pytest
import torch

from pivot_mega.batch import IGNORE_INDEX, PackedSeqs, Targets


def test_targets_never_cross_segments():
    labels = torch.tensor([[-100, 5, 6, -100, 7, 8], [-100, -100, -100, 4, -100, -100]])
    packed = PackedSeqs.from_cu_seqlens(torch.tensor([0, 3, 6, 8, 12], dtype=torch.int32), 2, 6)
    targets = Targets.next_tokens(labels, packed).dense((2, 6))
    # Positions predict the next token's label; 3, 6 and 8 start segments and are never targets.
    assert targets.flatten().tolist() == [5, 6, -100, 7, 8, -100, -100, -100, 4, -100, -100, -100]
    with pytest.raises(ValueError, match="a segment's first token carries a label"):
        Targets.next_tokens(torch.tensor([[-100, 5, 6, 9, 7, 8]]), PackedSeqs.from_lengths([[3, 3]]))


def test_targets_round_trip_and_keep_their_sequences(seed):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randint(0, 50, (3, 10), generator=gen)
    dense[torch.rand(3, 10, generator=gen) < 0.4] = IGNORE_INDEX
    sequence = torch.randint(0, 4, (3, 10), generator=gen)
    targets = Targets.from_dense(dense, sequence, num_sequences=4)
    assert torch.equal(targets.dense((3, 10)), dense)
    keep = dense.flatten() != IGNORE_INDEX
    assert torch.equal(targets.tokens, dense.flatten()[keep]) and torch.equal(targets.sequence, sequence.flatten()[keep])
    assert targets.positions.tolist() == sorted(targets.positions.tolist())  # row-major order
