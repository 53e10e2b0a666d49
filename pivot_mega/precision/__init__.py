"""Precision backends, applied to the model from outside (as parallelism is): plain torch (optionally
with torchao float8 linears) or Transformer Engine.

    config = PrecisionConfig(backend="torch", fp8="torchao")
    check_precision(config, device_type)             # before any work: stops if this machine cannot
    with torch.device("meta"):
        model = VisionLanguageModel(model_config)
    apply_precision(model, config)                   # before parallelize (TP plans, FSDP wrap the result)
    pmodel = parallelize(model, dims)
    with precision_autocast(config):                 # FP8 recipe of TE; nothing to do otherwise
        loss = pmodel.forward_backward(microbatches, loss_fn)

``policy.py``: the config, the checks and the autocast context; ``float8.py``: torchao float8;
``te_modules.py``: the Transformer Engine module swap.
"""

from __future__ import annotations

from torch import nn

from .float8 import FP8_DIM_MULTIPLE, convert_to_float8, float8_module_filter
from .policy import (PrecisionConfig, PrecisionUnavailableError, check_precision, import_te, precision_autocast,
                     te_recipe)
from .te_modules import convert_to_te

__all__ = [
    "FP8_DIM_MULTIPLE", "PrecisionConfig", "PrecisionUnavailableError", "apply_precision", "check_precision",
    "convert_to_float8", "convert_to_te", "float8_module_filter", "import_te", "precision_autocast", "te_recipe",
]


def apply_precision(model: nn.Module, config: PrecisionConfig) -> None:
    """Converts ``model`` (a ``VisionLanguageModel``, on the meta device or materialised) in place.

    Call after :func:`check_precision` and before ``parallelize``. On a materialised model the new
    modules get the old modules' values; on the meta device they stay meta for ``parallelize`` to fill.
    """
    config.validate()
    if config.backend == "te":
        convert_to_te(model, import_te(), fuse_norms=config.te_fuse_norms)
    if config.fp8 == "torchao":
        convert_to_float8(model, config.torchao_recipe)
