"""Parallelism on one DeviceMesh: tensor + sequence, pipeline, and sharded or replicated data parallel.

    dims = build_mesh(parallel_config, model_config)          # checks the layout first
    with torch.device("meta"):
        model = VisionLanguageModel(model_config)
    pmodel = parallelize(model, dims, seed=0)                 # PP split -> AC -> TP -> compile -> FSDP -> materialise
    out = pmodel.forward_backward(microbatches, loss_fn)      # 1F1B etc. when pipelined; out.loss

The model stays a plain nn.Module; everything here is applied from outside (torchtitan's split).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint as composable_checkpoint
from torch.distributed.tensor import DTensor, distribute_tensor

from ..batch import IGNORE_INDEX, MicroBatch
from ..models.mllm import VisionLanguageModel, initial_value
from ..profiling import nvtx_range
from .config import Layout, ParallelConfig, resolve_layout, stage_layer_ranges
from .data_parallel import apply_fsdp
from .loss import global_scale, head_shard, lm_loss, token_logprobs
from .mesh import LaunchEnv, ParallelDims, build_mesh, detect_launch, init_distributed
from .pipeline import PipelineStageModule, StageBatches, TiedEmbeddingSync, build_schedule, run_schedule, split_stages
from .tensor_parallel import apply_tensor_parallel

__all__ = [
    "IGNORE_INDEX", "LaunchEnv", "Layout", "MicroBatch", "ParallelConfig", "ParallelDims", "ParallelModel", "StepOutputs",
    "build_mesh", "copy_full_value", "detect_launch", "global_scale", "head_shard", "init_distributed", "lm_loss", "parallelize", "resolve_layout",
    "stage_layer_ranges", "token_logprobs",
]


@dataclasses.dataclass
class StepOutputs:
    """What ``forward_backward`` / ``forward_only`` return.

    loss: the summed losses of the micro-batches (on every rank; zero for ``forward_only``).
    outputs: the loss function's second return value (or its value, for ``forward_only``) per
        micro-batch, in micro-batch order, on the ranks that compute losses (see ``holds_loss``);
        empty elsewhere. The caller adds them up.
    """

    loss: torch.Tensor
    outputs: list


class ParallelModel:
    """The parallelised model of this rank: one module, or its pipeline stages and their schedule.

    ``modules`` are VisionLanguageModels (the whole model, or this rank's stage shares, with the
    whole model's parameter names); ``stages`` their pipeline wrappers when pipelined.
    """

    def __init__(self, modules: list[nn.Module], dims: ParallelDims, stages: list[PipelineStageModule] = (),
                 schedule_builder=None, tied_sync=None):
        self.modules, self.dims, self.stages = modules, dims, list(stages)
        self._schedule_builder, self._tied_sync = schedule_builder, tied_sync
        self._schedules: dict = {}
        self._loss_fn = None  # the call in progress: cached schedules call it

    def named_parameters(self):
        for module in self.modules:
            yield from module.named_parameters()

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def train(self, mode: bool = True) -> "ParallelModel":
        for module in self.modules:
            module.train(mode)
        return self

    @staticmethod
    def head_weight(module: nn.Module) -> torch.Tensor:
        return module.language.head_weight

    @property
    def holds_loss(self) -> bool:
        """Whether this rank computes losses (every rank without pipelining; the last stage with)."""
        return self.dims.layout.pp == 1 or any(stage.last for stage in self.stages)

    def tied_head_copies(self) -> list[torch.Tensor]:
        """The last pipeline stage's copy of a tied embedding (its gradient duplicates stage 0's)."""
        return [stage.model.language.embed_tokens.weight for stage in self.stages
                if stage.last and not stage.first and stage.model.language.embed_tokens is not None]

    def forward_backward(self, microbatches: list[MicroBatch], loss_fn) -> StepOutputs:
        """Forward and backward over the micro-batches, gradients accumulated.

        ``loss_fn(hidden [b, S, H], head_weight, microbatch)`` returns the loss (a scalar, already
        normalised over the global batch, as ``lm_loss`` is) or ``(loss, output)``. It runs where
        the loss is computed (see ``holds_loss``), once per micro-batch.
        """
        if self.dims.layout.pp == 1:
            model = self.modules[0]
            total = torch.zeros((), device=microbatches[0].input_ids.device)
            outputs = []
            for i, mb in enumerate(microbatches):
                if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce once, after the last one
                    model.set_requires_gradient_sync(i == len(microbatches) - 1)
                loss, output = _split_loss(loss_fn(self._hidden(model, mb), self.head_weight(model), mb))
                with nvtx_range("backward"):
                    loss.backward()
                total += loss.detach()
                outputs.append(output)
            return StepOutputs(total, outputs if _any_output(outputs) else [])
        losses, outputs = self._pipelined(microbatches, loss_fn, train=True)
        self._tied_sync()
        total = torch.stack(losses).sum() if losses else torch.zeros((), device=microbatches[0].input_ids.device)
        dist.all_reduce(total, group=self.dims.pp_group)  # only the last stage holds losses
        return StepOutputs(total, outputs if _any_output(outputs) else [])

    @torch.no_grad()
    def forward_only(self, microbatches: list[MicroBatch], output_fn) -> StepOutputs:
        """Forward without gradients (a frozen reference model): ``output_fn(hidden, head_weight,
        microbatch)`` per micro-batch where ``holds_loss``; it may return any tensor."""
        if self.dims.layout.pp == 1:
            model = self.modules[0]
            outputs = [output_fn(self._hidden(model, mb), self.head_weight(model), mb) for mb in microbatches]
        else:
            outputs, _ = self._pipelined(microbatches, output_fn, train=False)  # its values come back as losses
        return StepOutputs(torch.zeros(()), outputs)

    @staticmethod
    def _hidden(model: nn.Module, mb: MicroBatch) -> torch.Tensor:
        return model(mb.input_ids, mb.images, packed=mb.packed, image_index=mb.image_index, return_hidden=True)

    def _pipelined(self, microbatches: list[MicroBatch], loss_fn, *, train: bool) -> tuple[list, list]:
        """→ (losses, outputs) of the micro-batches on the last stage, in micro-batch order."""
        last = next((stage.model for stage in self.stages if stage.last), None)
        batch, seqlen = microbatches[0].shape
        if any(mb.shape != (batch, seqlen) for mb in microbatches):
            raise ValueError("pipeline parallelism needs micro-batches of equal shape, got "
                             f"{[mb.shape for mb in microbatches]}")
        key = (len(microbatches), batch, seqlen)
        if key not in self._schedules:
            self._schedules[key] = self._schedule_builder(len(microbatches), batch, seqlen,
                                                          lambda output, rows: self._loss_fn(output, rows))
        table = StageBatches(microbatches)
        results: dict[int, tuple] = {}

        def stage_loss(hidden, rows):
            index = table.index_of(rows)
            loss, output = _split_loss(loss_fn(hidden, self.head_weight(last), microbatches[index]))
            results[index] = (loss.detach() if isinstance(loss, torch.Tensor) else loss, output)
            return loss

        self._loss_fn = stage_loss
        try:
            run_schedule(self._schedules[key], self.stages, microbatches, train=train)
        finally:
            self._loss_fn = None
        ordered = [results[i] for i in sorted(results)]
        return [loss for loss, _ in ordered], [output for _, output in ordered]


def _split_loss(value) -> tuple:
    return value if isinstance(value, tuple) else (value, None)


def _any_output(outputs: list) -> bool:
    return any(output is not None for output in outputs)


def parallelize(model: VisionLanguageModel, dims: ParallelDims, *, seed: int | None = 0,
                device: torch.device | str | None = None) -> ParallelModel:
    """Applies PP split → activation checkpointing → TP/SP → compile → FSDP, then materialises.

    ``model`` should be on the meta device. With ``seed`` every parameter gets the value a single
    process would give it (seeded by name), whatever the layout; with ``seed=None`` parameters are
    left uninitialised for a checkpoint load.
    """
    device = torch.device(device or ("cuda" if dims.device_type == "cuda" else "cpu"))
    config = dims.config
    stages = split_stages(model, dims) if dims.layout.pp > 1 else []
    modules: list[nn.Module] = [stage.model for stage in stages] or [model]
    for module, root in zip(modules, stages or [None]):
        if model.config.activation_checkpointing:
            apply_activation_checkpointing(module, model.config.checkpoint_every)
        if dims.layout.tp > 1:
            # The first decoder layer that receives the (replicated) embeddings, on the stage that embeds.
            first = next(iter(module.language.layers), None) if module.vision is not None else None
            apply_tensor_parallel(module, dims.tp_mesh, sequence_parallel=config.sequence_parallel,
                                  first_layer=first)
        if config.compile:
            _compile_blocks(module)
        if dims.layout.dp > 1:
            apply_fsdp(module, dims, root=root)
        module.to_empty(device=device)
        if seed is not None:
            materialize(module, seed)
    if dims.layout.pp == 1:
        return ParallelModel(modules, dims)

    activation_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32

    def schedule_builder(n_microbatches, batch, seqlen, loss_fn):
        dims.config = dataclasses.replace(config, microbatches=n_microbatches)
        try:
            return build_schedule(stages, dims, loss_fn, device, batch=batch, seqlen=seqlen,
                                  dtype=activation_dtype)
        finally:
            dims.config = config
    return ParallelModel(modules, dims, stages, schedule_builder, TiedEmbeddingSync(stages, dims))


def apply_activation_checkpointing(module: nn.Module, every: int) -> None:
    """Recomputes in backward the activations of every ``every``-th SigLIP and Qwen2 block (counted in
    the whole model: a pipeline stage's decoder layers keep their keys); nothing when grad is disabled.

    torch's composable ``checkpoint`` works through forward hooks, so parameter names (they seed the
    init and key the checkpoints) stay as they are. Apply it before TP and FSDP, so that their hooks
    run inside the checkpointed region and the recompute starts from the block's own inputs (applied
    after TP, it would re-shard the first layer's already sequence-sharded input).
    """
    blocks = [(int(key), block) for key, block in module.language.layers.items()]
    if getattr(module, "vision", None) is not None:
        blocks += list(enumerate(module.vision.layers))
    for index, block in blocks:
        if index % every == 0:
            composable_checkpoint(block)


def _compile_blocks(module: nn.Module) -> None:
    """``torch.compile`` per block (a tower's blocks share one code object and its graphs): after AC and
    TP, whose hooks and DTensors it traces, before FSDP, as torchtitan does.

    Decoder blocks see the loader's fixed ``[R, S, H]``; only the varlen layout (cu_seqlens,
    max_seqlen) varies, made dynamic by torch at its first change. Vision blocks see ``[U, T, D]``, U
    the micro-batch's distinct images, new nearly every step: U alone is marked dynamic as it enters
    them (``dynamic=True`` would make T and D symbolic too, which TP's DTensors cannot trace), so one
    graph serves every U >= 2 (another U = 1, which torch specialises) per grad mode, well inside
    dynamo's recompile limit (8 graphs per code object; past it a block runs eagerly).
    """
    for block in module.language.layers.values():
        block.compile()
    if getattr(module, "vision", None) is not None:
        module.vision.embeddings.register_forward_hook(_images_dynamic)
        for block in module.vision.layers:
            block.compile()


def _images_dynamic(embeddings: nn.Module, args, patches: torch.Tensor) -> None:
    # On the uncompiled embeddings: marks set inside a compiled block's hooks are not allowed.
    torch._dynamo.maybe_mark_dynamic(patches, 0)


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
