"""Parallel layout config (Megatron's names) and its validation against the model and the world."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..config import ConfigError, ModelConfig

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclasses.dataclass
class ParallelConfig:
    """How a run spreads over its ranks.

    The data-parallel size is what is left: world / (tensor x pipeline). ``data_parallel_sharding``
    says whether those ranks shard parameters, gradients and optimizer state (``fsdp``, ZeRO-3 style;
    with ``data_parallel_replicate_size`` > 1 the shards are replicated in groups: HSDP) or hold full
    replicas (``replicate``, DDP style).
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_sharding: Literal["fsdp", "replicate"] = "fsdp"
    data_parallel_replicate_size: int = 1
    sequence_parallel: bool = False
    # Pipeline: stages per rank (> 1 selects interleaved 1F1B), explicit decoder layers per stage
    # (empty: an even split), and micro-batches per step (for `pivot-mega train` the minimum: a step
    # takes as many loader micro-batches as its global batch needs, and at least pp).
    virtual_pipeline_stages: int = 1
    pipeline_layout: list = dataclasses.field(default_factory=list)
    pipeline_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe"] = "1f1b"
    microbatches: int = 1
    # FSDP: keep parameters gathered between forward and backward (more memory, less communication).
    reshard_after_forward: bool = True
    # bf16 parameters / gradient reduction with fp32 master weights, where the device supports it.
    mixed_precision: Literal["bf16", "fp32"] = "fp32"
    compile: bool = False
    # Seconds a collective waits for the other ranks before it fails (every process group of the run):
    # a rank that hangs or died then stops the job with an error instead of holding every GPU.
    timeout_s: float = 600.0

    def validate(self, where: str = "parallel") -> "ParallelConfig":
        if not self.timeout_s > 0:
            raise ConfigError(f"{where}.timeout_s: must be > 0 seconds, got {self.timeout_s}")
        return self


@dataclasses.dataclass(frozen=True)
class Layout:
    """Resolved mesh sizes, in mesh order (pp, dp_replicate, dp_shard, tp)."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in DIM_NAMES)


def resolve_layout(parallel: ParallelConfig, model: ModelConfig, world_size: int) -> Layout:
    """Checks every size against the world and the model; one ConfigError lists all problems."""
    parallel.validate()
    problems = []
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("data_parallel_replicate_size", parallel.data_parallel_replicate_size),
                        ("virtual_pipeline_stages", parallel.virtual_pipeline_stages),
                        ("microbatches", parallel.microbatches)):
        if value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
    if problems:
        raise ConfigError("parallel layout: " + "; ".join(problems))
    if world_size % (tp * pp):
        problems.append(f"tensor_model_parallel_size {tp} x pipeline_model_parallel_size {pp} = {tp * pp} "
                        f"does not divide the world size {world_size}")
    dp = max(1, world_size // (tp * pp))
    replicate = parallel.data_parallel_replicate_size
    if parallel.data_parallel_sharding == "replicate":
        if replicate not in (1, dp):
            problems.append(f"data_parallel_replicate_size {replicate} is only for data_parallel_sharding: fsdp")
        layout = Layout(pp=pp, dp_replicate=dp, dp_shard=1, tp=tp)
    else:
        if dp % replicate:
            problems.append(f"data_parallel_replicate_size {replicate} does not divide the data-parallel size {dp}")
        layout = Layout(pp=pp, dp_replicate=replicate, dp_shard=max(1, dp // replicate), tp=tp)

    language, vision = model.language, model.vision
    for tower, heads in (("language", language.num_attention_heads), ("vision", vision.num_attention_heads)):
        if heads % tp:
            problems.append(f"model.{tower}.num_attention_heads {heads} is not divisible by "
                            f"tensor_model_parallel_size {tp}")
    kv = language.num_key_value_heads
    if kv % tp and tp % kv:
        problems.append(f"model.language.num_key_value_heads {kv} and tensor_model_parallel_size {tp}: one must "
                        f"divide the other (KV heads are split when tp <= {kv}, replicated when tp > {kv})")
    for name, size in (("language.intermediate_size", language.intermediate_size),
                       ("vision.intermediate_size", vision.intermediate_size),
                       ("language.vocab_size", language.vocab_size)):
        if size % tp:
            problems.append(f"model.{name} {size} is not divisible by tensor_model_parallel_size {tp}")
    if parallel.sequence_parallel and tp == 1:
        problems.append("sequence_parallel needs tensor_model_parallel_size > 1")

    stages = pp * parallel.virtual_pipeline_stages
    layers = language.num_hidden_layers
    if parallel.pipeline_layout:
        if len(parallel.pipeline_layout) != stages or sum(parallel.pipeline_layout) != layers or \
                min(parallel.pipeline_layout) < 1:
            problems.append(f"pipeline_layout {parallel.pipeline_layout} must give {stages} stages "
                            f"(pipeline x virtual) of >= 1 decoder layers summing to {layers}")
    elif layers % stages:
        problems.append(f"model.language.num_hidden_layers {layers} cannot be split evenly into {stages} pipeline "
                        f"stages (pipeline {pp} x virtual {parallel.virtual_pipeline_stages}); set pipeline_layout")
    if parallel.virtual_pipeline_stages > 1 and parallel.pipeline_schedule != "interleaved_1f1b":
        problems.append(f"virtual_pipeline_stages {parallel.virtual_pipeline_stages} needs "
                        f"pipeline_schedule: interleaved_1f1b")
    if pp > 1 and parallel.microbatches < pp:
        problems.append(f"microbatches {parallel.microbatches} must be >= pipeline_model_parallel_size {pp} "
                        f"to keep every stage busy")
    if problems:
        raise ConfigError("parallel layout for world size "
                          f"{world_size}:\n  " + "\n  ".join(problems))
    return layout


def stage_layer_ranges(parallel: ParallelConfig, num_layers: int) -> list[range]:
    """Decoder-layer index range of every pipeline stage, in stage order."""
    stages = parallel.pipeline_model_parallel_size * parallel.virtual_pipeline_stages
    counts = parallel.pipeline_layout or [num_layers // stages] * stages
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(start, start + count) for start, count in zip(starts, counts)]
