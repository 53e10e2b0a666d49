"""Parallelism on one DeviceMesh: tensor + sequence, pipeline, and sharded or replicated data parallel.

    dims = build_mesh(parallel_config, model_config)          # checks the layout first
    with torch.device("meta"):
        model = VisionLanguageModel(model_config)
    pmodel = parallelize(model, dims, seed=0)                 # TP -> AC/compile -> FSDP -> materialise
    loss = pmodel.forward_backward(microbatches, loss_fn)     # 1F1B etc. when pipelined

The model stays a plain nn.Module; everything here is applied from outside (torchtitan's split).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..models.layers import PackedSeqs
from ..profiling import nvtx_range
from ..models.mllm import VisionLanguageModel, initial_value
from .config import Layout, ParallelConfig, resolve_layout, stage_layer_ranges
from .data_parallel import apply_fsdp
from .loss import IGNORE_INDEX, head_shard, lm_loss, token_logprobs
from .mesh import LaunchEnv, ParallelDims, build_mesh, detect_launch, init_distributed
from .pipeline import ImagesByRow, StageModel, TiedEmbeddingSync, build_schedule, run_schedule, split_stages
from .tensor_parallel import apply_tensor_parallel

__all__ = [
    "IGNORE_INDEX", "LaunchEnv", "Layout", "MicroBatch", "ParallelConfig", "ParallelDims", "ParallelModel",
    "build_mesh", "copy_full_value", "detect_launch", "head_shard", "init_distributed", "lm_loss", "parallelize", "resolve_layout",
    "stage_layer_ranges", "token_logprobs",
]


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch: packed rows ``[b, S]`` with per-sample positions, its images, its targets.

    ``labels`` is what the loss function reads: usually ``[b, S]`` token ids (IGNORE_INDEX where there
    is nothing to predict), or any tensor whose first dim is the rows (the DPO step stacks labels and
    sequence numbers as ``[b, S, 2]``); pipelining splits it by rows with the rest of the batch.
    ``image_index``: see ``VisionLanguageModel.encode_images`` (None: one image per image-token run).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor  # [N_img, 3, H, W]; N_img may be 0
    labels: torch.Tensor        # [b, S] or [b, S, ...]
    image_index: torch.Tensor | None = None


class ParallelModel:
    """The parallelised model of this rank: one module, or its pipeline stages and their schedule."""

    def __init__(self, modules: list[nn.Module], dims: ParallelDims, schedule_builder=None, tied_sync=None):
        self.modules, self.dims = modules, dims
        self._schedule_builder, self._tied_sync = schedule_builder, tied_sync
        self._schedules: dict = {}
        self._loss_fn = None  # the function of the call in progress; cached schedules call it

    def named_parameters(self):
        for module in self.modules:
            yield from module.named_parameters()

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def train(self, mode: bool = True) -> "ParallelModel":
        for module in self.modules:
            module.train(mode)
        return self

    def head_weight(self, module: nn.Module) -> torch.Tensor:
        return module.language.head_weight

    @property
    def holds_loss(self) -> bool:
        """Whether this rank computes losses (every rank without pipelining; the last stage with)."""
        return self.dims.layout.pp == 1 or any(getattr(m, "last", False) for m in self.modules)

    def forward_backward(self, microbatches: list[MicroBatch], loss_fn) -> torch.Tensor:
        """Forward and backward over the micro-batches, gradients accumulated; → summed loss (all ranks).

        ``loss_fn(hidden [b, S, H], head_weight, labels) -> scalar`` must already be normalised over
        the global batch (``lm_loss`` is). It runs where the loss is computed (see ``holds_loss``),
        once per micro-batch, in micro-batch order.
        """
        if self.dims.layout.pp == 1:
            model = self.modules[0]
            total = torch.zeros((), device=microbatches[0].input_ids.device)
            for i, mb in enumerate(microbatches):
                if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce once, after the last one
                    model.set_requires_gradient_sync(i == len(microbatches) - 1)
                loss = loss_fn(self._hidden(model, mb), self.head_weight(model), mb.labels)
                with nvtx_range("backward"):
                    loss.backward()
                total += loss.detach()
            return total
        losses = self._pipelined(microbatches, loss_fn, train=True)
        self._tied_sync()
        total = torch.stack([l.detach() for l in losses]).sum() if losses else \
            torch.zeros((), device=microbatches[0].input_ids.device)
        dist.all_reduce(total, group=self.dims.pp_group)  # only the last stage holds losses
        return total

    @torch.no_grad()
    def forward_only(self, microbatches: list[MicroBatch], output_fn) -> list:
        """Forward without gradients (a frozen reference model): → ``output_fn(hidden, head_weight,
        labels)`` per micro-batch where ``holds_loss``, else []. ``output_fn`` may return any tensor."""
        if self.dims.layout.pp == 1:
            model = self.modules[0]
            return [output_fn(self._hidden(model, mb), self.head_weight(model), mb.labels) for mb in microbatches]
        return self._pipelined(microbatches, output_fn, train=False)

    @staticmethod
    def _hidden(model: nn.Module, mb: MicroBatch) -> torch.Tensor:
        packed = PackedSeqs.from_position_ids(mb.position_ids)
        return model(mb.input_ids, mb.pixel_values, position_ids=mb.position_ids, cu_seqlens=packed.cu_seqlens,
                     max_seqlen=packed.max_seqlen, image_index=mb.image_index, return_hidden=True)

    def _pipelined(self, microbatches: list[MicroBatch], loss_fn, *, train: bool) -> list:
        last = next((m for m in self.modules if m.last), None)
        batch, seqlen = microbatches[0].input_ids.shape
        if any(mb.input_ids.shape != (batch, seqlen) for mb in microbatches):
            raise ValueError("pipeline parallelism needs micro-batches of equal shape, got "
                             f"{[tuple(mb.input_ids.shape) for mb in microbatches]}")
        key = (len(microbatches), batch, seqlen)
        if key not in self._schedules:
            self._schedules[key] = self._schedule_builder(
                len(microbatches), batch, seqlen,
                lambda output, labels: self._loss_fn(output, self.head_weight(last), labels))
        config = self.modules[0].config
        images = []
        for mb in microbatches:
            runs = ((mb.input_ids == config.image_token_id).sum(1) // config.num_image_tokens).tolist()
            images.append(ImagesByRow.from_batch(mb.pixel_values, mb.image_index, runs))
        images = ImagesByRow([x for i in images for x in i.per_row], [x for i in images for x in i.index_per_row])
        self._loss_fn = loss_fn
        try:
            return run_schedule(self._schedules[key], self.modules, torch.cat([mb.input_ids for mb in microbatches]),
                                torch.cat([mb.position_ids for mb in microbatches]), images,
                                torch.cat([mb.labels for mb in microbatches]), train=train)
        finally:
            self._loss_fn = None


def parallelize(model: VisionLanguageModel, dims: ParallelDims, *, seed: int | None = 0,
                device: torch.device | str | None = None) -> ParallelModel:
    """Applies PP split → TP/SP → activation checkpointing / compile → FSDP, then materialises.

    ``model`` should be on the meta device. With ``seed`` every parameter gets the value a single
    process would give it (seeded by name), whatever the layout; with ``seed=None`` parameters are
    left uninitialised for a checkpoint load.
    """
    device = torch.device(device or ("cuda" if dims.device_type == "cuda" else "cpu"))
    config = dims.config
    modules: list[nn.Module] = split_stages(model, dims) if dims.layout.pp > 1 else [model]
    for module in modules:
        if dims.layout.tp > 1:
            first = module.first_layer if isinstance(module, StageModel) else "0"
            apply_tensor_parallel(module, dims.tp_mesh, sequence_parallel=config.sequence_parallel,
                                  first_layer=first)
        if config.compile:
            _compile_blocks(module)
        if dims.layout.dp > 1:
            apply_fsdp(module, dims)
        module.to_empty(device=device)
        if seed is not None:
            materialize(module, seed)
    if dims.layout.pp == 1:
        return ParallelModel(modules, dims)

    activation_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32

    def schedule_builder(n_microbatches, batch, seqlen, loss_fn):
        dims.config = dataclasses.replace(config, microbatches=n_microbatches)
        try:
            return build_schedule(modules, dims, loss_fn, device, batch=batch, seqlen=seqlen,
                                  dtype=activation_dtype)
        finally:
            dims.config = config
    return ParallelModel(modules, dims, schedule_builder, TiedEmbeddingSync(modules, dims))


def _compile_blocks(module: nn.Module) -> None:
    blocks = list(module.language.layers.values())
    if getattr(module, "vision", None) is not None:
        blocks += list(module.vision.layers)
    for block in blocks:
        block.compile()


@torch.no_grad()
def materialize(module: nn.Module, seed: int) -> None:
    """Fills each parameter (plain, TP- or FSDP-sharded) with its slice of the single-process init."""
    for name, param in module.named_parameters():
        copy_full_value(param, initial_value(module, name, name, tuple(param.shape), seed))


@torch.no_grad()
def copy_full_value(target: torch.Tensor, full: torch.Tensor) -> None:
    """Writes this rank's slice of the whole value ``full`` into ``target`` (plain, TP- or FSDP-sharded).

    Every rank holds ``full``, so no rank needs to send it (``src_data_rank=None``): each takes its slice.
    """
    if isinstance(target, DTensor):
        local = distribute_tensor(full.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                  target.placements, src_data_rank=None).to_local()
        target.to_local().copy_(local)
    else:
        target.copy_(full)
