"""What the ranks of a checkpoint save or load share: agreeing on errors, this rank's RNG state, atomic writes.

A rank that raised alone would leave the others waiting in a collective, so every failure here is
gathered or broadcast and raised on every rank, as one ``CheckpointError`` naming the ranks.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ...models.checkpoint_files import CheckpointError

# ----------------------------------------------------------------------------------------------
# ranks agreeing on errors


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def raise_if_any_rank_failed(error: str | None) -> None:
    """Every rank raises the same CheckpointError if any rank has an error (a barrier otherwise)."""
    gather_from_ranks(None, error)


def gather_from_ranks(value, error: str | None) -> list:
    """Every rank's ``value``, on every rank; or, if any rank has an error, the same CheckpointError
    (naming the ranks) raised on every rank."""
    gathered = [(value, error)]
    if dist.is_initialized() and world_size() > 1:
        gathered = [None] * world_size()
        dist.all_gather_object(gathered, (value, error))
    failed = {}
    for rank_number, (_, message) in enumerate(gathered):
        if message is not None:
            failed.setdefault(message, []).append(rank_number)
    if failed:
        raise CheckpointError("\n".join(message if len(gathered) == 1 else f"rank(s) {ranks}: {message}"
                                        for message, ranks in failed.items()))
    return [value for value, _ in gathered]


def run_on_rank0(fn) -> None:
    """Runs ``fn`` on rank 0; its error, if any, is raised on every rank."""
    error, cause = None, None
    if rank() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the other ranks must hear of any failure
            error, cause = describe(e), e
    try:
        broadcast_from_rank0(None, error)
    except CheckpointError as e:
        raise e from cause


def broadcast_from_rank0(value, error: str | None):
    """→ rank 0's ``value`` on every rank, or rank 0's ``error`` raised on every rank."""
    if dist.is_initialized() and world_size() > 1:
        box = [(value, error)]
        dist.broadcast_object_list(box, src=0)
        value, error = box[0]
    if error is not None:
        raise CheckpointError(error)
    return value


def describe(error: Exception) -> str:
    return str(error) if isinstance(error, CheckpointError) else f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns whenever it runs without collectives; with one process that is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ----------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    """This process's RNG states (torch CPU / CUDA, python, numpy) as tensors and plain values."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # As tensors and plain values, so that torch.load(weights_only=True) reads them back.
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({"bit_generator": numpy_state["bit_generator"],
                         "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------
# files


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a side file, flush to disk, rename over ``path``: readers see the old or the new text."""
    side = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(side, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(side, path)
