"""The batch contract: one micro-batch type from the loader to the loss, made once and read as is.

    batch = loader_micro_batch.to(device)        # data.packing builds it, the trainer moves it
    hidden = model(batch.input_ids, batch.images, packed=batch.packed, image_index=batch.image_index,
                   return_hidden=True)
    logprobs = token_logprobs(hidden, head_weight, batch.targets)      # [M], fused, vocab-parallel

``PackedSeqs`` says who attends to whom in a packed ``[R, S]`` batch: segments (cu_seqlens, as
flash-attn's varlen convention), positions, and optionally a prefix per segment: a segment with a
prefix also attends to that earlier segment of its row (a shared-prefix tree: ``prefix | chosen |
rejected``, each branch seeing the prefix and itself, never its sibling) and its positions continue
from the prefix's. Each attention backend turns this one description into its own form: a dense
mask (SDPA), a mask function (flex_attention), q/k cu_seqlens (varlen kernels).

``Targets`` are what the loss predicts: M (position, token) pairs over the flattened batch with the
sequence (response) each belongs to. One hidden state may predict several tokens, which a
shared-prefix pair needs: its last prefix position predicts both branches' first tokens.
"""

from __future__ import annotations

import dataclasses

import torch

IGNORE_INDEX = -100  # a label that trains nothing (the convention of HF and torch's cross entropy)


def _move(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    # Asynchronous only from pinned memory (the loader pins when training on CUDA; from pageable memory
    # CUDA stages the copy and the host waits). Freeing the source early is safe: the pinned allocator
    # keeps a block until the copy's stream has passed it. Writing into it is not: nothing writes a
    # batch's tensors after moving them.
    if tensor is None or tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=device.type == "cuda")


def _pin(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or tensor.device.type != "cpu" or tensor.is_pinned():
        return tensor
    return tensor.pin_memory()


@dataclasses.dataclass(frozen=True)
class PackedSeqs:
    """Layout of a packed ``[R, S]`` batch, made once (by the loader, or a caller) and handed down.

    cu_seqlens: int32 ``[K + 1]`` segment boundaries over the flattened ``R * S`` tokens, from 0 to
        ``R * S``; every row boundary is a segment boundary.
    max_seqlen: the longest segment (a Python int, so kernels need no device sync).
    position_ids: int64 ``[R, S]``: 0 at a segment's first token, or the prefix's length for a
        segment with a prefix.
    segment_ids: int64 ``[R, S]``: the segment of each token.
    prefix: int64 ``[K]``, or None when no segment has one: the segment each segment's tokens also
        attend to (-1: none). A prefix comes earlier in the same row and has no prefix itself.
    prefix_ids: int64 ``[R, S]`` (with ``prefix``): the prefix segment of each token's segment, -1.
    key_index, cu_seqlens_k, max_seqlen_k (with ``prefix``): the keys of the varlen kernels, which take
        each segment's queries against one contiguous run of keys: segment k's run is its prefix's
        tokens then its own (``key_index`` int64 ``[T_k]`` gathers them from the flattened tokens),
        with causality aligned to the end of the run, as flash-attn aligns it when queries are fewer.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    prefix: torch.Tensor | None = None
    prefix_ids: torch.Tensor | None = None
    key_index: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_k: int = 0

    @staticmethod
    def from_lengths(lengths: list[list[int]] | list[int], prefix: list[int] | None = None,
                     device: torch.device | str | None = None) -> "PackedSeqs":
        """The layout of rows of segments of these lengths (rows must be equally long).

        ``prefix``: for each segment (flattened, row-major), the index of its prefix segment or -1.
        """
        rows = [lengths] if lengths and isinstance(lengths[0], int) else lengths
        flat = [n for row in rows for n in row]
        if not flat or any(n <= 0 for n in flat):
            raise ValueError(f"segment lengths must be positive, got {rows}")
        if len({sum(row) for row in rows}) != 1:
            raise ValueError(f"rows of a packed batch must have equal length, got {rows}")
        seqlen = sum(rows[0])
        row_of = [r for r, row in enumerate(rows) for _ in row]
        starts = [0]
        for n in flat:
            starts.append(starts[-1] + n)
        first_position = [0] * len(flat)
        if prefix is not None:
            if len(prefix) != len(flat):
                raise ValueError(f"prefix names {len(prefix)} segments, the layout has {len(flat)}")
            for k, p in enumerate(prefix):
                if p < 0:
                    continue
                if not (p < k and row_of[p] == row_of[k] and prefix[p] < 0):
                    raise ValueError(f"segment {k}'s prefix {p} must be an earlier segment of the same row "
                                     f"without a prefix of its own")
                first_position[k] = flat[p]
            if all(p < 0 for p in prefix):
                prefix = None
        segment = torch.repeat_interleave(torch.arange(len(flat)), torch.tensor(flat))
        offset = torch.tensor(first_position) - torch.tensor(starts[:-1])
        positions = torch.arange(len(segment)) + offset[segment]
        cu = torch.tensor(starts, dtype=torch.int32)
        shape = (len(rows), seqlen)
        prefix_tensor = prefix_ids = key_index = cu_k = None
        max_k = 0
        if prefix is not None:
            prefix_tensor = torch.tensor(prefix, dtype=torch.int64)
            prefix_ids = prefix_tensor[segment].view(shape)
            runs = [(range(starts[p], starts[p + 1]) if p >= 0 else range(0)) for p in prefix]
            keys = [list(run) + list(range(starts[k], starts[k + 1])) for k, run in enumerate(runs)]
            key_index = torch.tensor([i for run in keys for i in run], dtype=torch.int64)
            cu_k = torch.tensor([0] + [len(run) for run in keys], dtype=torch.int64).cumsum(0).to(torch.int32)
            max_k = max(len(run) for run in keys)
        packed = PackedSeqs(cu, max(flat), positions.view(shape), segment.view(shape), prefix_tensor, prefix_ids,
                            key_index, cu_k, max_k)
        return packed.to(device) if device is not None else packed

    @staticmethod
    def from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> "PackedSeqs":
        """The layout of flash-attn-style ``cu_seqlens`` over a flattened ``[batch, seqlen]`` batch
        (checked: from 0 to ``batch * seqlen``, increasing, no segment across a row boundary)."""
        cu = [int(x) for x in cu_seqlens.tolist()]
        total = batch * seqlen
        if not cu or cu[0] != 0 or cu[-1] != total:
            raise ValueError(f"cu_seqlens must run from 0 to B*S={total}, got {cu}")
        if any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must be strictly increasing, got {cu}")
        if not set(range(seqlen, total + 1, seqlen)) <= set(cu):
            raise ValueError(f"a segment crosses a row boundary: cu_seqlens {cu}, row length {seqlen}")
        rows = [[b - a for a, b in zip(cu, cu[1:]) if r * seqlen <= a < (r + 1) * seqlen] for r in range(batch)]
        return PackedSeqs.from_lengths(rows, device=cu_seqlens.device)

    @staticmethod
    def from_position_ids(position_ids: torch.Tensor) -> "PackedSeqs":
        """The layout of ``[R, S]`` positions that restart at 0 where each segment starts (every row
        starts one); a plain batch (0..S-1 per row) is one segment per row. For callers that hold
        positions only; the training path gets its layout from the loader."""
        rows, seqlen = position_ids.shape
        if bool((position_ids[:, 0] != 0).any()):
            raise ValueError(f"packed position_ids must start every row at 0 (a new sample); got rows starting "
                             f"with {position_ids[:, 0].tolist()}")
        starts = (position_ids == 0).cpu()
        lengths = []
        for row in starts:
            cuts = torch.nonzero(row).flatten().tolist() + [seqlen]
            lengths.append([b - a for a, b in zip(cuts, cuts[1:])])
        packed = PackedSeqs.from_lengths(lengths, device=position_ids.device)
        if not torch.equal(packed.position_ids, position_ids.to(torch.int64)):
            raise ValueError("position_ids must count 0, 1, 2, ... within each segment")
        return packed

    @property
    def num_segments(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def has_prefixes(self) -> bool:
        return self.prefix is not None

    def lengths(self) -> list[int]:
        """Segment lengths (a host sync)."""
        return self.cu_seqlens.diff().tolist()

    def to(self, device: torch.device | str) -> "PackedSeqs":
        device = torch.device(device)
        return self._map(lambda tensor: _move(tensor, device))

    def pin_memory(self) -> "PackedSeqs":
        """A copy with the tensors that ``to`` moves in pinned host memory (CPU tensors only)."""
        return self._map(_pin)

    def _map(self, fn) -> "PackedSeqs":
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name))
                                            for f in dataclasses.fields(self) if not f.name.startswith("max_")})

    def attends(self, causal: bool) -> torch.Tensor:
        """bool ``[R, S, S]``: query t of a row may attend to key u of the same row (the dense form)."""
        seg = self.segment_ids
        mask = seg[:, :, None] == seg[:, None, :]
        if self.prefix_ids is not None:
            mask = mask | (self.prefix_ids[:, :, None] == seg[:, None, :])
        if causal:
            seqlen = seg.shape[1]
            mask = mask & torch.ones(seqlen, seqlen, dtype=torch.bool, device=seg.device).tril()
        return mask

    def mask_mod(self, causal: bool):
        """flex_attention's ``mask_mod(b, h, q_idx, kv_idx)`` of the same rule as :meth:`attends`."""
        seg, prefix_ids = self.segment_ids, self.prefix_ids

        def mask_mod(b, h, q_idx, kv_idx):
            keep = seg[b, q_idx] == seg[b, kv_idx]
            if prefix_ids is not None:
                keep = keep | (prefix_ids[b, q_idx] == seg[b, kv_idx])
            return keep & (q_idx >= kv_idx) if causal else keep
        return mask_mod


@dataclasses.dataclass(frozen=True)
class Targets:
    """The tokens a micro-batch trains on: ``M`` predictions, in row-major order of their positions.

    positions: int64 ``[M]``: flattened index ``r * S + t`` of the hidden state that predicts.
    tokens: int64 ``[M]``: the token it predicts.
    sequence: int64 ``[M]``: the sequence (response) each prediction belongs to, in
        ``[0, num_sequences)``; DPO pair p of the micro-batch has sequences 2p (chosen), 2p + 1.
    """

    positions: torch.Tensor
    tokens: torch.Tensor
    sequence: torch.Tensor
    num_sequences: int

    @staticmethod
    def from_dense(targets: torch.Tensor, sequence_index: torch.Tensor | None = None,
                   num_sequences: int | None = None) -> "Targets":
        """From ``[R, S]`` next-token targets (IGNORE_INDEX: none) and, optionally, the ``[R, S]``
        sequence of each position (default: all one sequence)."""
        flat = targets.reshape(-1)
        positions = torch.nonzero(flat != IGNORE_INDEX).flatten()
        if sequence_index is None:
            sequence = torch.zeros_like(positions)
            num_sequences = 1 if num_sequences is None else num_sequences
        else:
            sequence = sequence_index.reshape(-1)[positions]
            if num_sequences is None:
                num_sequences = int(sequence.max()) + 1 if sequence.numel() else 0
        return Targets(positions, flat[positions], sequence, num_sequences)

    @staticmethod
    def next_tokens(labels: torch.Tensor, packed: PackedSeqs, segment_sequence: torch.Tensor | None = None,
                    num_sequences: int | None = None) -> "Targets":
        """The next-token targets of ``labels [R, S]`` aligned with the input ids (label t is token t).

        Position t predicts label t + 1 when token t + 1 continues t's segment. A segment with a
        prefix (a branch) has its first token predicted from the prefix's last position, which so
        serves every branch of the prefix. ``segment_sequence`` int64 ``[K]``: the sequence each
        segment's predictions count for (default: all sequence 0).

        A segment without a prefix cannot carry a label on its first token: nothing before it can
        predict it.
        """
        flat, segment = labels.reshape(-1), packed.segment_ids.reshape(-1)
        starts = packed.cu_seqlens[:-1].long()
        has_prefix = packed.prefix >= 0 if packed.prefix is not None else torch.zeros_like(starts, dtype=torch.bool)
        first_labels = flat[starts]
        if bool(((first_labels != IGNORE_INDEX) & ~has_prefix).any()):
            raise ValueError("a segment's first token carries a label; nothing before it can predict it")
        if segment_sequence is None:
            segment_sequence = torch.zeros(packed.num_segments, dtype=torch.int64, device=flat.device)
            num_sequences = 1 if num_sequences is None else num_sequences
        # Inside a segment: position t predicts token t + 1.
        within = torch.nonzero((segment[1:] == segment[:-1]) & (flat[1:] != IGNORE_INDEX)).flatten()
        positions, tokens, sequence = within, flat[within + 1], segment_sequence[segment[within + 1]]
        branches = torch.nonzero(has_prefix & (first_labels != IGNORE_INDEX)).flatten()
        if branches.numel():
            prefix_last = packed.cu_seqlens.long()[packed.prefix[branches] + 1] - 1
            positions = torch.cat([positions, prefix_last])
            tokens = torch.cat([tokens, first_labels[branches]])
            sequence = torch.cat([sequence, segment_sequence[branches]])
            order = torch.sort(positions, stable=True).indices
            positions, tokens, sequence = positions[order], tokens[order], sequence[order]
        if num_sequences is None:
            num_sequences = int(segment_sequence.max()) + 1 if segment_sequence.numel() else 0
        return Targets(positions, tokens, sequence, num_sequences)

    def __len__(self) -> int:
        return self.tokens.numel()

    def to(self, device: torch.device | str) -> "Targets":
        device = torch.device(device)
        return self._map(lambda tensor: _move(tensor, device))

    def pin_memory(self) -> "Targets":
        return self._map(_pin)

    def _map(self, fn) -> "Targets":
        return Targets(fn(self.positions), fn(self.tokens), fn(self.sequence), self.num_sequences)

    def dense(self, shape: tuple[int, int]) -> torch.Tensor:
        """``[R, S]`` targets, IGNORE_INDEX where nothing is predicted (one token per position)."""
        out = torch.full((shape[0] * shape[1],), IGNORE_INDEX, dtype=torch.int64, device=self.tokens.device)
        out[self.positions] = self.tokens
        return out.view(shape)


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch of one rank: the model's input, the loss's targets, and the data's counts.

    input_ids: int64 ``[R, S]``, image runs expanded to ``num_image_tokens`` image tokens.
    packed: who attends to whom, and the positions.
    targets: what the loss predicts (next tokens inside each segment, labelled positions only).
    images: float32 ``[U, 3, H, W]``, SigLIP-normalised distinct images (a DPO pair's image once).
    image_index: int64 ``[N_runs]``: the image each image-token run shows, in reading order; None:
        run k shows image k.
    sample_ids: source id of each segment ('' for padding); segment_sample: int64 ``[K]`` sample
        number of each segment (-1: padding); segment_sequence: int64 ``[K]`` the sequence whose
        predictions each segment holds (-1: padding or a shared prefix); pair_segments: int64
        ``[P, 2]`` (chosen, rejected) segments of each DPO pair; image_refs: (sample number, tar
        member) of each image run.
    num_*: this micro-batch's counts; global_*: the totals over all ranks' micro-batches of the
        loader step it belongs to (from the plan every rank holds: no communication).
    reference_logps: fp32 ``[num_sequences]`` reference log-prob sums (DPO, set by the reference).
    """

    input_ids: torch.Tensor
    packed: PackedSeqs
    targets: Targets
    images: torch.Tensor
    image_index: torch.Tensor | None = None
    sample_ids: list[str] = dataclasses.field(default_factory=list)
    segment_sample: torch.Tensor | None = None
    segment_sequence: torch.Tensor | None = None
    pair_segments: torch.Tensor | None = None
    image_refs: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    num_samples: int = 0
    num_tokens: int = 0
    num_label_tokens: int = 0
    num_padding_tokens: int = 0
    num_truncated: int = 0
    epoch: int = 0
    global_samples: int = 0
    global_tokens: int = 0
    global_label_tokens: int = 0
    reference_logps: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    @property
    def num_pairs(self) -> int:
        return 0 if self.pair_segments is None else len(self.pair_segments)

    @property
    def pair_ids(self) -> list[str]:
        """Source ids of the pairs, in pair order."""
        return [self.sample_ids[int(c)] for c, _ in self.pair_segments] if self.num_pairs else []

    @property
    def labels(self) -> torch.Tensor:
        """int64 ``[R, S]`` labels aligned with the input ids (label t is token t; IGNORE_INDEX where
        nothing is trained): the targets seen from the token side, for inspection."""
        rows, seqlen = self.shape
        out = torch.full((rows * seqlen,), IGNORE_INDEX, dtype=torch.int64, device=self.targets.tokens.device)
        predicted = self.targets.positions + 1
        if self.packed.has_prefixes:  # a branch's first token is predicted from its prefix's last position
            own = self.sequence_segments()[self.targets.sequence]
            crosses = self.packed.segment_ids.reshape(-1)[predicted] != own
            predicted = torch.where(crosses, self.packed.cu_seqlens[:-1].long()[own], predicted)
        out[predicted] = self.targets.tokens
        return out.view(rows, seqlen)

    @property
    def pixel_values(self) -> torch.Tensor:
        """``[N_runs, 3, H, W]``: the image of each image-token run (a pair's image once per response)."""
        return self.images if self.image_index is None else self.images[self.image_index]

    def sequence_segments(self) -> torch.Tensor:
        """int64 ``[num_sequences]``: the segment of each sequence."""
        return torch.nonzero(self.segment_sequence >= 0).flatten()

    def sample_segments(self) -> tuple[list[int], list[int]]:
        """(lengths, prefix lengths) of the segments that hold samples, not padding (a host sync); a
        segment without a shared prefix has prefix length 0. ``profiling.attended_pairs`` takes both."""
        lengths, samples = self.packed.lengths(), self.segment_sample.tolist()
        prefix = self.packed.prefix.tolist() if self.packed.has_prefixes else [-1] * len(lengths)
        kept = [(n, lengths[p] if p >= 0 else 0) for n, s, p in zip(lengths, samples, prefix) if s >= 0]
        return [n for n, _ in kept], [p for _, p in kept]

    def to(self, device: torch.device | str) -> "MicroBatch":
        """This micro-batch with its model and loss tensors on ``device`` (asynchronous copies on CUDA
        from pinned memory: see ``pin_memory``); the bookkeeping tensors stay where they are."""
        device = torch.device(device)
        return self._map(lambda tensor: _move(tensor, device))

    def pin_memory(self) -> "MicroBatch":
        """A copy with the tensors that ``to`` moves in pinned host memory, so that their copies to a
        GPU overlap with its work (the loader calls it in its prefetch thread). Needs CUDA."""
        return self._map(_pin)

    def _map(self, fn) -> "MicroBatch":
        return dataclasses.replace(self, input_ids=fn(self.input_ids), packed=self.packed._map(fn),
                                   targets=self.targets._map(fn), images=fn(self.images),
                                   image_index=fn(self.image_index), reference_logps=fn(self.reference_logps))

    def blank(self) -> "MicroBatch":
        """A copy with nothing to learn: no targets, no samples, no pairs. It fills a pipeline step when
        the data ends before the step has its ``pp`` micro-batches."""
        nothing = self.targets.positions[:0]
        return dataclasses.replace(
            self, targets=Targets(nothing, nothing, nothing, 0), sample_ids=[""] * len(self.sample_ids),
            segment_sample=torch.full_like(self.segment_sample, -1),
            segment_sequence=torch.full_like(self.segment_sequence, -1), pair_segments=self.pair_segments[:0],
            num_samples=0, num_tokens=0, num_label_tokens=0, num_padding_tokens=0, num_truncated=0,
            global_samples=0, global_tokens=0, global_label_tokens=0, reference_logps=None)
