"""One optimizer step's forward and backward: the loader's micro-batches → losses → gradients, and metrics.

    runner = StepRunner(stage, pmodel, model_config, trainable=..., dpo=dpo_config, reference=reference,
                        reward_mean=running)
    result = runner.run(batches)          # batches: the step's MicroBatches of this rank
    # result.sums: local metric sums (all-reduce them, see StepResult); gradients are accumulated

The micro-batches arrive as the loader made them (``batch.MicroBatch``: packed layout, next-token
targets numbered by sequence, distinct images and their index); they are moved to the device and
read as is. Only target positions go through the head (``parallel.token_logprobs``, the fused
vocab-parallel kernel), so prompts, images and padding cost nothing there.

DPO. Sequences 2p and 2p + 1 of a micro-batch are its pair p's chosen and rejected responses. The
reference's log-probs of each micro-batch (``training.reference``) are attached to it before the
policy's forward. The loss function returns each micro-batch's metric sums; this step adds them up
and feeds the BCO reward mean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from ..batch import MicroBatch
from ..parallel import ParallelModel, global_scale, token_logprobs
from ..profiling import attended_pairs, forward_flops, nvtx_range, step_flops
from .losses import DPOConfig, RunningRewardMean, dpo_loss, dpo_metric_names, sequence_logprob_sums
from .reference import OnlineReference, PrecomputedReference

log = logging.getLogger(__name__)

LM_METRICS = ("loss_sum", "label_tokens")
PAIR_COUNTS = ("loss_sum", "pairs")
# Counted from the data, the same on every tensor / pipeline rank of a data-parallel rank.
DATA_METRICS = ("samples", "tokens", "label_tokens_data", "images", "flops", "padding_tokens")


def data_flops(batch: MicroBatch, config, trainable: tuple[str, ...], reference_forward: bool) -> float:
    """Model FLOPs of this micro-batch's training (and reference forward, when there is one)."""
    if batch.num_samples == 0:
        return 0.0  # a blank filler
    lengths, prefix_lengths = batch.sample_segments()
    kwargs = dict(num_images=len(batch.images), num_tokens=batch.num_tokens,
                  attention_pairs=attended_pairs(lengths, prefix_lengths=prefix_lengths),
                  num_labels=batch.num_label_tokens)
    flops = step_flops(config, trainable=trainable, **kwargs).total
    if reference_forward:
        flops += forward_flops(config, **kwargs).total
    return flops


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
                 dpo: DPOConfig | None = None, reference: OnlineReference | PrecomputedReference | None = None,
                 reward_mean: RunningRewardMean | None = None, autocast=None):
        self.stage, self.pmodel, self.model_config = stage, pmodel, model_config
        self.trainable, self.dpo, self.reference, self.reward_mean = trainable, dpo, reference, reward_mean
        self.autocast = autocast or contextlib.nullcontext
        self.device = next(iter(pmodel.parameters())).device if pmodel.parameters() else torch.device("cpu")
        model_metrics = PAIR_COUNTS + dpo_metric_names(dpo) if stage == "dpo" else LM_METRICS
        self.metric_names = model_metrics + DATA_METRICS

    def run(self, batches: list[MicroBatch]) -> StepResult:
        sums = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in self.metric_names}
        online = isinstance(self.reference, OnlineReference)
        for batch in batches:
            sums["samples"] += batch.num_samples
            sums["tokens"] += batch.num_tokens
            sums["label_tokens_data"] += batch.num_label_tokens
            sums["padding_tokens"] += batch.num_padding_tokens
            if batch.num_samples:
                sums["images"] += len(batch.images)
            sums["flops"] += data_flops(batch, self.model_config, self.trainable, online)
        global_samples = sum(b.global_samples for b in batches)
        mbs = [b.to(self.device) for b in batches]
        if self.stage == "dpo":
            global_count = global_samples
            outputs = self._dpo(mbs, global_count)
        else:
            global_count = sum(b.global_label_tokens for b in batches)
            outputs = self._lm(mbs, global_count)
        for output in outputs:  # micro-batch order: the sums come out the same on every layout
            for name, value in output.items():
                if name in sums:
                    sums[name] += value
            if self.reward_mean is not None and "rewards" in output:
                self.reward_mean.accumulate(*output["rewards"])
        return StepResult(sums, global_count, global_samples)

    def _lm(self, mbs: list[MicroBatch], global_count: int) -> list[dict]:
        # A step with no label anywhere has loss 0, whatever it is divided by.
        scale = global_scale(max(global_count, 1), self.pmodel.dims.layout.dp)

        def loss_fn(hidden, head_weight, mb: MicroBatch):
            with nvtx_range("head_logprob"):
                logprobs = token_logprobs(hidden, head_weight, mb.targets)
            nll = -logprobs.float().sum()
            return nll * scale, {"loss_sum": nll.detach().double(), "label_tokens": logprobs.numel()}

        with self.autocast():
            return self.pmodel.forward_backward(mbs, loss_fn).outputs

    def _dpo(self, mbs: list[MicroBatch], global_pairs: int) -> list[dict]:
        references = self.reference.logps(mbs, self.autocast)
        mbs = [dataclasses.replace(mb, reference_logps=ref) for mb, ref in zip(mbs, references)]
        config = self.dpo
        scale = global_scale(max(global_pairs, 1), self.pmodel.dims.layout.dp)
        delta = self.reward_mean.mean if self.reward_mean is not None else 0.0
        feeds_reward_mean = config.loss_type in ("bco_pair", "mpo")

        def loss_fn(hidden, head_weight, mb: MicroBatch):
            with nvtx_range("head_logprob"):
                logprobs = token_logprobs(hidden, head_weight, mb.targets)
            policy, counts = sequence_logprob_sums(logprobs, mb.targets.sequence, mb.targets.num_sequences)
            reference = mb.reference_logps
            # A pair counts when both responses kept a token to predict.
            present = (counts[0::2] > 0) & (counts[1::2] > 0)
            losses, metrics = dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2],
                                       counts[0::2].clamp(min=1), counts[1::2].clamp(min=1), config,
                                       reward_mean=delta)
            mask = present.to(losses.dtype)
            sums = {"loss_sum": (losses.detach() * mask).sum().double(), "pairs": mask.sum().double()}
            sums.update({name: (value * mask).sum().double() for name, value in metrics.items()})
            if feeds_reward_mean:
                sums["rewards"] = (metrics["rewards/chosen"][present], metrics["rewards/rejected"][present])
            return (losses * mask).sum() * scale, sums

        with self.autocast():
            return self.pmodel.forward_backward(mbs, loss_fn).outputs
