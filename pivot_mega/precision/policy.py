"""Precision policy: the ``precision:`` config section, the checks that it can run on this machine,
and the context forward + backward run in (TE's FP8 autocast, or nothing).

``backend: torch`` keeps the model's own modules; BF16 comes from FSDP's mixed-precision policy (fp32
master weights). The module conversions live beside this file: ``float8.py`` (torchao) and
``te_modules.py`` (Transformer Engine).
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

from ..config import ConfigError

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
        import_torchao_float8()
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


def import_torchao_float8():
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
