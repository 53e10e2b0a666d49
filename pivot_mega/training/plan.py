"""Memory per GPU and FLOPs per step of a run config under a parallel layout: will it fit, and how.

    layouts = candidate_layouts(run_config, gpus_per_node=8, nodes=1)      # valid (ParallelConfig, Layout)
    plan = estimate(run_config, parallel, layout)                           # the busiest rank
    plan.total, plan.params, plan.activations                               # bytes on that rank

Bytes by kind, per rank, from the model config and the sharding rules of ``pivot_mega.parallel``:

- params, grads, optimizer: exact (the tests compare them with what a rank holds after
  ``parallelize`` and one AdamW step). Parameters are the fp32 masters; TP splits the linears as
  ``tensor_parallel.py`` does (column: dim 0 of weight and bias; row: dim 1 of the weight; the
  embedding over the vocabulary; K/V whole when tp > KV heads); FSDP then chunks dim 0 of each local
  tensor over dp_shard as ``torch.chunk`` does (rank 0 gets the largest chunk); a pipeline stage holds
  its share (``pipeline.py``: stage 0 vision, projector and embedding, the last stage the norm and head,
  and with tied embeddings a copy of the embedding). Only trainable towers have gradients and AdamW
  state (two fp32 moments and a 4-byte step per tensor).
- activations: the tensors autograd saves in one micro-batch's forward, counted per block from the
  shapes (see ``_decoder_layer`` and friends), times the micro-batches a pipeline stage holds at once.
  The tests bound the count against saved-tensor bytes measured on CPU.
- working: what FSDP gathers for the compute (the root's parameters and two blocks in flight, with
  their unsharded gradients, in the compute dtype) and the head's log-prob tile. An estimate, not
  measured; neither is the CUDA context, NCCL's buffers or the allocator's fragmentation, which the
  headroom must cover.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..config import ConfigError, ModelConfig
from ..parallel.config import Layout, ParallelConfig, resolve_layout, stage_layer_ranges
from ..profiling import step_flops
from .config import RunConfig

FP32 = 4
# Column-parallel linears (weight and bias split on dim 0) and row-parallel ones (weight on dim 1),
# by the module names ``tensor_parallel.py`` plans them under.
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1", "linear_1", "lm_head")
ROW = ("o_proj", "down_proj", "out_proj", "fc2", "linear_2")
KV = ("k_proj", "v_proj")
FLASH_BACKENDS = ("flash_attn", "varlen", "te", "flex")  # save q, k, v, out and the log-sum-exp only
# The fused log-prob kernel's tile on CUDA (tokens x vocabulary rows: kernels/triton_linear_logprob.py
# TRITON); its fp32 logits and their gradient are the head's only [N, V]-like memory.
LOGPROB_TILE = (8192, 8192)


@dataclasses.dataclass(frozen=True)
class RankCoords:
    """Where a rank sits in the mesh (its dp_replicate index does not change what it holds)."""

    pp: int = 0
    dp_shard: int = 0
    tp: int = 0


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes held by one rank, by kind; ``flops``: model FLOPs of one step over all ranks."""

    parallel: ParallelConfig
    layout: Layout
    activation_checkpointing: bool
    rank: RankCoords
    params: int
    grads: int
    optimizer: int
    reference: int
    activations: int
    working: int
    flops: float

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.reference + self.activations + self.working

    @property
    def name(self) -> str:
        dp = "fsdp" if self.layout.dp_shard > 1 else ("ddp" if self.layout.dp > 1 else "-")
        return (f"tp{self.layout.tp} pp{self.layout.pp} dp{self.layout.dp} {dp:<4} "
                f"ac {'on ' if self.activation_checkpointing else 'off'}")


# ----------------------------------------------------------------------------------------------
# parameters, gradients, optimizer state


def parameter_shapes(model: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of the whole model, built on the meta device (no memory)."""
    from ..models.mllm import VisionLanguageModel  # the one source of the shapes

    with torch.device("meta"):
        module = VisionLanguageModel(dataclasses.replace(model, activation_checkpointing=False))
    return [(name, tuple(p.shape)) for name, p in module.named_parameters()]


def stages_of(name: str, parallel: ParallelConfig, model: ModelConfig) -> set[int]:
    """Pipeline stages (pipeline x virtual) that hold parameter ``name``."""
    ranges = stage_layer_ranges(parallel, model.language.num_hidden_layers)
    last = len(ranges) - 1
    if name.startswith("language.layers."):
        index = int(name.split(".")[2])
        return {s for s, layers in enumerate(ranges) if index in layers}
    if name.startswith("language.embed_tokens."):
        return {0, last} if model.language.tie_word_embeddings else {0}
    if name.startswith(("language.norm.", "language.lm_head.")):
        return {last}
    return {0}  # vision, projector


def tp_local_shape(name: str, shape: tuple[int, ...], tp: int, tp_rank: int, model: ModelConfig) -> tuple[int, ...]:
    """This tp rank's shape of a parameter, as ``apply_tensor_parallel`` splits it."""
    if tp == 1:
        return shape
    module, kind = name.rsplit(".", 2)[-2:]
    if name.startswith("language.layers.") and module in KV and tp > model.language.num_key_value_heads:
        return shape  # ReplicatedKVHeads: whole on every rank
    if module in COLUMN or name == "language.embed_tokens.weight":
        dim = 0
    elif module in ROW and kind == "weight":
        dim = 1
    else:
        return shape  # norms, row-parallel biases, vision embeddings: replicated
    sizes = list(shape)
    sizes[dim] = _chunk(shape[dim], tp, tp_rank)
    return tuple(sizes)


def _chunk(size: int, parts: int, index: int) -> int:
    """Length of chunk ``index`` of ``torch.chunk`` over ``size`` elements in ``parts``."""
    step = math.ceil(size / parts)
    return max(0, min(step, size - index * step))


def local_numel(name: str, shape: tuple[int, ...], layout: Layout, rank: RankCoords, model: ModelConfig) -> int:
    local = tp_local_shape(name, shape, layout.tp, rank.tp, model)
    if layout.dp_shard > 1:  # fully_shard: dim 0 of the (tp-local) tensor chunked over dp_shard
        local = (_chunk(local[0], layout.dp_shard, rank.dp_shard),) + local[1:]
    return math.prod(local)


def state_bytes(model: ModelConfig, parallel: ParallelConfig, layout: Layout, rank: RankCoords,
                trainable: list[str], shapes=None) -> tuple[int, int, int]:
    """(params, grads, optimizer) bytes of ``rank``: fp32 masters, fp32 grads and two fp32 AdamW
    moments of the trainable ones, plus AdamW's fp32 ``step`` per trainable tensor."""
    own = {rank.pp + k * layout.pp for k in range(parallel.virtual_pipeline_stages)}
    params = grads = optimizer = 0
    for name, shape in shapes or parameter_shapes(model):
        copies = len(stages_of(name, parallel, model) & own)  # a tied copy on a stage that is also stage 0
        if not copies:
            continue
        numel = local_numel(name, shape, layout, rank, model) * copies
        params += numel * FP32
        if name.split(".", 1)[0] in trainable:
            grads += numel * FP32
            optimizer += 2 * numel * FP32 + FP32 * copies
    return params, grads, optimizer


# ----------------------------------------------------------------------------------------------
# activations: bytes autograd saves, per token (decoder) or per image token (vision)


@dataclasses.dataclass(frozen=True)
class Widths:
    """Per-rank widths and element sizes the saved tensors have."""

    act: int  # bytes of an activation element: 2 (bf16) or 4 (fp32)
    tp: int
    sequence_parallel: bool
    backend: str  # resolved attention backend family: "flash" or "sdpa"


def _rms_norm(hidden: int, w: Widths, trains: bool) -> float:
    # fp32 input copy (pow) + rsqrt [fp32]; trained: the normalised value cast back (weight * x) and the
    # output, which the next (column-parallel) linear saves, gathered to the whole width under SP.
    norm_width = hidden / w.tp if w.sequence_parallel else hidden
    saved = FP32 * norm_width + FP32 * (1 / w.tp if w.sequence_parallel else 1)
    if trains:
        saved += w.act * norm_width + w.act * hidden
    return saved


def _attention(q_width: float, kv_width: float, heads: float, w: Widths, seqlen: int, groups_repeat: bool) -> float:
    """q, k, v, out and the fp32 log-sum-exp; SDPA with a dense mask repeats K/V to the query heads
    (``_repeat_kv``) and keeps the mask, ``seqlen`` floats per query."""
    if w.backend == "sdpa":
        kv = q_width if groups_repeat else kv_width
        return w.act * (2 * q_width + 2 * kv) + FP32 * heads + FP32 * seqlen
    return w.act * (2 * q_width + 2 * kv_width) + FP32 * heads


def decoder_layer_bytes(model: ModelConfig, w: Widths, seqlen: int, trains: bool) -> float:
    """Bytes saved per token by one Qwen2 layer (``trains``: its weights need gradients)."""
    lang = model.language
    h, heads = lang.hidden_size, lang.num_attention_heads
    kv_heads = max(1, lang.num_key_value_heads // w.tp) if w.tp <= lang.num_key_value_heads else 1
    q_width = h / w.tp
    kv_width = kv_heads * lang.head_dim
    saved = 2 * _rms_norm(h, w, trains)
    saved += _attention(q_width, kv_width, heads / w.tp, w, seqlen, (heads // w.tp) // kv_heads > 1)
    intermediate = lang.intermediate_size / w.tp
    # SwiGLU: gate and up outputs and silu(gate) for the product; the product for down_proj's weight grad.
    saved += w.act * intermediate * (4 if trains else 3)
    return saved


def vision_layer_bytes(model: ModelConfig, w: Widths) -> float:
    """Bytes saved per image token by one SigLIP layer (trained; a frozen tower saves nothing)."""
    v = model.vision
    d, heads = v.hidden_size, v.num_attention_heads
    layer_norms = 2 * (w.act * 2 * d + 2 * FP32)  # input, output; mean and rstd
    attention = w.act * 4 * d / w.tp + FP32 * heads / w.tp
    mlp = w.act * 2 * v.intermediate_size / w.tp  # fc1's output (gelu) and gelu's output (fc2)
    return layer_norms + attention + mlp


def max_images_per_row(model: ModelConfig, seqlen: int) -> int:
    """The most images one packed row can show: each takes ``num_image_tokens`` positions."""
    return max(1, seqlen // model.num_image_tokens)


def activation_bytes(config: RunConfig, parallel: ParallelConfig, layout: Layout, rank: RankCoords, *,
                     act_bytes: int, backend: str, images: int | None = None) -> int:
    """Bytes saved by the forward of the micro-batches ``rank``'s stages hold at once.

    ``images``: distinct images per micro-batch (default: as many as the rows can show).
    """
    model, data = config.model, config.data
    rows, seqlen = data.micro_batch_rows, data.max_seq_len
    tokens = rows * seqlen
    images = rows * max_images_per_row(model, seqlen) if images is None else images
    trainable = config.trainable
    w = Widths(act=act_bytes, tp=layout.tp, sequence_parallel=parallel.sequence_parallel, backend=backend)
    ranges = stage_layer_ranges(parallel, model.language.num_hidden_layers)
    checkpointing = model.activation_checkpointing
    own = [rank.pp + k * layout.pp for k in range(parallel.virtual_pipeline_stages)]
    lang = model.language
    h = lang.hidden_size
    residual = act_bytes * (h / layout.tp if parallel.sequence_parallel else h)
    per_stage = []
    for stage in own:
        saved = 0.0
        language_trains = "language" in trainable
        for index in ranges[stage]:
            full = decoder_layer_bytes(model, w, seqlen, language_trains) * tokens
            saved += residual * tokens if checkpointing and index % model.checkpoint_every == 0 else full
        if stage == 0:
            saved += tokens * (8 + 1)  # token ids (int64) and the image-position mask
            vision_image_tokens = images * model.num_image_tokens
            if "vision" in trainable:
                v = model.vision
                saved += images * v.num_channels * v.image_size ** 2 * act_bytes  # patch embedding input
                for index in range(v.num_layers_built):
                    ckpt = checkpointing and index % model.checkpoint_every == 0
                    saved += vision_image_tokens * (act_bytes * v.hidden_size if ckpt else vision_layer_bytes(model, w))
            if "vision" in trainable or "projector" in trainable:
                # projector: its input, linear_1's output (exact gelu) and gelu's output
                saved += vision_image_tokens * act_bytes * (model.vision.hidden_size + 2 * h / layout.tp)
        if ranges[stage].start == 0 or stage == 0:
            saved += 2 * FP32 * tokens * lang.head_dim  # RoPE cos and sin, shared by the layers
        if stage == len(ranges) - 1:
            saved += tokens * (2 * FP32 * h + FP32 + act_bytes * h)  # final norm, and its output at the head
        per_stage.append(saved)
    # With checkpointing, backward recomputes one block at a time on top of what is kept.
    recompute = decoder_layer_bytes(model, w, seqlen, True) * tokens if checkpointing else 0.0
    in_flight = in_flight_microbatches(parallel, layout, rank.pp)
    return int(sum(per_stage) / len(per_stage) * in_flight + recompute)


def in_flight_microbatches(parallel: ParallelConfig, layout: Layout, pp_rank: int) -> float:
    """Micro-batch forwards of all this rank's stages held at the peak (in units of all its stages):
    1F1B: pp - rank (the warm-up); GPipe: every micro-batch; interleaved: Megatron's warm-up count
    over the virtual stages."""
    pp, m, v = layout.pp, max(parallel.microbatches, layout.pp), parallel.virtual_pipeline_stages
    if pp == 1:
        return 1
    if parallel.pipeline_schedule == "gpipe":
        return m * 1.0
    if parallel.pipeline_schedule == "interleaved_1f1b":
        # each chunk forward holds one stage's share, the unit this count is multiplied by
        return min(m * v, (pp - pp_rank - 1) * 2 + (v - 1) * pp + 1)
    return min(m, pp - pp_rank)


# ----------------------------------------------------------------------------------------------
# the estimate of one rank, and of the busiest


def compute_dtype_bytes(parallel: ParallelConfig) -> int:
    return 2 if parallel.mixed_precision == "bf16" else 4


def resolved_backend(model: ModelConfig, device_type: str) -> str:
    """Attention family: ``flash`` (varlen / flash / TE / flex kernels: no mask, K/V not repeated) or
    ``sdpa`` (a dense mask). ``auto`` on CUDA picks a varlen kernel for packed rows."""
    if model.attention in FLASH_BACKENDS or (model.attention == "auto" and device_type == "cuda"):
        return "flash"
    return "sdpa"


def step_model_flops(config: RunConfig) -> float:
    """Model FLOPs of one step (``profiling.step_flops``): ``global_batch_size`` samples, each a full row
    of ``max_seq_len`` tokens, one causal segment, every position labelled, one image; plus the online
    reference's forward."""
    from ..profiling import forward_flops

    samples, seqlen = config.train.global_batch_size, config.data.max_seq_len
    shape = dict(num_images=samples, num_tokens=samples * seqlen,
                 attention_pairs=samples * seqlen * (seqlen + 1) // 2, num_labels=samples * seqlen)
    flops = step_flops(config.model, trainable=tuple(config.trainable), **shape).total
    if config.stage == "dpo" and not config.dpo.reads_precomputed:
        flops += forward_flops(config.model, **shape).total
    return flops


def estimate(config: RunConfig, parallel: ParallelConfig, layout: Layout, rank: RankCoords | None = None, *,
             device_type: str = "cuda", images: int | None = None, shapes=None) -> MemoryEstimate:
    """Bytes per kind on ``rank`` (None: the rank with the largest total) under ``parallel`` / ``layout``."""
    if config.model is None:
        raise ConfigError("plan: the run config needs a model section (init_from alone gives no shapes here)")
    shapes = shapes or parameter_shapes(config.model)
    if rank is None:
        ranks = [RankCoords(pp=p, tp=t) for p in range(layout.pp) for t in range(layout.tp)]
        return max((estimate(config, parallel, layout, r, device_type=device_type, images=images, shapes=shapes)
                    for r in ranks), key=lambda e: e.total)
    trainable = config.trainable
    params, grads, optimizer = state_bytes(config.model, parallel, layout, rank, trainable, shapes)
    reference = 0
    if config.stage == "dpo" and not config.dpo.reads_precomputed:
        reference = state_bytes(config.model, parallel, layout, rank, [], shapes)[0]
    act_bytes = compute_dtype_bytes(parallel)
    activations = activation_bytes(config, parallel, layout, rank, act_bytes=act_bytes,
                                   backend=resolved_backend(config.model, device_type), images=images)
    working = _working_bytes(config, parallel, layout, rank, shapes, act_bytes)
    return MemoryEstimate(parallel=parallel, layout=layout,
                          activation_checkpointing=config.model.activation_checkpointing, rank=rank,
                          params=params, grads=grads, optimizer=optimizer, reference=reference,
                          activations=activations, working=working, flops=step_model_flops(config))


def _working_bytes(config: RunConfig, parallel, layout, rank, shapes, act_bytes: int) -> int:
    """FSDP's gathered copies (the root kept gathered, two blocks in flight) and their unsharded
    gradients before reduce-scatter, in the compute dtype; the head's fp32 log-prob chunk."""
    model = config.model
    lang = model.language
    tokens, vocab = LOGPROB_TILE
    working = 2 * tokens * min(vocab, lang.vocab_size // layout.tp) * FP32
    if layout.dp_shard > 1:
        gathered = dataclasses.replace(layout, dp_shard=1, dp_replicate=1)
        own = {rank.pp + k * layout.pp for k in range(parallel.virtual_pipeline_stages)}
        block, root = {}, 0
        for name, shape in shapes:
            if not stages_of(name, parallel, model) & own:
                continue
            numel = local_numel(name, shape, gathered, rank, model)
            parts = name.split(".")
            if parts[1] == "layers":
                block[".".join(parts[:3])] = block.get(".".join(parts[:3]), 0) + numel
            else:
                root += numel
        working += act_bytes * (root + 2 * 2 * max(block.values(), default=0))
    return int(working)


# ----------------------------------------------------------------------------------------------
# layouts


def candidate_layouts(config: RunConfig, gpus_per_node: int, nodes: int = 1) -> list[tuple[ParallelConfig, Layout]]:
    """Every layout ``resolve_layout`` accepts for ``gpus_per_node x nodes`` ranks: tp within a node,
    pp and dp over the rest, dp sharded (FSDP) or replicated. The config's other parallel keys are kept;
    pipeline micro-batches are at least pp (train takes as many as the global batch needs)."""
    world = gpus_per_node * nodes
    base = config.parallel
    out, seen = [], set()
    for tp in (t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0):
        for pp in (p for p in range(1, world // tp + 1) if (world // tp) % p == 0):
            for sharding in ("fsdp", "replicate"):
                parallel = dataclasses.replace(
                    base, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                    data_parallel_sharding=sharding, microbatches=max(base.microbatches, pp),
                    data_parallel_replicate_size=base.data_parallel_replicate_size if sharding == "fsdp" else 1,
                    pipeline_layout=base.pipeline_layout if pp == base.pipeline_model_parallel_size else [],
                    sequence_parallel=base.sequence_parallel and tp > 1)
                try:
                    layout = resolve_layout(parallel, config.model, world)
                except ConfigError:
                    continue
                if layout not in seen:
                    seen.add(layout)
                    out.append((parallel, layout))
    return out


def plan_layouts(config: RunConfig, gpus_per_node: int, nodes: int = 1, *, device_type: str = "cuda",
                 images_per_row: int | None = None) -> list[MemoryEstimate]:
    """The busiest rank's estimate of every valid layout, activation checkpointing off and on.
    ``images_per_row``: images a packed row shows (default: as many as fit, the worst case)."""
    if config.model is None:
        raise ConfigError("plan: the run config needs a model section (init_from alone gives no shapes here)")
    shapes = parameter_shapes(config.model)
    layouts = candidate_layouts(config, gpus_per_node, nodes)
    if not layouts:
        raise ConfigError(f"plan: no parallel layout of {gpus_per_node * nodes} GPUs suits this model "
                          f"(resolve_layout refused every tp x pp)")
    estimates = []
    for checkpointing in (False, True):
        run = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                     activation_checkpointing=checkpointing))
        images = None if images_per_row is None else images_per_row * config.data.micro_batch_rows
        estimates += [estimate(run, parallel, layout, device_type=device_type, images=images, shapes=shapes)
                      for parallel, layout in layouts]
    return estimates


def recommend(estimates: list[MemoryEstimate], capacity: int) -> MemoryEstimate | None:
    """The layout that fits with the most headroom (ties: less model parallelism, no recompute)."""
    fits = [e for e in estimates if e.total <= capacity]
    return min(fits, key=lambda e: (e.total, e.layout.tp * e.layout.pp, e.activation_checkpointing), default=None)


def parse_memory(text: str) -> int:
    """``80GB`` / ``80`` → 80e9 bytes; ``80GiB`` → 80 x 2^30."""
    value = text.strip().upper()
    scale = 2 ** 30 if value.endswith("GIB") else 10 ** 9
    number = value.removesuffix("GIB").removesuffix("GB")
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ConfigError(f"--gpu-memory {text!r}: give a size such as 80GB or 141GiB") from None


def format_table(estimates: list[MemoryEstimate], capacity: int) -> str:
    gb = 1e9
    header = (f"{'layout':<28}{'params':>8}{'grads':>8}{'optim':>8}{'ref':>7}{'activ':>8}{'work':>7}"
              f"{'total':>8}{'headroom':>10}  (GB per GPU, busiest rank)")
    lines = [header]
    for e in estimates:
        lines.append(f"{e.name:<28}{e.params / gb:>8.2f}{e.grads / gb:>8.2f}{e.optimizer / gb:>8.2f}"
                     f"{e.reference / gb:>7.2f}{e.activations / gb:>8.2f}{e.working / gb:>7.2f}"
                     f"{e.total / gb:>8.2f}{(capacity - e.total) / gb:>10.2f}"
                     f"{'' if e.total <= capacity else '  no fit'}")
    lines.append(f"model FLOPs per step: {estimates[0].flops / 1e12:,.1f} TFLOP (every layout)")
    return "\n".join(lines)
