"""torchao float8 training: the vision and language linears become ``Float8Linear`` (dynamic scaling,
the recipe picked by ``precision.torchao_recipe``).

It composes with FSDP2 and DTensor TP because the converted modules are still ``nn.Linear``
subclasses, converted before they are parallelised (torchao's and torchtitan's order).
"""

from __future__ import annotations

from torch import nn

from .policy import import_torchao_float8

# FP8 GEMMs (cuBLASLt, torch._scaled_mm) need both matrix dims to be multiples of 16.
FP8_DIM_MULTIPLE = 16


def convert_to_float8(model: nn.Module, recipe_name: str) -> None:
    """Converts ``model``'s linears that :func:`float8_module_filter` selects, in place (meta or not)."""
    float8 = import_torchao_float8()
    recipe = float8.Float8LinearConfig.from_recipe_name(recipe_name)
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
