"""Packing: rows within capacity, every unit once, pairs adjacent, steps balanced, layout = PackedSeqs."""

import numpy as np
import pytest
import torch

from pivot_mega.data.packing import build_micro_batch, pack_rows, plan_window
from pivot_mega.data.templates import IGNORE_INDEX, Sequence, Unit
from pivot_mega.batch import PackedSeqs


def test_pack_rows_places_every_item_once_within_capacity(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        capacity = int(rng.integers(8, 400))
        lengths = [int(n) for n in rng.integers(1, capacity + 1, int(rng.integers(1, 300)))]
        rows = pack_rows(lengths, capacity)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        # Best-fit decreasing uses at most 11/9 OPT + 6/9 rows, and OPT >= ceil(total / capacity).
        assert len(rows) <= 11 / 9 * -(-sum(lengths) // capacity) + 6 / 9
    with pytest.raises(ValueError, match="item 1 has length 9, outside"):
        pack_rows([3, 9], 8)


def test_pack_rows_fills_exact_partitions():
    # Items that tile rows exactly must come out with no padding at all.
    assert sorted(map(sorted, pack_rows([5, 3, 2, 7, 1, 2, 4], 8))) == [[0, 1], [2, 5, 6], [3, 4]]


def _realistic_lengths(rng, n, capacity):
    # LLaVA-like: 576 image tokens plus log-normal text, some text-only samples.
    text = rng.lognormal(4.5, 1.0, n).astype(int) + 20
    return [int(min(capacity, t + (576 if rng.random() < 0.9 else 0))) for t in text]


def test_plan_window_emits_whole_steps_and_carries_the_rest(seed):
    rng = np.random.default_rng(seed)
    for _ in range(30):
        world, rows_per_mb, capacity = int(rng.integers(1, 5)), int(rng.integers(1, 4)), 2048
        lengths = _realistic_lengths(rng, int(rng.integers(1, 120)), capacity)
        for final in (False, True):
            plan = plan_window(lengths, capacity, rows_per_mb, world, final, np.random.default_rng(0))
            emitted = [i for step in plan.steps for mb in step for row in mb for i in row]
            assert sorted(emitted + plan.carry) == list(range(len(lengths)))
            assert all(len(step) == world and all(len(mb) == rows_per_mb for mb in step) for step in plan.steps)
            assert all(sum(lengths[i] for i in row) <= capacity for step in plan.steps for mb in step for row in mb)
            if final:
                assert plan.carry == []
            else:  # what waits never fills a whole step on its own
                assert len(pack_rows([lengths[i] for i in plan.carry], capacity)) < world * rows_per_mb


def test_steps_are_balanced_in_tokens_across_ranks(seed):
    rng = np.random.default_rng(seed)
    spread, naive_spread = [], []
    for _ in range(40):
        world, rows_per_mb, capacity = int(rng.integers(2, 9)), int(rng.integers(1, 4)), 2048
        lengths = _realistic_lengths(rng, int(rng.integers(200, 600)), capacity)
        plan = plan_window(lengths, capacity, rows_per_mb, world, False, np.random.default_rng(1))
        for step in plan.steps:
            tokens = [sum(lengths[i] for row in mb for i in row) for mb in step]
            spread.append((max(tokens) - min(tokens)) / (rows_per_mb * capacity))
        # Baseline: the same rows dealt to ranks in packing order.
        rows = pack_rows(lengths, capacity)
        group = world * rows_per_mb
        for s in range(len(rows) // group):
            tokens = [sum(lengths[i] for row in rows[s * group + r::world][:rows_per_mb] for i in row)
                      for r in range(world)]
            naive_spread.append((max(tokens) - min(tokens)) / (rows_per_mb * capacity))
    assert np.mean(spread) < 0.02, np.mean(spread)
    assert np.mean(spread) < np.mean(naive_spread) / 3, (np.mean(spread), np.mean(naive_spread))


def _unit(rng, index, pair, image_token):
    def sequence(n, images):
        ids = rng.integers(10, 99, n)
        labels = np.where(rng.random(n) < 0.5, ids, IGNORE_INDEX)
        ids[1:1 + 4 * images] = image_token
        labels[1:1 + 4 * images] = IGNORE_INDEX
        labels[0] = IGNORE_INDEX  # as every template renders: nothing before a first token predicts it
        return Sequence(ids.astype(np.int64), labels.astype(np.int64), images)

    images = int(rng.integers(0, 3))
    count = 2 if pair else 1
    sequences = [sequence(int(rng.integers(4 * images + 2, 40)), images) for _ in range(count)]
    return Unit(index, f"s{index}", sequences, [f"{k}.jpg" for k in range(images)])


def test_micro_batch_layout_matches_packed_seqs(seed):
    rng = np.random.default_rng(seed)
    units = [_unit(rng, i, pair=bool(rng.random() < 0.5), image_token=7) for i in range(12)]
    seq_len = 120
    rows = [[units[i] for i in row] for row in pack_rows([u.length for u in units], seq_len)]
    rows.append([])  # an empty padding row, as the last step of an epoch may have
    batch = build_micro_batch(rows, seq_len, pad_token_id=0)

    segments = [len(s) for row in rows for u in row for s in u.sequences]
    per_row = []
    for row in rows:
        lengths = [len(s) for u in row for s in u.sequences]
        per_row.append(lengths + ([seq_len - sum(lengths)] if sum(lengths) < seq_len else []))
    reference = PackedSeqs.from_lengths(per_row)
    assert torch.equal(batch.packed.cu_seqlens, reference.cu_seqlens)
    assert batch.packed.cu_seqlens.dtype == torch.int32 and batch.packed.max_seqlen == reference.max_seqlen
    assert torch.equal(batch.packed.position_ids, reference.position_ids)
    assert torch.equal(batch.packed.segment_ids, reference.segment_ids)
    assert batch.num_tokens == sum(segments) and batch.num_padding_tokens == len(rows) * seq_len - sum(segments)

    flat_ids, flat_labels = batch.input_ids.flatten(), batch.labels.flatten()
    cu = batch.packed.cu_seqlens.tolist()
    k = 0
    for row in rows:
        for u in row:
            for s in u.sequences:
                assert torch.equal(flat_ids[cu[k]:cu[k + 1]], torch.from_numpy(s.input_ids))
                assert torch.equal(flat_labels[cu[k]:cu[k + 1]], torch.from_numpy(s.labels))
                assert batch.segment_sample[k] == u.index
                k += 1
        if sum(u.length for u in row) < seq_len:
            assert batch.segment_sample[k] == -1 and (flat_labels[cu[k]:cu[k + 1]] == IGNORE_INDEX).all()
            k += 1
    assert k == len(batch.segment_sample)

    # Pairs: chosen then rejected, adjacent segments of the same row.
    pairs = [u for row in rows for u in row if u.is_pair]
    assert len(batch.pair_segments) == len(pairs)
    for (chosen, rejected), u in zip(batch.pair_segments.tolist(), pairs):
        assert rejected == chosen + 1 and batch.segment_sample[chosen] == batch.segment_sample[rejected] == u.index
        assert cu[chosen] // seq_len == (cu[rejected + 1] - 1) // seq_len
    # Images in reading order: a pair's images once per sequence.
    expected = [(u.index, m) for row in rows for u in row for s in u.sequences for m in u.image_members]
    assert batch.image_refs == expected
    assert int((batch.input_ids == 7).sum()) == 4 * len(expected)
