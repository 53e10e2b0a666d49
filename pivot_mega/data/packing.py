"""Packing: units (a sequence, or a DPO pair) into rows, rows into micro-batches balanced across ranks.

A window of units is packed by best-fit decreasing into rows of ``max_seq_len`` tokens. A DPO pair is
one unit, so its chosen and rejected sequences sit side by side in one row (same micro-batch,
adjacent segments). Only whole groups of ``world_size * rows_per_micro_batch`` rows leave a window
(the fullest rows); the units of the other rows wait for the next window, where they pack with new
units, and the last window of an epoch pads its group with empty rows. Rows of a group are spread
over the ranks' micro-batches largest first, each to the micro-batch with the fewest tokens so far,
so the ranks of a step get about the same number of tokens.

A micro-batch (``batch.MicroBatch``) is ``[R, S]`` with every segment (sample sequence or row
padding) in its packed layout, made here once: cu_seqlens over the flattened ``R * S`` tokens (every
row boundary a segment boundary), positions restarting at 0 in each segment, next-token targets.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq

import numpy as np
import torch

from ..batch import IGNORE_INDEX, MicroBatch, PackedSeqs, Targets
from .templates import Unit


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: item positions per row, each row's total <= capacity.

    Longest items first, each into the row whose free space fits it most tightly; ties go to the
    earlier row, and equal lengths keep their input order, so the result is deterministic.
    """
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"item {i} has length {n}, outside (0, {capacity}]")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free tokens, row number)
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot < len(free):
            space, row = free.pop(slot)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], row))
    return rows


@dataclasses.dataclass
class WindowPlan:
    """steps[s][rank] = rows of that rank's micro-batch, each row a list of unit positions
    (``[]`` for an empty padding row); ``carry`` = unit positions left for the next window."""

    steps: list[list[list[list[int]]]]
    carry: list[int]


def plan_window(lengths: list[int], capacity: int, rows_per_micro_batch: int, world_size: int,
                final: bool, rng: np.random.Generator) -> WindowPlan:
    """Packs one window of units and splits the rows into steps of ``world_size`` micro-batches."""
    rows = pack_rows(lengths, capacity)
    fill = [sum(lengths[i] for i in row) for row in rows]
    by_fill = sorted(range(len(rows)), key=lambda r: (-fill[r], r))
    group = world_size * rows_per_micro_batch
    num_steps = -(-len(rows) // group) if final else len(rows) // group
    emitted = by_fill[:num_steps * group]
    carry = sorted(i for r in by_fill[num_steps * group:] for i in rows[r])
    if not num_steps:
        return WindowPlan([], carry)

    # Longest-processing-time assignment: each row (largest first) to the open micro-batch with the
    # fewest tokens. Padding rows (final window) come last and fill what is left.
    num_micro_batches = num_steps * world_size
    batches: list[list[int]] = [[] for _ in range(num_micro_batches)]
    totals = [0] * num_micro_batches
    heap = [(0, b) for b in range(num_micro_batches)]
    for r in emitted + [-1] * (num_steps * group - len(emitted)):
        tokens, b = heapq.heappop(heap)
        batches[b].append(r)
        totals[b] = tokens + (fill[r] if r >= 0 else 0)
        if len(batches[b]) < rows_per_micro_batch:
            heapq.heappush(heap, (totals[b], b))
    # Micro-batches of similar size share a step; step order and rank order within a step are random.
    ranked = sorted(range(num_micro_batches), key=lambda b: (-totals[b], b))
    steps = []
    for s in rng.permutation(num_steps):
        members = [ranked[s * world_size + j] for j in rng.permutation(world_size)]
        steps.append([[rows[r] if r >= 0 else [] for r in batches[b]] for b in members])
    return WindowPlan(steps, carry)


def build_micro_batch(rows: list[list[Unit]], seq_len: int, pad_token_id: int) -> MicroBatch:
    """Lays out rows of units as a MicroBatch: ids, the packed layout, next-token targets numbered by
    sequence. Every sequence with a response is a sequence of the targets, in segment order, so DPO
    pair p's chosen and rejected responses are sequences 2p and 2p + 1; a shared-prefix pair is three
    segments, ``prefix | chosen | rejected``, the branches attending to the prefix. Images are left
    empty; the loader decodes them."""
    num_rows = len(rows)
    input_ids = np.full((num_rows, seq_len), pad_token_id, dtype=np.int64)
    labels = np.full((num_rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    lengths, prefix, segment_sample, segment_sequence, sample_ids, pairs, image_refs = [], [], [], [], [], [], []
    num_samples = num_truncated = num_sequences = 0
    for r, units in enumerate(rows):
        col, row_lengths = 0, []
        for unit in units:
            num_samples += 1
            num_truncated += unit.truncated
            first = len(segment_sample)
            if unit.is_pair:
                pairs.append((first + 1, first + 2) if unit.shared_prefix else (first, first + 1))
            for k, seq in enumerate(unit.sequences):
                n = len(seq)
                if col + n > seq_len:
                    raise ValueError(f"row {r} overflows: sample {unit.sample_id!r} needs {n} tokens at column {col} "
                                     f"of {seq_len}")
                is_prefix, is_branch = unit.shared_prefix and k == 0, unit.shared_prefix and k > 0
                if seq.labels[0] != IGNORE_INDEX and not is_branch:
                    raise ValueError(f"sample {unit.sample_id!r}: its first token carries a label; nothing before "
                                     f"it can predict it")
                input_ids[r, col:col + n] = seq.input_ids
                labels[r, col:col + n] = seq.labels
                col += n
                row_lengths.append(n)
                prefix.append(first if is_branch else -1)
                segment_sample.append(unit.index)
                segment_sequence.append(-1 if is_prefix else num_sequences)
                num_sequences += not is_prefix
                sample_ids.append(unit.sample_id)
                image_refs += [(unit.index, member) for member in unit.image_members[:seq.num_images]]
        if col < seq_len:  # row padding is a segment of its own
            row_lengths.append(seq_len - col)
            prefix.append(-1)
            segment_sample.append(-1)
            segment_sequence.append(-1)
            sample_ids.append("")
        lengths.append(row_lengths)
    packed = PackedSeqs.from_lengths(lengths, prefix)
    labels = torch.from_numpy(labels)
    segment_sequence = torch.tensor(segment_sequence, dtype=torch.int64)
    num_padding = sum(n for n, s in zip((n for row in lengths for n in row), segment_sample) if s < 0)
    return MicroBatch(
        input_ids=torch.from_numpy(input_ids),
        packed=packed,
        targets=Targets.next_tokens(labels, packed, segment_sequence, num_sequences),
        images=torch.zeros(0),
        segment_sample=torch.tensor(segment_sample, dtype=torch.int64),
        segment_sequence=segment_sequence,
        pair_segments=torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2),
        sample_ids=sample_ids,
        image_refs=image_refs,
        num_samples=num_samples,
        num_tokens=num_rows * seq_len - num_padding,
        num_label_tokens=int((labels != IGNORE_INDEX).sum()),
        num_padding_tokens=num_padding,
        num_truncated=num_truncated,
    )
