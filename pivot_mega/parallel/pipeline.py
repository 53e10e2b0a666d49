"""Pipeline parallelism with ``torch.distributed.pipelining``: 1F1B, interleaved 1F1B, GPipe.

Stage 0 holds the SigLIP tower, the projector and the token embedding; the decoder layers are split
evenly (or by ``pipeline_layout``); the last stage holds the final norm and the head. Between stages
flow the hidden states; every stage also gets the micro-batch's position ids ``[b, S]`` (a keyword
argument, which the schedule splits and hands to every stage) and recovers the packing from them
(a sample starts where its position is 0), so attention never crosses samples anywhere.
With tied embeddings the last stage keeps its own copy of the embedding as the head, and the two
copies' gradients are summed after backward (Megatron's embedding group) so they stay identical.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..models.layers import PackedSeqs
from ..models.mllm import VisionLanguageModel, embed_with_images
from .config import stage_layer_ranges
from .mesh import ParallelDims


class ImagesByRow:
    """The images of a batch, grouped by the row that holds their tokens.

    Deliberately not a tensor or a container the schedule understands: ``step()`` splits tensor
    arguments into micro-batches along dim 0 and hands other objects whole to every micro-batch, so
    each micro-batch gets its row indices as a tensor and picks its own images from this.

    ``per_row[i]`` holds row i's distinct images ``[U_i, 3, H, W]`` and ``index_per_row[i]`` which of
    them each image-token run of the row shows (``[N_i]``; None: one image per run, in order).
    """

    def __init__(self, per_row: list[torch.Tensor], index_per_row: list[torch.Tensor | None] | None = None):
        self.per_row = per_row
        self.index_per_row = index_per_row or [None] * len(per_row)

    @classmethod
    def from_batch(cls, pixel_values: torch.Tensor, image_index: torch.Tensor | None,
                   runs_per_row: list[int]) -> "ImagesByRow":
        """Splits a batch's images by row; ``runs_per_row``: image-token runs in each row. Images are
        shared only within a row (a DPO pair sits in one row), so each row keeps its distinct ones."""
        if image_index is None:
            return cls(list(pixel_values.split(runs_per_row)))
        per_row, index_per_row = [], []
        for runs in image_index.split(runs_per_row):
            distinct, local = torch.unique(runs, sorted=True, return_inverse=True)
            per_row.append(pixel_values[distinct])
            index_per_row.append(local)
        return cls(per_row, index_per_row)

    def select(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """→ (distinct images of these rows, run → image index or None)."""
        rows = rows.tolist()
        pixels = torch.cat([self.per_row[i] for i in rows])
        if all(self.index_per_row[i] is None for i in rows):
            return pixels, None
        index, offset = [], 0
        for i in rows:
            local = self.index_per_row[i]
            if local is None:
                local = torch.arange(len(self.per_row[i]))
            index.append(local.to(pixels.device) + offset)
            offset += len(self.per_row[i])
        return pixels, torch.cat(index)


class StageModel(nn.Module):
    """One pipeline stage's share of a VisionLanguageModel; parameter names as in the whole model."""

    def __init__(self, model: VisionLanguageModel, layers: range, *, first: bool, last: bool):
        super().__init__()
        self.config = model.config
        self.first, self.last = first, last
        if first:
            self.vision, self.projector = model.vision, model.projector
        language = model.language
        language.layers = nn.ModuleDict({key: layer for key, layer in language.layers.items() if int(key) in layers})
        if not first and not (last and language.lm_head is None):
            language.embed_tokens = None  # the last stage keeps it only as a tied head
        if not last:
            language.norm, language.lm_head = None, None
        self.language = language

    @property
    def first_layer(self) -> str | None:
        return next(iter(self.language.layers), None) if self.first else None

    def forward(self, *inputs: torch.Tensor, position_ids: torch.Tensor, images: ImagesByRow | None = None):
        """First stage: (input_ids ``[b, S]``, row_index ``[b]``) and ``images``; others: (hidden,).
        → hidden ``[b, S(/tp), H]``, final-normed at the last stage.

        A micro-batch whose rows hold no image runs the vision tower on zero images, so every
        data-parallel rank runs the same collectives."""
        if self.first:
            input_ids, rows = inputs
            features = None
            if images is not None:
                pixels, image_index = images.select(rows)
                features = self.projector(self.vision(pixels))
                features = features if image_index is None else features[image_index]
            hidden = embed_with_images(self.language.embed_tokens, input_ids, features, self.config)
        else:
            (hidden,) = inputs
        cos, sin = self.language.rope(position_ids)
        packed = PackedSeqs.from_position_ids(position_ids)
        hidden = self.language.forward_layers(hidden, cos, sin, packed)
        return self.language.norm(hidden) if self.last else hidden


def stage_indices(dims: ParallelDims) -> list[int]:
    """Stages this rank runs: looped assignment (rank r holds stages r, r + pp, ...)."""
    pp = dims.layout.pp
    return [dims.pp_rank + k * pp for k in range(dims.config.virtual_pipeline_stages)]


def split_stages(model: VisionLanguageModel, dims: ParallelDims) -> list[StageModel]:
    """This rank's StageModels, cut from ``model`` (build it on the meta device: each stage is a copy)."""
    ranges = stage_layer_ranges(dims.config, model.config.language.num_hidden_layers)
    stages = []
    for index in stage_indices(dims):
        stages.append(StageModel(copy.deepcopy(model), ranges[index], first=index == 0,
                                 last=index == len(ranges) - 1))
    return stages


def _stage_io(stage: StageModel, dims: ParallelDims, batch: int, seqlen: int,
              dtype: torch.dtype) -> tuple[tuple, tuple]:
    """Meta tensors of one micro-batch's stage inputs and outputs (the stages' static shapes).

    Given up front, so the schedule does not run stages on placeholder inputs to infer them (packing
    is read from the position ids, which a placeholder does not hold).
    """
    meta = dict(device="meta")
    hidden_size = stage.config.language.hidden_size
    local_seqlen = seqlen // dims.layout.tp if dims.config.sequence_parallel else seqlen
    # requires_grad: received activations must carry gradients back to the previous stage.
    hidden = torch.empty(batch, local_seqlen, hidden_size, dtype=dtype, requires_grad=True, **meta)
    if stage.first:
        inputs = (torch.empty(batch, seqlen, dtype=torch.long, **meta), torch.empty(batch, dtype=torch.long, **meta))
    else:
        inputs = (hidden,)
    outputs = (torch.empty(batch, seqlen, hidden_size, dtype=dtype, requires_grad=True, **meta),) \
        if stage.last else (hidden,)
    return inputs, outputs


def build_schedule(stages: list[StageModel], dims: ParallelDims, loss_fn, device: torch.device, *,
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


def run_schedule(schedule, stages: list[StageModel], input_ids: torch.Tensor, position_ids: torch.Tensor,
                 images: ImagesByRow, labels: torch.Tensor, *, train: bool = True) -> list:
    """One pipelined forward + backward of a batch (split into the schedule's micro-batches along its
    rows), or a forward only (``train=False``, no gradients); → the last stage's per-micro-batch loss
    function outputs (empty elsewhere)."""
    first = any(stage.first for stage in stages)
    last = any(stage.last for stage in stages)
    losses: list = []
    args = (input_ids, torch.arange(input_ids.shape[0], device=input_ids.device)) if first else ()
    kwargs = {"position_ids": position_ids, "images": images if first else None}
    if train:
        schedule.step(*args, target=labels if last else None, losses=losses if last else None,
                      return_outputs=False, **kwargs)
    else:
        schedule.eval(*args, target=labels if last else None, losses=losses if last else None, **kwargs)
    return losses


class TiedEmbeddingSync:
    """Sums the gradients of the first stage's embedding and the last stage's tied head copy."""

    def __init__(self, stages: list[StageModel], dims: ParallelDims):
        self.params = [stage.language.embed_tokens.weight for stage in stages
                       if (stage.first or stage.last) and stage.language.embed_tokens is not None]
        self.group = None
        if not stages[0].config.language.tie_word_embeddings or dims.layout.pp == 1:
            return
        ranks = dims.mesh.mesh  # [pp, dp_replicate, dp_shard, tp] global ranks
        me = dist.get_rank()
        for index in torch.cartesian_prod(*[torch.arange(n) for n in ranks.shape[1:]]).reshape(-1, 3):
            pair = [int(ranks[0][tuple(index)]), int(ranks[-1][tuple(index)])]
            group = dist.new_group(pair)  # every rank creates every group, in the same order
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
