"""This rank's part of the model as one module, under the whole model's parameter names.

A rank holds one module, or with pipeline parallelism the stage modules of its stages (several with
interleaved schedules); checkpoints and exports walk them through these helpers.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import ModelConfig
from ...models.checkpoint_files import CheckpointError
from ...parallel import ParallelModel


def stage_modules(pmodel: ParallelModel | nn.Module) -> list[nn.Module]:
    """The modules this rank holds: its pipeline stages, or the one model."""
    return pmodel.modules if isinstance(pmodel, ParallelModel) else [pmodel]


def model_config(pmodel: ParallelModel | nn.Module) -> ModelConfig:
    return stage_modules(pmodel)[0].config


def comm_device(pmodel: ParallelModel | nn.Module) -> torch.device:
    """The device this rank's collectives send tensors from."""
    if isinstance(pmodel, ParallelModel) and pmodel.dims.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return next(stage_modules(pmodel)[0].parameters()).device


def rank_module(pmodel: ParallelModel | nn.Module) -> nn.Module:
    """One module holding every parameter of this rank under the full model's names.

    With several pipeline stages on a rank (interleaved schedules) their trees are joined into a view
    that shares the stages' submodules, so one optimizer over all of them maps to parameter names.
    """
    modules = stage_modules(pmodel)
    if len(modules) == 1:
        return modules[0]
    view = _StagesView()
    for module in modules:
        _graft(view, module, "")
    return view


class _StagesView(nn.Module):
    """Joins the module trees of several pipeline stages; holds no tensors of its own."""


def _graft(target: nn.Module, source: nn.Module, prefix: str) -> None:
    """Adds ``source``'s children to ``target``; a path both hold becomes a view of both."""
    for name, child in source._modules.items():
        if child is None:
            continue
        existing = target._modules.get(name)
        if existing is None:
            target.add_module(name, child)
            continue
        if existing is child:
            continue
        if not isinstance(existing, _StagesView):
            _require_no_own_tensors(existing, prefix + name)
            view = _StagesView()
            _graft(view, existing, f"{prefix}{name}.")
            target._modules[name] = existing = view
        _require_no_own_tensors(child, prefix + name)
        _graft(existing, child, f"{prefix}{name}.")


def _require_no_own_tensors(module: nn.Module, path: str) -> None:
    own = [name for name, _ in module.named_parameters(recurse=False)] + \
          [name for name, _ in module.named_buffers(recurse=False)]
    if own:
        raise CheckpointError(f"two pipeline stages on this rank hold module {path}, which has tensors of its own "
                              f"({own}): one name cannot stand for two copies in a checkpoint")
