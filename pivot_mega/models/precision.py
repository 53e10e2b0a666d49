"""Precision backends: plain torch (optionally with torchao float8 linears) or Transformer Engine.

    config = PrecisionConfig(backend="torch", fp8="torchao")
    check_precision(config, device_type)             # before any work: stops if this machine cannot
    with torch.device("meta"):
        model = VisionLanguageModel(model_config)
    apply_precision(model, config)                   # before parallelize (TP plans, FSDP wrap the result)
    pmodel = parallelize(model, dims)
    with precision_autocast(config):                 # FP8 recipe of TE; nothing to do otherwise
        loss = pmodel.forward_backward(microbatches, loss_fn)

``backend: torch`` keeps the model's own modules; BF16 comes from FSDP's mixed-precision policy (fp32
master weights). ``fp8: torchao`` converts the vision and language linears to torchao's
``Float8Linear`` (dynamic scaling, the recipe picked by ``torchao_recipe``); it composes with FSDP2
and DTensor TP because the converted modules are still ``nn.Linear`` subclasses, converted before
they are parallelised (torchao's and torchtitan's order).

``backend: te`` swaps modules for Transformer Engine's (CUDA only, with TE importable: NGC PyTorch
containers ship it):

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

The projector and the LM head stay in the torch modules with either backend: the projector is under
1 % of the FLOPs and is the only trained part in stage 1a, and the head is read as a weight by the
fused log-prob kernel, never called as a module.

Tensor parallelism: torch's DTensor plans (``ColwiseParallel`` ...) apply to ``nn.Linear`` and
``nn.Embedding`` only, so ``backend: te`` runs with ``tensor_model_parallel_size: 1`` (FSDP2 / HSDP /
replicated data parallelism and pipelining work); for FP8 with tensor parallelism use
``fp8: torchao``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import logging
import sys
import typing
from typing import Literal

import torch
from torch import nn

from ..config import ConfigError
from .layers import RMSNorm
from .qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2MLP
from .siglip import SiglipAttention, SiglipEncoderLayer

# FP8 GEMMs (cuBLASLt, torch._scaled_mm) need both matrix dims to be multiples of 16.
FP8_DIM_MULTIPLE = 16
# FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer.
FP8_MIN_CAPABILITY = (8, 9)
TE_INSTALL_HINT = ("Transformer Engine ships in NGC PyTorch containers (nvcr.io/nvidia/pytorch, see the "
                   "Dockerfile); elsewhere `pip install --no-build-isolation transformer_engine[pytorch]` "
                   "on a CUDA machine")


class PrecisionUnavailableError(RuntimeError):
    """The precision backend asked for cannot run here (package missing, no GPU, GPU too old)."""


@dataclasses.dataclass
class PrecisionConfig:
    """Numerics of the matmuls.

    backend: ``torch`` (the model's own modules) or ``te`` (Transformer Engine modules, CUDA).
    fp8: ``none``; ``te_delayed`` (TE delayed scaling: scales from an amax history of past steps);
        ``te_current`` (TE per-tensor current scaling: scales from this step's amax); ``torchao``
        (torchao float8 linears, dynamic scaling; runs on CPU too, slowly, for tests).
    fp8_format: TE recipes: ``hybrid`` (E4M3 forward, E5M2 gradients) or ``e4m3`` (everywhere).
    amax_history_len, amax_compute_algo: ``te_delayed`` only.
    torchao_recipe: ``tensorwise`` (one scale per tensor, E5M2 gradients), ``rowwise`` (a scale per
        row, E4M3 throughout: more accurate, a little slower) or ``rowwise_with_gw_hp`` (rowwise, the
        weight gradient in high precision).
    te_fuse_norms: ``te`` only: fuse norms into the following q/k/v GEMM and MLP (names unchanged).
    """

    backend: Literal["torch", "te"] = "torch"
    fp8: Literal["none", "te_delayed", "te_current", "torchao"] = "none"
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    torchao_recipe: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = "tensorwise"
    te_fuse_norms: bool = False

    def validate(self, where: str = "precision") -> "PrecisionConfig":
        """Raises ConfigError for unknown values and for settings that cannot go together (a knob
        that would have no effect with the chosen recipe is an error too, never silently ignored)."""
        for field in dataclasses.fields(self):
            choices = typing.get_args(typing.get_type_hints(type(self))[field.name])
            value = getattr(self, field.name)
            if choices and value not in choices:
                raise ConfigError(f"{where}.{field.name}: {value!r} is not one of {list(choices)}")
        if self.fp8 in ("te_delayed", "te_current") and self.backend != "te":
            raise ConfigError(f"{where}.fp8: {self.fp8} is a Transformer Engine recipe and needs "
                              f"{where}.backend: te (got {self.backend}); with backend torch use fp8: torchao")
        if self.fp8 == "torchao" and self.backend != "torch":
            raise ConfigError(f"{where}.fp8: torchao converts torch nn.Linear modules and needs {where}.backend: "
                              f"torch (got {self.backend}); with backend te use fp8: te_delayed or te_current")
        if isinstance(self.amax_history_len, bool) or not isinstance(self.amax_history_len, int) \
                or self.amax_history_len < 1:
            raise ConfigError(f"{where}.amax_history_len: must be an integer >= 1, got {self.amax_history_len!r}")
        defaults = PrecisionConfig()
        applies = {
            "fp8_format": ("te_delayed", "te_current"),
            "amax_history_len": ("te_delayed",),
            "amax_compute_algo": ("te_delayed",),
            "torchao_recipe": ("torchao",),
        }
        for name, recipes in applies.items():
            if getattr(self, name) != getattr(defaults, name) and self.fp8 not in recipes:
                raise ConfigError(f"{where}.{name}: applies only to fp8: {' | '.join(recipes)} (fp8 is "
                                  f"{self.fp8}); remove it")
        if self.te_fuse_norms and self.backend != "te":
            raise ConfigError(f"{where}.te_fuse_norms: applies only to backend: te (backend is {self.backend})")
        return self


# ----------------------------------------------------------------------------------------------
# checks before any work


def check_precision(config: PrecisionConfig, device_type: str, *, tensor_parallel_size: int = 1) -> None:
    """Stops with an error saying what is missing and what to do if ``config`` cannot run on
    ``device_type`` (``cuda`` or ``cpu``); never falls back to another precision.

    Rules: ``backend: te`` needs CUDA, an importable ``transformer_engine.pytorch`` and
    ``tensor_parallel_size == 1``. Any FP8 on CUDA needs compute capability >= 8.9 (Ada, Hopper or
    newer). ``fp8: torchao`` needs ``torchao.float8``; on CPU it also needs ``torch._scaled_mm`` to run
    on CPU float8 tensors (torch 2.13's CPU build has it; checked by running one 16 x 16 FP8 matmul).
    """
    config.validate()
    if device_type not in ("cuda", "cpu"):
        raise PrecisionUnavailableError(f"precision: device type {device_type!r} is not supported (cuda or cpu)")
    if config.backend == "te" and device_type != "cuda":
        raise PrecisionUnavailableError(
            f"precision.backend: te runs on CUDA GPUs only and this run is on {device_type}; set "
            f"precision.backend: torch (precision.fp8: torchao runs on CPU too)")
    if config.backend == "te" and tensor_parallel_size > 1:
        raise ConfigError(
            f"precision.backend: te with tensor_model_parallel_size {tensor_parallel_size}: the DTensor "
            f"tensor-parallel plans apply to torch nn.Linear only. Use tensor_model_parallel_size: 1 with "
            f"FSDP (data_parallel_sharding: fsdp), or precision.backend: torch with fp8: torchao")
    if config.fp8 != "none" and device_type == "cuda":
        _require_fp8_gpu(config)
    if config.backend == "te":
        te = import_te()
        if config.fp8 != "none":
            ok, reason = _te_fp8_support(te)
            if not ok:
                raise PrecisionUnavailableError(f"precision.fp8: {config.fp8}: Transformer Engine reports FP8 is "
                                                f"not available here: {reason}; set precision.fp8: none")
    if config.fp8 == "torchao":
        _import_torchao_float8()
        if device_type == "cpu":
            error = _cpu_scaled_mm_error()
            if error:
                raise PrecisionUnavailableError(
                    f"precision.fp8: torchao on CPU needs torch._scaled_mm for CPU float8 tensors, which this "
                    f"torch {torch.__version__} lacks ({error}); run on a GPU with compute capability >= 8.9 "
                    f"or set precision.fp8: none")


def _require_fp8_gpu(config: PrecisionConfig) -> None:
    if not torch.cuda.is_available():
        raise PrecisionUnavailableError(f"precision.fp8: {config.fp8} on cuda, but torch sees no CUDA device "
                                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
    capability = torch.cuda.get_device_capability()
    if tuple(capability) < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name()
        raise PrecisionUnavailableError(
            f"precision.fp8: {config.fp8} needs FP8 tensor cores (compute capability >= "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}: Ada, Hopper or newer); {name} has "
            f"{capability[0]}.{capability[1]}. Set precision.fp8: none to train in BF16")


def import_te():
    """``transformer_engine.pytorch``, or PrecisionUnavailableError naming why it cannot be imported."""
    try:
        return importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError for missing CUDA libraries
        raise PrecisionUnavailableError(
            f"precision.backend: te needs Transformer Engine, and `import transformer_engine.pytorch` failed "
            f"({type(e).__name__}: {e}). {TE_INSTALL_HINT}; or set precision.backend: torch") from e


def _te_recipe_module():
    return importlib.import_module("transformer_engine.common.recipe")


def _te_fp8_support(te) -> tuple[bool, str]:
    if hasattr(te, "is_fp8_available"):  # TE >= 2.x
        try:
            result = te.is_fp8_available(return_reason=True)
        except TypeError:
            result = te.is_fp8_available()
    else:
        result = importlib.import_module("transformer_engine.pytorch.fp8").check_fp8_support()
    return result if isinstance(result, tuple) else (bool(result), "")


def _import_torchao_float8():
    # A CPU build of torch cannot load torchao's CUDA kernels; torchao logs a warning per library
    # on import, which says nothing about the float8 training path (pure torch ops): keep it quiet there.
    quiet = torch.version.cuda is None and "torchao" not in sys.modules
    logger = logging.getLogger("torchao")
    level = logger.level
    try:
        if quiet:
            logger.setLevel(logging.ERROR)
        return importlib.import_module("torchao.float8")
    except Exception as e:  # noqa: BLE001
        raise PrecisionUnavailableError(
            f"precision.fp8: torchao needs torchao's float8 training ({type(e).__name__}: {e}); install the "
            f"version setup.py pins (`pip install --no-deps torchao==0.18.0`), or set precision.fp8: none") from e
    finally:
        logger.setLevel(level)


@functools.cache
def _cpu_scaled_mm_error() -> str:
    """'' if an FP8 matmul runs on CPU with this torch, else the error it raises."""
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        one = torch.tensor(1.0)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return ""


# ----------------------------------------------------------------------------------------------
# applying a backend to the model (before parallelisation)


def apply_precision(model: nn.Module, config: PrecisionConfig) -> None:
    """Converts ``model`` (a ``VisionLanguageModel``, on the meta device or materialised) in place.

    Call after :func:`check_precision` and before ``parallelize``. On a materialised model the new
    modules get the old modules' values; on the meta device they stay meta for ``parallelize`` to fill.
    """
    config.validate()
    if config.backend == "te":
        convert_to_te(model, import_te(), fuse_norms=config.te_fuse_norms)
    if config.fp8 == "torchao":
        float8 = _import_torchao_float8()
        recipe = float8.Float8LinearConfig.from_recipe_name(config.torchao_recipe)
        float8.convert_to_float8_training(model, config=recipe, module_filter_fn=float8_module_filter)


def float8_module_filter(module: nn.Module, fqn: str) -> bool:
    """Which linears of a ``VisionLanguageModel`` become float8 (``fqn`` from the model's root).

    The vision and language towers' linears whose two dims are multiples of 16 (FP8 GEMMs need it);
    not the projector, and not an untied LM head (the head is read as a weight by the log-prob kernel
    and is the layer most sensitive to FP8 rounding).
    """
    if not isinstance(module, nn.Linear):
        return False
    if not fqn.startswith(("vision.", "language.")) or fqn.rsplit(".", 1)[-1] == "lm_head":
        return False
    return module.in_features % FP8_DIM_MULTIPLE == 0 and module.out_features % FP8_DIM_MULTIPLE == 0


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


# ----------------------------------------------------------------------------------------------
# the forward/backward context


def te_recipe(config: PrecisionConfig, recipe_module=None):
    """The TE recipe object for ``config.fp8`` (``te_delayed`` / ``te_current``)."""
    recipe = recipe_module or _te_recipe_module()
    fp8_format = recipe.Format.HYBRID if config.fp8_format == "hybrid" else recipe.Format.E4M3
    if config.fp8 == "te_delayed":
        return recipe.DelayedScaling(fp8_format=fp8_format, amax_history_len=config.amax_history_len,
                                     amax_compute_algo=config.amax_compute_algo)
    if config.fp8 == "te_current":
        return recipe.Float8CurrentScaling(fp8_format=fp8_format)
    raise ValueError(f"te_recipe: precision.fp8 {config.fp8!r} is not a TE recipe")


def precision_autocast(config: PrecisionConfig, *, amax_group=None, te=None, recipe_module=None):
    """Context for forward + backward: TE's FP8 autocast with the recipe for ``te_*`` recipes (amaxes
    reduced over ``amax_group``, e.g. the data-parallel group, so every rank uses the same scales),
    else a no-op (torchao float8 and BF16 need no context)."""
    if config.fp8 not in ("te_delayed", "te_current"):
        return contextlib.nullcontext()
    te = te or import_te()
    recipe = te_recipe(config, recipe_module)
    # TE 2.x renamed fp8_autocast(fp8_recipe=, fp8_group=) to autocast(recipe=, amax_reduction_group=).
    autocast = getattr(te, "autocast", None)
    if autocast is not None and "recipe" in inspect.signature(autocast).parameters:
        return autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group)
