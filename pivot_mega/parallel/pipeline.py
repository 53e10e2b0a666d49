"""Pipeline parallelism with ``torch.distributed.pipelining``: 1F1B, interleaved 1F1B, GPipe.

Stage 0 holds the SigLIP tower, the projector and the token embedding; the decoder layers are split
evenly (or by ``pipeline_layout``); the last stage holds the final norm and the head. Each stage runs
the model's own forward, the parts it does not hold passed through. Between stages flow the hidden
states; every stage also gets its micro-batch's row numbers (a keyword argument, which the schedule
splits and hands to every stage) and finds that micro-batch's packed layout, images and targets
from them, as the loader made them: nothing is rebuilt.
With tied embeddings the last stage keeps its own copy of the embedding as the head, and the two
copies' gradients are summed after backward (Megatron's embedding group) so they stay identical.
"""

from __future__ import annotations

import copy
import datetime

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..batch import MicroBatch
from ..models.mllm import VisionLanguageModel
from .config import stage_layer_ranges
from .mesh import ParallelDims


class StageBatches:
    """The micro-batches of a pipelined step, found by the rows a stage is given.

    Deliberately not a tensor or a container the schedule understands: ``step()`` splits tensor
    arguments into micro-batches along dim 0 and hands other objects whole to every micro-batch, so
    each stage gets its micro-batch's row numbers as a tensor and looks up the rest (packed layout,
    images, targets) here, as the loader made them.
    """

    def __init__(self, microbatches: list[MicroBatch]):
        self.microbatches = microbatches
        self.rows = microbatches[0].shape[0]

    @staticmethod
    def row_numbers(microbatches: list[MicroBatch]) -> torch.Tensor:
        """int64 ``[N * R]`` row numbers of the step (on the CPU: looking one up costs no device sync)."""
        return torch.arange(len(microbatches) * microbatches[0].shape[0])

    def index_of(self, rows: torch.Tensor) -> int:
        index, offset = divmod(int(rows[0]), self.rows)
        if offset or len(rows) != self.rows:
            raise RuntimeError(f"pipeline schedule split rows {rows.tolist()}, not whole micro-batches of "
                               f"{self.rows} rows")
        return index

    def of_rows(self, rows: torch.Tensor) -> MicroBatch:
        return self.microbatches[self.index_of(rows)]


class PipelineStageModule(nn.Module):
    """One pipeline stage: the model's own forward on this stage's share of the model.

    The stage's ``model`` is a VisionLanguageModel whose absent parts are None (pass-through, as
    torchtitan's pipeline stages): stage 0 embeds the token ids and images, later stages take the
    hidden states, only the last stage holds the final norm and the head. Parameter names are the
    whole model's.
    """

    def __init__(self, model: VisionLanguageModel, index: int, num_stages: int):
        super().__init__()
        self.model, self.index = model, index
        self.first, self.last = index == 0, index == num_stages - 1

    def forward(self, inputs: torch.Tensor, *, rows: torch.Tensor, batches: StageBatches) -> torch.Tensor:
        """First stage: input_ids ``[b, S]``; others: hidden ``[b, S(/tp), H]`` → hidden, final-normed at
        the last stage. A micro-batch without images runs the vision tower on zero images, so every
        data-parallel rank runs the same collectives."""
        mb = batches.of_rows(rows)
        return self.model(inputs, mb.images if self.first else None, packed=mb.packed, image_index=mb.image_index,
                          return_hidden=True)


def _stage_share(model: VisionLanguageModel, layers: range, *, first: bool, last: bool) -> VisionLanguageModel:
    """Cuts ``model`` (a copy on the meta device) down to one stage's parts; the rest become None."""
    if not first:
        model.vision, model.projector = None, None
    language = model.language
    language.layers = nn.ModuleDict({key: layer for key, layer in language.layers.items() if int(key) in layers})
    if not first and not (last and language.lm_head is None):
        language.embed_tokens = None  # the last stage keeps it only as a tied head
    if not last:
        language.norm, language.lm_head = None, None
    return model


def stage_indices(dims: ParallelDims) -> list[int]:
    """Stages this rank runs: looped assignment (rank r holds stages r, r + pp, ...)."""
    pp = dims.layout.pp
    return [dims.pp_rank + k * pp for k in range(dims.config.virtual_pipeline_stages)]


def split_stages(model: VisionLanguageModel, dims: ParallelDims) -> list[PipelineStageModule]:
    """This rank's stages, cut from ``model`` (build it on the meta device: each stage is a copy)."""
    ranges = stage_layer_ranges(dims.config, model.config.language.num_hidden_layers)
    stages = []
    for index in stage_indices(dims):
        first, last = index == 0, index == len(ranges) - 1
        share = _stage_share(copy.deepcopy(model), ranges[index], first=first, last=last)
        stages.append(PipelineStageModule(share, index, len(ranges)))
    return stages


def _stage_io(stage: PipelineStageModule, dims: ParallelDims, batch: int, seqlen: int,
              dtype: torch.dtype) -> tuple[tuple, tuple]:
    """Meta tensors of one micro-batch's stage inputs and outputs (the stages' static shapes).

    Given up front, so the schedule does not run stages on placeholder inputs to infer them (the
    packed layout comes with the step's micro-batches, which a placeholder does not have).
    """
    meta = dict(device="meta")
    hidden_size = stage.model.config.language.hidden_size
    local_seqlen = seqlen // dims.layout.tp if dims.config.sequence_parallel else seqlen
    # requires_grad: received activations must carry gradients back to the previous stage.
    hidden = torch.empty(batch, local_seqlen, hidden_size, dtype=dtype, requires_grad=True, **meta)
    if stage.first:
        inputs = (torch.empty(batch, seqlen, dtype=torch.long, **meta),)
    else:
        inputs = (hidden,)
    outputs = (torch.empty(batch, seqlen, hidden_size, dtype=dtype, requires_grad=True, **meta),) \
        if stage.last else (hidden,)
    return inputs, outputs


def build_schedule(stages: list[PipelineStageModule], dims: ParallelDims, loss_fn, device: torch.device, *,
                   batch: int, seqlen: int, dtype: torch.dtype = torch.float32):
    """The schedule for micro-batches of ``[batch, seqlen]`` tokens (rebuilt when those change)."""
    config = dims.config
    total = dims.layout.pp * config.virtual_pipeline_stages
    if config.sequence_parallel and seqlen % dims.layout.tp:
        raise ValueError(f"sequence length {seqlen} must be a multiple of tensor_model_parallel_size "
                         f"{dims.layout.tp} with sequence_parallel and pipeline parallelism")
    pipeline_stages = []
    for stage, index in zip(stages, stage_indices(dims)):
        inputs, outputs = _stage_io(stage, dims, batch, seqlen, dtype)
        pipeline_stages.append(PipelineStage(stage, index, total, device, input_args=inputs, output_args=outputs,
                                             group=dims.pp_group))
    # Losses are already normalised over the global batch, so gradients are not rescaled here.
    if config.pipeline_schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(pipeline_stages, config.microbatches, loss_fn=loss_fn, scale_grads=False)
    schedule = ScheduleGPipe if config.pipeline_schedule == "gpipe" else Schedule1F1B
    return schedule(pipeline_stages[0], config.microbatches, loss_fn=loss_fn, scale_grads=False)


def run_schedule(schedule, stages: list[PipelineStageModule], microbatches: list[MicroBatch], *,
                 train: bool = True) -> None:
    """One pipelined forward + backward of the step's micro-batches, or a forward only (``train=False``,
    no gradients). The loss function the schedule was built with sees the row numbers of each
    micro-batch as its target and finds the micro-batch from them."""
    first = any(stage.first for stage in stages)
    last = any(stage.last for stage in stages)
    rows = StageBatches.row_numbers(microbatches)
    args = (torch.cat([mb.input_ids for mb in microbatches]),) if first else ()
    kwargs = {"rows": rows, "batches": StageBatches(microbatches)}
    losses: list = []
    if train:
        schedule.step(*args, target=rows if last else None, losses=losses if last else None,
                      return_outputs=False, **kwargs)
    else:
        schedule.eval(*args, target=rows if last else None, losses=losses if last else None, **kwargs)


class TiedEmbeddingSync:
    """Sums the gradients of the first stage's embedding and the last stage's tied head copy."""

    def __init__(self, stages: list[PipelineStageModule], dims: ParallelDims):
        self.params = [stage.model.language.embed_tokens.weight for stage in stages
                       if (stage.first or stage.last) and stage.model.language.embed_tokens is not None]
        self.group = None
        if not stages[0].model.config.language.tie_word_embeddings or dims.layout.pp == 1:
            return
        ranks = dims.mesh.mesh  # [pp, dp_replicate, dp_shard, tp] global ranks
        me = dist.get_rank()
        for index in torch.cartesian_prod(*[torch.arange(n) for n in ranks.shape[1:]]).reshape(-1, 3):
            pair = [int(ranks[0][tuple(index)]), int(ranks[-1][tuple(index)])]
            # every rank creates every group, in the same order
            group = dist.new_group(pair, timeout=datetime.timedelta(seconds=dims.config.timeout_s))
            if me in pair:
                self.group = group

    def __call__(self) -> None:
        if self.group is None:
            return
        for param in self.params:
            if param.grad is None:
                continue
            grad = param.grad
            if isinstance(grad, DTensor):
                # The embedding's gradient can come out replicated while the weight is vocab-sharded; both
                # copies must hold the same layout before they are summed.
                if grad.placements != param.placements:
                    param.grad = grad = grad.redistribute(param.device_mesh, param.placements)
                grad = grad.to_local()
            dist.all_reduce(grad, group=self.group)
