"""One optimizer step's forward and backward: loader micro-batches → losses → gradients, and metrics.

    runner = StepRunner(stage, pmodel, dpo_config, reference=reference, reward_mean=running)
    result = runner.run(batches)          # batches: the step's PackedBatches of this rank
    # result.sums: local metric sums (all-reduce them, see StepResult); gradients are accumulated

Targets. A PackedBatch's labels are aligned with its input ids (label t is token t); the model
predicts token t + 1 from position t, so targets are the labels shifted left inside each packed
segment. Only labelled positions go through the head (``parallel.token_logprobs``, the fused
vocab-parallel kernel), so prompts, images and padding cost nothing there.

DPO. Pair p of the step (counted over this rank's micro-batches) has sequences 2p (chosen) and
2p + 1 (rejected). The targets of a DPO micro-batch are ``[R, S, 2]``: shifted labels and the sequence
number of each position, so per-sequence sums need nothing but the target (pipelining splits it
with the rows). Each pair's image is encoded once per model per step: the loader's distinct images
and an image index go to the model, which indexes the encoded features for both sequences.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from ..data.packing import PackedBatch
from ..parallel import IGNORE_INDEX, MicroBatch, ParallelModel, token_logprobs
from ..profiling import attended_pairs, forward_flops, nvtx_range, step_flops
from .losses import DPOConfig, RunningRewardMean, dpo_loss, sequence_logprob_sums

log = logging.getLogger(__name__)

LM_METRICS = ("loss_sum", "label_tokens")
DPO_METRICS = ("loss_sum", "pairs", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected", "ref_logps/chosen", "ref_logps/rejected",
               "loss/preference", "loss/quality", "loss/sft")
# Counted from the data, the same on every tensor / pipeline rank of a data-parallel rank.
DATA_METRICS = ("samples", "tokens", "label_tokens_data", "images", "flops", "padding_tokens")


class ReferenceError(ValueError):
    """Reference log-probs are missing for some pairs, or the reference file does not fit the data."""


# ----------------------------------------------------------------------------------------------
# targets


def shift_labels(labels: torch.Tensor, position_ids: torch.Tensor, what: str = "batch") -> torch.Tensor:
    """``labels [R, S]`` aligned with the input ids → targets ``[R, S]``: target t = label t + 1 when
    token t + 1 continues token t's segment, else IGNORE_INDEX."""
    starts = position_ids == 0
    if bool((labels[starts] != IGNORE_INDEX).any()):
        raise ValueError(f"{what}: a segment's first token carries a label; nothing before it can predict it")
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = torch.where(starts[:, 1:], IGNORE_INDEX, labels[:, 1:])
    return targets


def sequence_numbers(batch: PackedBatch, first_pair: int) -> torch.Tensor:
    """int64 ``[R, S]``: per token, ``2p`` / ``2p + 1`` for the chosen / rejected sequence of pair
    ``p = first_pair + k`` (k-th pair of the batch), -1 elsewhere (padding)."""
    rows, seqlen = batch.input_ids.shape
    segment = torch.searchsorted(batch.cu_seqlens[1:].long(), torch.arange(rows * seqlen), right=True)
    of_segment = torch.full((len(batch.cu_seqlens) - 1,), -1, dtype=torch.int64)
    pairs = torch.arange(len(batch.pair_segments), dtype=torch.int64) + first_pair
    of_segment[batch.pair_segments[:, 0]] = 2 * pairs
    of_segment[batch.pair_segments[:, 1]] = 2 * pairs + 1
    return of_segment[segment].view(rows, seqlen)


def to_micro_batch(batch: PackedBatch, device: torch.device, *, first_pair: int | None = None) -> MicroBatch:
    """A loader batch as the model's input: distinct images + index, shifted targets (``[R, S]``, or
    ``[R, S, 2]`` with sequence numbers for DPO when ``first_pair`` is given)."""
    what = f"micro-batch with samples {sorted(set(i for i in batch.sample_ids if i))[:5]}"
    targets = shift_labels(batch.labels, batch.position_ids, what)
    if first_pair is not None:
        numbers = sequence_numbers(batch, first_pair)
        shifted = torch.full_like(numbers, -1)
        shifted[:, :-1] = numbers[:, 1:]
        targets = torch.stack([targets, torch.where(targets == IGNORE_INDEX, -1, shifted)], dim=-1)
    images = batch.images if batch.images is not None else batch.pixel_values
    index = batch.image_index if batch.images is not None else None
    non_blocking = device.type == "cuda"
    return MicroBatch(input_ids=batch.input_ids.to(device, non_blocking=non_blocking),
                      position_ids=batch.position_ids.to(device, non_blocking=non_blocking),
                      pixel_values=images.to(device, non_blocking=non_blocking),
                      labels=targets.to(device, non_blocking=non_blocking),
                      image_index=None if index is None else index.to(device, non_blocking=non_blocking))


def blank_batch(batch: PackedBatch) -> PackedBatch:
    """A copy of ``batch`` with nothing to learn: no labels, no samples, no pairs. It fills a
    pipeline step when the data ends before the step has its ``pp`` micro-batches."""
    return dataclasses.replace(
        batch, labels=torch.full_like(batch.labels, IGNORE_INDEX),
        segment_sample=torch.full_like(batch.segment_sample, -1), pair_segments=batch.pair_segments[:0],
        sample_ids=[""] * len(batch.sample_ids), num_samples=0, num_tokens=0, num_label_tokens=0,
        num_padding_tokens=0, num_truncated=0, global_samples=0, global_tokens=0, global_label_tokens=0)


def pair_ids(batch: PackedBatch) -> list[str]:
    """Source ids of the batch's pairs, in pair order."""
    return [batch.sample_ids[int(c)] for c, _ in batch.pair_segments]


def data_flops(batch: PackedBatch, config, trainable: tuple[str, ...], reference_forward: bool) -> float:
    """Model FLOPs of this micro-batch's training (and reference forward, when there is one)."""
    lengths = batch.cu_seqlens.diff().tolist()
    real = [n for n, s in zip(lengths, batch.segment_sample.tolist()) if s >= 0]
    if batch.num_samples == 0:
        return 0.0  # a blank filler
    kwargs = dict(num_images=len(batch.images if batch.images is not None else batch.pixel_values),
                  num_tokens=batch.num_tokens, attention_pairs=attended_pairs(real),
                  num_labels=batch.num_label_tokens)
    flops = step_flops(config, trainable=trainable, **kwargs).total
    if reference_forward:
        flops += forward_flops(config, **kwargs).total
    return flops


# ----------------------------------------------------------------------------------------------
# reference log-probs


class PrecomputedReference:
    """Reference log-prob sums per pair id, read from the JSON ``precompute_reference_logps`` writes."""

    FORMAT = "pivot_mega.reference_logps"

    def __init__(self, path: str | os.PathLike, shards_fingerprint: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ReferenceError(f"{self.path}: no reference log-probs; run with --set dpo.precompute_reference=true "
                                 f"to write them, or use dpo.reference=online")
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ReferenceError(f"{self.path}: cannot read reference log-probs ({e})") from e
        if data.get("format") != self.FORMAT:
            raise ReferenceError(f"{self.path}: not a reference log-prob file (format {data.get('format')!r})")
        if shards_fingerprint is not None and data.get("shards") != shards_fingerprint:
            raise ReferenceError(f"{self.path}: written for other shards ({data.get('shards_dir')}); "
                                 f"precompute the reference log-probs for this data again")
        self.pairs: dict[str, list[float]] = data["pairs"]

    def lookup(self, ids: list[str], device: torch.device) -> torch.Tensor:
        """→ ``[2P]``: chosen and rejected sums of each pair, interleaved."""
        missing = [i for i in ids if i not in self.pairs]
        if missing:
            raise ReferenceError(f"{self.path}: no reference log-probs for {len(missing)} pair(s): {missing[:10]}"
                                 f"{' ...' if len(missing) > 10 else ''}; precompute them for this data again")
        values = [v for i in ids for v in self.pairs[i]]
        return torch.tensor(values, dtype=torch.float32, device=device)


def sequence_sums_fn(num_sequences: int):
    """Output function for ``forward_only``: per-sequence log-prob sums ``[num_sequences]`` (fp32)."""
    def output(hidden, head_weight, targets):
        labels, numbers = targets[..., 0], targets[..., 1]
        logprobs = token_logprobs(hidden, head_weight, labels).float()
        sums, _ = sequence_logprob_sums(logprobs, numbers[labels != IGNORE_INDEX], num_sequences)
        return sums
    return output


# ----------------------------------------------------------------------------------------------
# the step


@dataclasses.dataclass
class StepResult:
    """``sums``: float64 metric sums of this rank, keyed as ``metric_names`` (all-reduce them over
    the world, then divide the model metrics by the tensor-parallel size and the data metrics by
    tensor x pipeline sizes: those ranks see the same data). ``global_count``: the step's global
    pairs (DPO) or label tokens (LM) the losses were normalised over."""

    sums: dict[str, torch.Tensor]
    global_count: int
    global_samples: int


class StepRunner:
    """Forward + backward of one step for a stage: LM loss (pretraining, SFT) or the DPO family."""

    def __init__(self, stage: str, pmodel: ParallelModel, model_config, *, trainable: tuple[str, ...],
                 dpo: DPOConfig | None = None, reference: ParallelModel | PrecomputedReference | None = None,
                 reward_mean: RunningRewardMean | None = None, autocast=None):
        self.stage, self.pmodel, self.model_config = stage, pmodel, model_config
        self.trainable, self.dpo, self.reference, self.reward_mean = trainable, dpo, reference, reward_mean
        self.autocast = autocast
        self.device = next(iter(pmodel.parameters())).device if pmodel.parameters() else torch.device("cpu")
        self.metric_names = (DPO_METRICS if stage == "dpo" else LM_METRICS) + DATA_METRICS

    def run(self, batches: list[PackedBatch]) -> StepResult:
        dp = self.pmodel.dims.layout.dp
        sums = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in self.metric_names}
        online = isinstance(self.reference, ParallelModel)
        for batch in batches:
            sums["samples"] += batch.num_samples
            sums["tokens"] += batch.num_tokens
            sums["label_tokens_data"] += batch.num_label_tokens
            sums["padding_tokens"] += batch.num_padding_tokens
            if batch.num_samples:
                sums["images"] += len(batch.images if batch.images is not None else batch.pixel_values)
            sums["flops"] += data_flops(batch, self.model_config, self.trainable, online)
        global_samples = sum(b.global_samples for b in batches)
        if self.stage != "dpo":
            global_count = sum(b.global_label_tokens for b in batches)
            mbs = [to_micro_batch(b, self.device) for b in batches]
            self._lm(mbs, sums, global_count, dp)
        else:
            global_count = global_samples
            firsts, count = [], 0
            for b in batches:
                firsts.append(count)
                count += len(b.pair_segments)
            mbs = [to_micro_batch(b, self.device, first_pair=f) for b, f in zip(batches, firsts)]
            ids = [i for b in batches for i in pair_ids(b)]
            self._dpo(mbs, ids, sums, global_count, dp)
        return StepResult(sums, global_count, global_samples)

    def _context(self):
        import contextlib
        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    def _lm(self, mbs: list[MicroBatch], sums: dict, global_count: int, dp: int) -> None:
        def loss_fn(hidden, head_weight, labels):
            with nvtx_range("head_logprob"):
                logprobs = token_logprobs(hidden, head_weight, labels)
            nll = -logprobs.float().sum()
            sums["loss_sum"] += nll.detach().double()
            sums["label_tokens"] += logprobs.numel()
            return nll * (dp / max(global_count, 1))
        with self._context():
            self.pmodel.forward_backward(mbs, loss_fn)

    def _dpo(self, mbs: list[MicroBatch], ids: list[str], sums: dict, global_pairs: int, dp: int) -> None:
        num_sequences = 2 * len(ids)
        if not isinstance(self.reference, ParallelModel):  # precomputed: anything with lookup(ids, device)
            reference = self.reference.lookup(ids, self.device)
        else:
            with self._context(), nvtx_range("reference_forward"):
                outputs = self.reference.forward_only(mbs, sequence_sums_fn(num_sequences))
            reference = torch.stack(outputs).sum(0) if outputs else torch.zeros(num_sequences, device=self.device)
        config, running = self.dpo, self.reward_mean
        delta = running.mean if running is not None else 0.0

        def loss_fn(hidden, head_weight, targets):
            labels, numbers = targets[..., 0], targets[..., 1]
            with nvtx_range("head_logprob"):
                logprobs = token_logprobs(hidden, head_weight, labels)
            policy, counts = sequence_logprob_sums(logprobs, numbers[labels != IGNORE_INDEX], num_sequences)
            present = (counts[0::2] > 0) & (counts[1::2] > 0)  # pairs of this micro-batch
            losses, metrics = dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2],
                                       counts[0::2].clamp(min=1), counts[1::2].clamp(min=1), config,
                                       reward_mean=delta)
            mask = present.to(losses.dtype)
            sums["loss_sum"] += (losses.detach() * mask).sum().double()
            sums["pairs"] += mask.sum().double()
            for name, value in metrics.items():
                sums[name] += (value * mask).sum().double()
            if running is not None and config.loss_type in ("bco_pair", "mpo"):
                running.accumulate(metrics["rewards/chosen"][present], metrics["rewards/rejected"][present])
            return (losses * mask).sum() * (dp / max(global_pairs, 1))
        with self._context():
            self.pmodel.forward_backward(mbs, loss_fn)
