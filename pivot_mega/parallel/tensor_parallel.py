"""Tensor and sequence parallelism: Megatron's column/row split as DTensor plans, applied from outside.

Per decoder layer: q/k/v and gate/up are column-parallel (heads / MLP columns split over the tp
ranks), o_proj and down_proj row-parallel. With sequence parallelism the residual stream between
blocks is split along the sequence, norms run on their slice, and the all-reduce after each
row-parallel layer becomes reduce-scatter + all-gather. SigLIP layers and the projector get the same
column/row split (the vision tower is not sequence-parallel: 576 tokens per image do not pay for
it). The token embedding and the LM head are split over the vocabulary; log-probs are then computed
vocab-parallel (``pivot_mega.parallel.loss``), never gathering ``[N, V]`` logits.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput,
                                               PrepareModuleOutput, RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from ..kernels.linear_logprob import sum_grad_over_group
from ..models.mllm import VisionLanguageModel


class ReplicatedKVHeads(ParallelStyle):
    """K or V projection when tp > num_key_value_heads: every rank computes all KV heads (they are few)
    and keeps the one its query heads use.

    The weights stay whole on every rank. Each rank's gradient reaches only its own head's columns,
    so the output gradient is summed over the tp group before the weight gradient is formed: every
    rank then holds the same, complete weight gradient (Megatron replicates KV heads the same way).
    """

    def __init__(self, head_dim: int, num_kv_heads: int, tp_size: int):
        super().__init__()
        self.head_dim, self.num_kv_heads, self.tp_size = head_dim, num_kv_heads, tp_size

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        group = device_mesh.get_group()
        head = device_mesh.get_local_rank() * self.num_kv_heads // self.tp_size
        columns = slice(head * self.head_dim, (head + 1) * self.head_dim)

        def to_local_input(mod, args):
            return tuple(a.to_local() if isinstance(a, DTensor) else a for a in args)

        def keep_own_head(mod, args, out):
            return sum_grad_over_group(out, group)[..., columns]

        module.register_forward_pre_hook(to_local_input)
        module.register_forward_hook(keep_own_head)
        return module


def _attention_plan(prefix: str, kv_style, sequence_parallel: bool) -> dict:
    plan = {f"{prefix}.q_proj": ColwiseParallel(), f"{prefix}.k_proj": kv_style, f"{prefix}.v_proj": kv_style}
    if sequence_parallel:
        plan[prefix] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                          desired_input_layouts=(Replicate(), None, None, None))
    return plan


def language_layer_plan(model: VisionLanguageModel, tp_size: int, sequence_parallel: bool) -> dict:
    config = model.config.language
    kv_heads = config.num_key_value_heads
    kv_style = ColwiseParallel() if tp_size <= kv_heads else ReplicatedKVHeads(config.head_dim, kv_heads, tp_size)
    row_out = dict(output_layouts=Shard(1)) if sequence_parallel else {}
    plan = _attention_plan("self_attn", kv_style, sequence_parallel)
    plan.update({"self_attn.o_proj": RowwiseParallel(**row_out), "mlp.gate_proj": ColwiseParallel(),
                 "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(**row_out)})
    if sequence_parallel:
        plan.update({"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
                     "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))})
    return plan


VISION_LAYER_PLAN = {
    "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
    "self_attn.v_proj": ColwiseParallel(), "self_attn.out_proj": RowwiseParallel(),
    "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel(),
}


def apply_tensor_parallel(model: nn.Module, tp_mesh, *, sequence_parallel: bool,
                          first_layer: str | None) -> None:
    """Parallelises ``model`` (a VisionLanguageModel or a pipeline stage of one) in place.

    ``first_layer`` is the key of the decoder layer that receives the (replicated) embeddings, where
    the sequence is split for sequence parallelism; None when this model holds no embeddings.
    """
    tp = tp_mesh.size()
    if getattr(model, "vision", None) is not None:
        for layer in model.vision.layers:
            parallelize_module(layer, tp_mesh, VISION_LAYER_PLAN)
    if getattr(model, "projector", None) is not None:
        parallelize_module(model.projector, tp_mesh, {"linear_1": ColwiseParallel(), "linear_2": RowwiseParallel()})
    language = model.language
    if language.embed_tokens is not None:
        # Vocab-parallel lookup; the sum over ranks gives every rank the whole (replicated) embedding, so
        # image features can be spliced in before the sequence is split.
        parallelize_module(language.embed_tokens, tp_mesh,
                           RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    if language.lm_head is not None:
        parallelize_module(language.lm_head, tp_mesh, ColwiseParallel())  # weight split over the vocabulary
    plan = language_layer_plan(model, tp, sequence_parallel)
    for key, layer in language.layers.items():
        parallelize_module(layer, tp_mesh, plan)
        if sequence_parallel and key == first_layer:
            parallelize_module(layer, tp_mesh, PrepareModuleInput(
                input_layouts=(Replicate(), None, None, None), desired_input_layouts=(Shard(1), None, None, None),
                use_local_output=True))
    if sequence_parallel and language.norm is not None:
        parallelize_module(language.norm, tp_mesh, SequenceParallel())
        # The head needs every position: gather the sequence back after the final norm.
        parallelize_module(language.norm, tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))
