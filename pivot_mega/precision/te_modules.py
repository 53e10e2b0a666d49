"""Transformer Engine module surgery for ``precision.backend: te`` (CUDA, TE importable: NGC PyTorch
containers ship it).

- default (``te_fuse_norms: false``): every tower ``nn.Linear`` → ``te.Linear``, ``RMSNorm`` →
  ``te.RMSNorm``, ``nn.LayerNorm`` → ``te.LayerNorm``, attention → ``te.DotProductAttention``
  (``model.attention: auto`` becomes ``te``). Parameter names stay exactly those of the torch model
  (``weight``/``bias`` under the same module paths), so checkpoints, init by name, optimizer groups
  and HF conversion work unchanged.
- ``te_fuse_norms: true``: each norm is computed by the layer that reads it: q/k/v by one
  ``te.LayerNormLinear`` (``self_attn.qkv``), each MLP by one ``te.LayerNormMLP`` (``mlp.fused``:
  Qwen2's RMSNorm → ``[gate; up]`` → SwiGLU → down; SigLIP's LayerNorm → fc1 → tanh-GELU → fc2, TE's
  ``gelu`` being the tanh form SigLIP uses); ``o_proj`` / ``out_proj`` become ``te.Linear``. The fused
  modules own no parameters: they compute with the torch model's, which stay where they were (the
  norms become pass-through holders of their weights, q/k/v, gate/up/down and fc1/fc2 holders of
  theirs), so names are unchanged in this mode too. The price is a copy per call of the weights a
  fused GEMM joins (q/k/v, gate/up), as TE's own split parameters also cost.

The projector and the LM head stay in the torch modules: the projector is under 1 % of the FLOPs and
is the only trained part in stage 1a, and the head is read as a weight by the fused log-prob kernel,
never called as a module.

Tensor parallelism: torch's DTensor plans (``ColwiseParallel`` ...) apply to ``nn.Linear`` and
``nn.Embedding`` only, so ``backend: te`` runs with ``tensor_model_parallel_size: 1`` (FSDP2 / HSDP /
replicated data parallelism and pipelining work); for FP8 with tensor parallelism use
``fp8: torchao``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.layers import RMSNorm
from ..models.qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2MLP
from ..models.siglip import SiglipAttention, SiglipEncoderLayer


def convert_to_te(model: nn.Module, te, *, fuse_norms: bool = False) -> None:
    """Swaps the towers' linears, norms and attention for ``te`` (``transformer_engine.pytorch``) modules.

    Written to TE's documented module API (``Linear``, ``LayerNorm``, ``RMSNorm``, ``LayerNormLinear``
    with ``parameters_split``, ``LayerNormMLP``); ``te`` is passed in so the selection and naming logic
    is testable without TE. Attention modules whose backend is ``auto`` switch to ``te``
    (``te.DotProductAttention``, see ``layers.py``); an explicit ``model.attention`` is kept.
    """
    for layer in list(model.language.layers.values()) if model.language is not None else []:
        _convert_block(layer, te, fuse_norms)
    vision = getattr(model, "vision", None)
    for layer in list(vision.layers) if vision is not None else []:
        _convert_block(layer, te, fuse_norms)
    norm = getattr(model.language, "norm", None) if model.language is not None else None
    if norm is not None:
        model.language.norm = _te_norm(norm, te)


def _convert_block(layer: nn.Module, te, fuse_norms: bool) -> None:
    if layer.self_attn.backend == "auto":
        layer.self_attn.backend = "te"
    if not fuse_norms:
        for name, child in list(layer.named_modules()):
            if isinstance(child, nn.Linear):
                _replace(layer, name, _te_linear(child, te))
            elif isinstance(child, (RMSNorm, nn.LayerNorm)):
                _replace(layer, name, _te_norm(child, te))
        return
    if isinstance(layer, Qwen2DecoderLayer):
        layer.input_layernorm = FusedNorm(layer.input_layernorm)
        layer.self_attn = FusedQwen2Attention(layer.self_attn, layer.input_layernorm, te)
        layer.post_attention_layernorm = FusedNorm(layer.post_attention_layernorm)
        layer.mlp = FusedSwiGLU(layer.mlp, layer.post_attention_layernorm, te)
    elif isinstance(layer, SiglipEncoderLayer):
        layer.layer_norm1 = FusedNorm(layer.layer_norm1)
        layer.self_attn = FusedSiglipAttention(layer.self_attn, layer.layer_norm1, te)
        layer.layer_norm2 = FusedNorm(layer.layer_norm2)
        layer.mlp = FusedSiglipMLP(layer.mlp, layer.layer_norm2, te)
    else:
        raise TypeError(f"convert_to_te: no TE mapping for block type {type(layer).__name__}")


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _where(module: nn.Module) -> dict:
    param = next(module.parameters())
    return {"params_dtype": param.dtype, "device": param.device}


@torch.no_grad()
def _copy_values(pairs) -> None:
    """Copies old values into new parameters unless they live on the meta device."""
    for new, old in pairs:
        if not (new.is_meta or old.is_meta):
            new.copy_(old)


def _te_linear(linear: nn.Linear, te) -> nn.Module:
    new = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, **_where(linear))
    _copy_values([(new.weight, linear.weight)] + ([(new.bias, linear.bias)] if linear.bias is not None else []))
    return new


def _norm_kind(norm: nn.Module) -> tuple[str, float]:
    if isinstance(norm, RMSNorm):
        return "RMSNorm", norm.eps
    if isinstance(norm, nn.LayerNorm):
        if norm.weight is None or norm.bias is None:
            raise TypeError("convert_to_te: LayerNorm without affine weight and bias has no TE counterpart here")
        return "LayerNorm", norm.eps
    if isinstance(norm, FusedNorm):
        return norm.kind, norm.eps
    raise TypeError(f"convert_to_te: unknown norm type {type(norm).__name__}")


def _te_norm(norm: nn.Module, te) -> nn.Module:
    kind, eps = _norm_kind(norm)
    new = getattr(te, kind)(norm.weight.shape[0], eps=eps, **_where(norm))
    _copy_values([(new.weight, norm.weight)] + ([(new.bias, norm.bias)] if kind == "LayerNorm" else []))
    return new


# ----------------------------------------------------------------------------------------------
# fused TE modules over parameters that stay where the torch model has them


class FusedNorm(nn.Module):
    """Holds a norm's parameters (same names, same objects) whose work a fused TE module after it does;
    passes its input through unchanged."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.kind, self.eps = _norm_kind(norm)
        self.weight = norm.weight
        self.bias = norm.bias if self.kind == "LayerNorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _bind_parameters(te_module: nn.Module, sources: dict[str, list[tuple[nn.Module, str]]]) -> nn.Module:
    """Makes ``te_module`` compute with parameters owned by other modules: its own copies are dropped
    and, before each call, attribute ``te_name`` is set to ``owner.<name>`` for the one
    ``(owner, name)`` of ``sources[te_name]``, or to their concatenation along dim 0 for several.

    The owners' attributes are read at every call, so what FSDP2 puts there (the gathered parameter
    during forward and backward) is what TE reads; the sources live in the module's ``__dict__`` (not
    in a closure), so a deep copy of the model (a pipeline stage) reads its own copies. Parameter
    names, init by name, checkpoints and optimizer groups see exactly the torch model's parameters.
    """
    for te_name in sources:
        te_module._parameters.pop(te_name, None)
    object.__setattr__(te_module, "_pivot_parameter_sources", sources)
    te_module.register_forward_pre_hook(_bind_hook)
    return te_module


def _bind_hook(module: nn.Module, args) -> None:
    for te_name, owners in module._pivot_parameter_sources.items():
        tensors = [getattr(owner, name) for owner, name in owners]
        object.__setattr__(module, te_name, tensors[0] if len(tensors) == 1 else torch.cat(tensors))


def _layernorm_linear(norm: FusedNorm, linears: dict[str, nn.Linear], te) -> nn.Module:
    """One ``te.LayerNormLinear``: ``norm`` then the ``linears`` (same input), outputs concatenated in
    order; TE's ``parameters_split`` gives one weight (and bias) attribute per linear."""
    first = next(iter(linears.values()))
    bias = first.bias is not None
    if any((lin.bias is not None) != bias or lin.in_features != first.in_features for lin in linears.values()):
        raise TypeError(f"convert_to_te: cannot fuse {list(linears)}: inputs or biases differ")
    sizes = {name: lin.out_features for name, lin in linears.items()}
    module = te.LayerNormLinear(first.in_features, sum(sizes.values()), eps=norm.eps, bias=bias,
                                normalization=norm.kind, parameters_split=sizes, **_where(first))
    sources = {"layer_norm_weight": [(norm, "weight")]}
    if norm.kind == "LayerNorm":
        sources["layer_norm_bias"] = [(norm, "bias")]
    for name, lin in linears.items():
        sources[f"{name}_weight"] = [(lin, "weight")]
        if bias:
            sources[f"{name}_bias"] = [(lin, "bias")]
    return _bind_parameters(module, sources)


class FusedQwen2Attention(Qwen2Attention):
    """Qwen2 attention computing its input RMSNorm and q/k/v in one ``te.LayerNormLinear`` (``qkv``).

    ``q_proj`` / ``k_proj`` / ``v_proj`` stay as the holders of their parameters (not called);
    ``o_proj`` becomes a ``te.Linear``.
    """

    def __init__(self, attention: Qwen2Attention, norm: FusedNorm, te):
        nn.Module.__init__(self)
        self.head_dim, self.backend = attention.head_dim, attention.backend
        self.q_proj, self.k_proj, self.v_proj = attention.q_proj, attention.k_proj, attention.v_proj
        self.o_proj = _te_linear(attention.o_proj, te)
        projections = {"q_proj": self.q_proj, "k_proj": self.k_proj, "v_proj": self.v_proj}
        self.qkv = _layernorm_linear(norm, projections, te)
        self.splits = [lin.out_features for lin in projections.values()]

    def project_qkv(self, x: torch.Tensor):
        return self.qkv(x).split(self.splits, dim=-1)


class FusedSiglipAttention(SiglipAttention):
    """SigLIP attention computing its LayerNorm and q/k/v in one ``te.LayerNormLinear`` (``qkv``)."""

    def __init__(self, attention: SiglipAttention, norm: FusedNorm, te):
        nn.Module.__init__(self)
        self.num_heads, self.head_dim, self.backend = attention.num_heads, attention.head_dim, attention.backend
        self.q_proj, self.k_proj, self.v_proj = attention.q_proj, attention.k_proj, attention.v_proj
        self.out_proj = _te_linear(attention.out_proj, te)
        projections = {"q_proj": self.q_proj, "k_proj": self.k_proj, "v_proj": self.v_proj}
        self.qkv = _layernorm_linear(norm, projections, te)
        self.splits = [lin.out_features for lin in projections.values()]

    def project_qkv(self, x: torch.Tensor):
        return self.qkv(x).split(self.splits, dim=-1)


class FusedSwiGLU(nn.Module):
    """Qwen2's post-attention RMSNorm → gate/up → SiLU(gate) * up → down as one ``te.LayerNormMLP``
    (``fused``, ``activation="swiglu"``: SiLU of the first half of fc1's output times the second, so
    fc1's weight is ``[gate; up]``, joined at each call from the two parameters, as TE's split
    parameters are joined too). ``gate_proj`` / ``up_proj`` / ``down_proj`` hold their parameters."""

    def __init__(self, mlp: Qwen2MLP, norm: FusedNorm, te):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        fused = te.LayerNormMLP(self.gate_proj.in_features, self.gate_proj.out_features, eps=norm.eps, bias=False,
                                normalization=norm.kind, activation="swiglu", **_where(mlp))
        self.fused = _bind_parameters(fused, {
            "layer_norm_weight": [(norm, "weight")],
            "fc1_weight": [(self.gate_proj, "weight"), (self.up_proj, "weight")],
            "fc2_weight": [(self.down_proj, "weight")]})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)


class FusedSiglipMLP(nn.Module):
    """SigLIP's LayerNorm → fc1 → GELU (tanh) → fc2 as one ``te.LayerNormMLP`` (``fused``; TE's
    ``gelu`` is the tanh form); ``fc1`` / ``fc2`` stay as the holders of their parameters."""

    def __init__(self, mlp: nn.Module, norm: FusedNorm, te):
        super().__init__()
        self.fc1, self.fc2 = mlp.fc1, mlp.fc2
        fused = te.LayerNormMLP(self.fc1.in_features, self.fc1.out_features, eps=norm.eps, bias=True,
                                normalization=norm.kind, activation="gelu", **_where(mlp))
        self.fused = _bind_parameters(fused, {
            "layer_norm_weight": [(norm, "weight")], "layer_norm_bias": [(norm, "bias")],
            "fc1_weight": [(self.fc1, "weight")], "fc1_bias": [(self.fc1, "bias")],
            "fc2_weight": [(self.fc2, "weight")], "fc2_bias": [(self.fc2, "bias")]})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)
