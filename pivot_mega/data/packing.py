"""Packing: units (a sequence, or a DPO pair) into rows, rows into micro-batches balanced across ranks.

A window of units is packed by best-fit decreasing into rows of ``max_seq_len`` tokens. A DPO pair is
one unit, so its chosen and rejected sequences sit side by side in one row (same micro-batch,
adjacent segments). Only whole groups of ``world_size * rows_per_micro_batch`` rows leave a window
(the fullest rows); the units of the other rows wait for the next window, where they pack with new
units, and the last window of an epoch pads its group with empty rows. Rows of a group are spread
over the ranks' micro-batches largest first, each to the micro-batch with the fewest tokens so far,
so the ranks of a step get about the same number of tokens.

A micro-batch is ``[R, S]`` with every segment (sample sequence or row padding) listed in
``cu_seqlens`` (int32 over the flattened ``R * S`` tokens, every row boundary a segment boundary)
and position ids restarting at 0 in each segment.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq

import numpy as np
import torch

from .templates import IGNORE_INDEX, Unit


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


@dataclasses.dataclass
class PackedBatch:
    """One rank's micro-batch.

    input_ids, labels, position_ids: int64 ``[R, S]`` (labels -100 where nothing is trained, labels
        aligned with input_ids: the loss shifts them).
    cu_seqlens: int32 ``[K + 1]`` segment boundaries over the flattened ``R * S`` tokens; max_seqlen.
    pixel_values: float32 ``[N_img, 3, H, W]``, SigLIP-normalised, images in reading order of the
        image-token runs (a DPO pair's image appears twice, once per sequence).
    images, image_index: the same without repeats: ``images [U, 3, H, W]`` distinct images (decoded
        once) and ``image_index`` int64 ``[N_img]``, so that ``pixel_values == images[image_index]``.
        Feed these to the model to encode each image once.
    segment_sample: int64 ``[K]`` sample number of each segment, -1 for padding segments.
    pair_segments: int64 ``[P, 2]`` (chosen, rejected) segment numbers of each DPO pair.
    sample_ids: source ids of the segments ('' for padding).
    image_refs: (sample number, tar member) of each entry of pixel_values.
    epoch: the epoch the micro-batch belongs to (set by the loader).
    global_samples, global_tokens, global_label_tokens: totals over the micro-batches of all ranks
        that share this one's loader step (set by the loader from the plan every rank holds), so
        losses can be normalised over the global batch without communication.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    segment_sample: torch.Tensor
    pair_segments: torch.Tensor
    sample_ids: list[str]
    image_refs: list[tuple[int, str]]
    pixel_values: torch.Tensor | None = None
    images: torch.Tensor | None = None
    image_index: torch.Tensor | None = None
    num_samples: int = 0
    num_tokens: int = 0
    num_label_tokens: int = 0
    num_padding_tokens: int = 0
    num_truncated: int = 0
    epoch: int = 0
    global_samples: int = 0
    global_tokens: int = 0
    global_label_tokens: int = 0


def build_micro_batch(rows: list[list[Unit]], seq_len: int, pad_token_id: int) -> PackedBatch:
    """Lays out rows of units as a PackedBatch (without pixel_values; the loader decodes those)."""
    num_rows = len(rows)
    input_ids = np.full((num_rows, seq_len), pad_token_id, dtype=np.int64)
    labels = np.full((num_rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((num_rows, seq_len), dtype=np.int64)
    boundaries, segment_sample, sample_ids, pairs, image_refs = [0], [], [], [], []
    num_samples = num_truncated = 0
    for r, units in enumerate(rows):
        col = 0
        for unit in units:
            num_samples += 1
            num_truncated += unit.truncated
            if unit.is_pair:
                pairs.append((len(segment_sample), len(segment_sample) + 1))
            for sequence in unit.sequences:
                n = len(sequence)
                if col + n > seq_len:
                    raise ValueError(f"row {r} overflows: sample {unit.sample_id!r} needs {n} tokens at column {col} "
                                     f"of {seq_len}")
                input_ids[r, col:col + n] = sequence.input_ids
                labels[r, col:col + n] = sequence.labels
                position_ids[r, col:col + n] = np.arange(n)
                col += n
                boundaries.append(r * seq_len + col)
                segment_sample.append(unit.index)
                sample_ids.append(unit.sample_id)
                image_refs += [(unit.index, member) for member in unit.image_members[:sequence.num_images]]
        if col < seq_len:  # row padding is a segment of its own
            position_ids[r, col:] = np.arange(seq_len - col)
            boundaries.append((r + 1) * seq_len)
            segment_sample.append(-1)
            sample_ids.append("")
    lengths = np.diff(boundaries)
    num_padding = int(sum(n for n, s in zip(lengths, segment_sample) if s < 0))
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.tensor(boundaries, dtype=torch.int32),
        max_seqlen=int(lengths.max()),
        segment_sample=torch.tensor(segment_sample, dtype=torch.int64),
        pair_segments=torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2),
        sample_ids=sample_ids,
        image_refs=image_refs,
        num_samples=num_samples,
        num_tokens=num_rows * seq_len - num_padding,
        num_label_tokens=int((labels != IGNORE_INDEX).sum()),
        num_padding_tokens=num_padding,
        num_truncated=num_truncated,
    )
