"""Portable model checkpoints (safetensors, ``models/checkpoint_io``) into and out of a parallelised model.

``init_from`` loads one into any layout (``load_model_weights``); the end of a run writes one
(``export_model``), which ``VisionLanguageModel.from_checkpoint`` and ``pivot-mega convert export-hf``
read. Unlike a training checkpoint it holds the model alone, whole, and no pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ...models.checkpoint_files import CheckpointError, check_tensors
from ...models.checkpoint_io import expected_shapes, read_checkpoint, write_checkpoint
from ...parallel import ParallelModel, copy_full_value
from .ranks import broadcast_from_rank0, describe, rank, run_on_rank0, world_size
from .stages import comm_device, model_config, stage_modules


def load_model_weights(pmodel: ParallelModel | nn.Module, directory: str | os.PathLike) -> None:
    """Loads a portable checkpoint (``pivot-mega convert import-hf``, ``export_model``) into a
    parallelised model: rank 0 reads and checks it, each tensor is broadcast and every rank keeps its
    shard. Call on all ranks."""
    directory = Path(directory)
    config = model_config(pmodel)
    tensors: dict[str, torch.Tensor] = {}
    manifest = None
    error = None
    if rank() == 0:
        try:
            _, tensors, _ = read_checkpoint(directory)
            check_tensors(tensors, expected_shapes(config), f"{directory} does not fit this run's model")
            manifest = [(name, tuple(tensor.shape), tensor.dtype) for name, tensor in sorted(tensors.items())]
        except Exception as e:  # noqa: BLE001 - the other ranks must hear of any failure
            error = describe(e)
    manifest = broadcast_from_rank0(manifest, error)
    targets: dict[str, list[torch.Tensor]] = {}
    for module in stage_modules(pmodel):
        for name, tensor in module.state_dict(keep_vars=True).items():
            targets.setdefault(name, []).append(tensor)
    device = comm_device(pmodel)
    with torch.no_grad():
        for name, shape, dtype in manifest:
            full = tensors[name].to(device) if rank() == 0 else torch.empty(shape, dtype=dtype, device=device)
            if world_size() > 1:
                dist.broadcast(full, src=0)
            for target in targets.get(name, []):
                _copy_full_value(name, target, full)


class NonFiniteWeightsError(CheckpointError):
    """The model holds NaN or Inf: an export would hand garbage on as a finished model."""


def export_model(pmodel: ParallelModel | nn.Module, directory: str | os.PathLike,
                 unused_vision: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes the model as a portable checkpoint (``VisionLanguageModel.from_checkpoint``,
    ``pivot-mega convert export-hf``). Every rank gathers its stage's full tensors; one rank per
    pipeline stage sends them to rank 0, which writes. Call on all ranks. Raises
    ``NonFiniteWeightsError`` on every rank, writing nothing, if any tensor holds NaN or Inf."""
    directory = Path(directory)
    config = model_config(pmodel)
    local, non_finite = _full_stage_tensors(pmodel)
    _refuse_non_finite(directory, non_finite)
    copies = _gather_on_rank0(local, comm_device(pmodel))

    def write() -> None:
        tensors: dict[str, torch.Tensor] = {}
        for source_rank, received in copies:
            for name, tensor in received.items():
                if name in tensors and not torch.equal(tensors[name], tensor):
                    diff = (tensors[name].float() - tensor.float()).abs().max().item()
                    raise CheckpointError(f"export to {directory}: the copies of {name} held by two pipeline stages "
                                          f"differ (rank {source_rank}'s by up to {diff:.3e}); tied weights out of "
                                          f"sync")
                tensors.setdefault(name, tensor)
        write_checkpoint(directory, config, tensors, unused_vision=unused_vision)
    run_on_rank0(write)
    return directory


def gather_full_tensors(pmodel: ParallelModel | nn.Module, keep=None) -> dict[str, torch.Tensor]:
    """The whole model's tensors whose names ``keep(name)`` accepts (all without it), full and on the
    CPU, on rank 0; {} elsewhere. Call on all ranks: each gathers its stage's shards (collectives over
    their meshes) and one rank per stage sends them to rank 0."""
    local, _ = _full_stage_tensors(pmodel, keep)
    tensors: dict[str, torch.Tensor] = {}
    for _, received in _gather_on_rank0(local, comm_device(pmodel)):
        for name, tensor in received.items():
            tensors.setdefault(name, tensor)
    return tensors


def _full_stage_tensors(pmodel, keep=None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """This rank's stage's tensors made whole (every rank takes part: ``full_tensor`` is a collective),
    kept on the CPU by one rank per stage (dp and tp rank 0), and the names of the non-finite ones."""
    sender = not isinstance(pmodel, ParallelModel) or (pmodel.dims.dp_rank == 0 and pmodel.dims.tp_rank == 0)
    local: dict[str, torch.Tensor] = {}
    non_finite: list[str] = []
    for module in stage_modules(pmodel):
        for name, tensor in module.state_dict().items():
            if keep is not None and not keep(name):
                continue
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # collective over its mesh
            if full.is_floating_point() and not bool(torch.isfinite(full).all()):
                non_finite.append(name)
            if sender:
                local[name] = full.detach().cpu()
    return local, non_finite


def _refuse_non_finite(directory: Path, non_finite: list[str]) -> None:
    """Raises on every rank if any rank's stage holds a non-finite tensor (each rank checks its own)."""
    per_rank = [non_finite]
    if world_size() > 1:
        per_rank = [None] * world_size()
        dist.all_gather_object(per_rank, non_finite)
    names = list(dict.fromkeys(name for names in per_rank for name in names))  # replicas report the same names
    if names:
        raise NonFiniteWeightsError(f"refusing to export {directory}: {len(names)} tensor(s) hold NaN or Inf, the "
                                    f"first {names[0]}; the model is garbage. Resume from an earlier checkpoint")


def _gather_on_rank0(tensors: dict[str, torch.Tensor], device: torch.device) -> list[tuple[int, dict]]:
    """→ on rank 0, (rank, tensors) of every rank that has some (tensors sent one by one, not pickled);
    elsewhere []."""
    if world_size() == 1:
        return [(0, tensors)]
    specs = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    gathered = [None] * world_size() if rank() == 0 else None
    dist.gather_object(specs, gathered, dst=0)
    if rank() != 0:
        for tensor in tensors.values():
            dist.send(tensor.to(device).contiguous(), dst=0)
        return []
    result = [(0, tensors)]
    for src, src_specs in enumerate(gathered[1:], start=1):
        received = {}
        for name, shape, dtype in src_specs:
            buffer = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(buffer, src=src)
            received[name] = buffer.cpu()
        if received:
            result.append((src, received))
    return result


def _copy_full_value(name: str, target: torch.Tensor, full: torch.Tensor) -> None:
    if tuple(target.shape) != tuple(full.shape):
        raise CheckpointError(f"tensor {name} of shape {list(full.shape)} cannot fill a parameter of shape "
                              f"{list(target.shape)}")
    copy_full_value(target, full)
