"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): sharded, resumable on any layout.

    OUT/checkpoints/
      step_000123/                  complete: renamed from step_000123.tmp once every rank has written
        .metadata, __R_0.distcp     DCP: model + optimizer, each rank writing the shards it holds
        checkpoint.json             step, layout, world size, scheduler state (rank 0, written last)
        config.json                 the resolved run config
        rank_state/rank_00003.pt    rank 3's RNG states: torch CPU/CUDA, python, numpy (torch.save of
                                    tensors and plain values, read back with weights_only=True)
        rank_state/rank_00003.json  rank 3's extra state (data-loader position, ...)
      latest                        name of the newest complete checkpoint, replaced atomically last

Model and optimizer go through ``get_state_dict`` / ``set_state_dict``: keys are the full model's
parameter names whatever the layout, tensors are DTensors where TP / FSDP shard them, and the
optimizer state is flattened per parameter (``state.<name>.exp_avg``, ``param_groups.<name>.lr``), so a
checkpoint written under one TP / PP / DP layout loads under another. Tensors held whole by several
ranks (replicated parameters, the tied embedding that the first and the last pipeline stage both
hold) are written once: DCP keeps one copy per name and offset.

Per-rank state lives in small files rather than in DCP: DCP keeps one copy of a non-tensor entry per
key, so per-rank values would need rank-numbered keys that a run of another size could not map; and a
data loader's position is worth reading by hand. RNG streams only continue when the world size is
the same; with another world size they are left as the new run seeded them.

Trust: shards, optimizer hyper-parameters and rank files are read with ``weights_only=True``, and
DCP's own ``.metadata``, a pickle, through ``dcp_metadata.MetadataReader``, which admits only the classes
DCP writes. Still resume only from checkpoints of runs you trust; models are shared as portable
safetensors checkpoints (``portable.export_model``).

Writers: every rank writes into the one directory (a shared file system across nodes, as DCP's
FileSystemWriter expects); rank 0 alone removes, renames and prunes. A save removes a stale ``.tmp`` of the step it is
writing (a crashed attempt at that step); it never touches other ``.tmp`` directories, which may
belong to an asynchronous save still running or to another process writing into the same folder.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import os
import pickle
import re
import shutil
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from ...config import ModelConfig
from ...models.checkpoint_files import CheckpointError, check_tensors
from ...models.checkpoint_io import expected_shapes
from ...parallel import ParallelModel
from .dcp_metadata import MetadataReader
from .integrity import complete_digests, digest_own_files, verify_files
from .ranks import (gather_from_ranks, raise_if_any_rank_failed, rank, rng_state, run_on_rank0, set_rng_state,
                    single_process_quiet, world_size, write_text_atomic)
from .stages import model_config, rank_module

FORMAT_NAME = "pivot_mega.training_checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MANIFEST_FILE = "checkpoint.json"
RUN_CONFIG_FILE = "config.json"
RANK_STATE_DIR = "rank_state"
DCP_METADATA_FILE = ".metadata"
_STEP_DIR = re.compile(r"step_(\d+)")
_MAX_LISTED = 20

# Flattened optimizer state: keyed by parameter name, so pipeline stages and other layouts can map it.
_STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

log = logging.getLogger(__name__)


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------------------------
# save


def async_save_group(timeout_s: float | None = None):
    """The process group of asynchronous saves: gloo, since DCP's async save runs its collectives on a
    CPU backend (the main group is NCCL on GPUs), and a group of its own, so that the background
    write's collectives never interleave with the training step's. Make it once per run and pass it
    to every save (a new group connects every pair of ranks); None without torch.distributed.
    ``timeout_s``: its collectives' timeout (the run's ``parallel.timeout_s``; None: torch's default)."""
    if not dist.is_initialized():
        return None
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    return dist.new_group(backend="gloo", timeout=timeout)


class PendingSave:
    """A checkpoint being written; ``wait()`` completes it and returns its directory.

    A synchronous save is complete when ``save_checkpoint`` returns. An asynchronous one writes in a
    background thread: every rank must call ``wait()`` at the same point, before the next save and
    before the process exits. Until then the checkpoint is a ``.tmp`` directory that resume ignores.
    A run that ends by an error calls ``close()`` instead.
    """

    def __init__(self, root: Path, step: int, manifest_text: str, keep_last: int, future: Future | None = None,
                 group=None, owns_group: bool = False, *, digests: dict | None = None, error: str | None = None):
        self.root, self.step, self.path = root, step, root / checkpoint_name(step)
        self.tmp = _in_progress(self.path)
        self._manifest_text, self._keep_last = manifest_text, keep_last
        # future: the background write, whose result is this rank's file digests; or, written already,
        # the digests (or the error) themselves.
        self._future, self._group, self._owns_group = future, group, owns_group
        self._digests, self._error = digests, error
        self._complete = self._closed = False

    def done(self) -> bool:
        """True once the background write has finished (``wait()`` still renames it into place)."""
        return self._complete or self._future is None or self._future.done()

    def wait(self) -> Path:
        """Completes the save on every rank: the ranks' checksums go into the manifest, the directory is
        renamed into place. A failure on any rank removes the partial save (the previous checkpoint is
        untouched) and raises one CheckpointError on every rank."""
        if self._complete:
            return self.path
        if self._closed:
            raise CheckpointError(f"{self.tmp}: the save was closed without being completed")
        try:
            digests = self._future_result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - reported on every rank below
            self._error = describe_save_failure(e, self.tmp)
            digests = None
        try:
            gathered = _agree_or_abandon(self.root, self.tmp, digests, self._error)
        except CheckpointError:
            self._closed = True  # a failed write is never committed by a later wait()
            raise
        run_on_rank0(lambda: self._commit(gathered))
        self._complete = True
        return self.path

    def close(self) -> None:
        """Lets the background write finish, leaves it uncommitted (a ``.tmp`` that resume ignores) and
        frees its group: for a run ending by an error, when the other ranks may never reach ``wait()``,
        so nothing here uses the main group. Before the process groups are destroyed: the write's
        collectives run on its group. Nothing to do after ``wait()``."""
        if self._complete or self._closed:
            return
        self._closed = True
        try:
            self._future_result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - the run is already failing; say why
            log.warning("checkpoint: %s left incomplete: %s", self.tmp, describe_save_failure(e, self.tmp))

    def _future_result(self) -> dict | None:
        try:
            if self._future is not None:
                self._digests = self._future.result()
            return self._digests
        finally:
            self._future = None
            if self._group is not None and self._owns_group:
                dist.destroy_process_group(self._group)
            self._group = None

    def _commit(self, gathered: list[dict]) -> None:
        """Manifest (with every file's checksum) last into the temp dir, rename it into place, point
        ``latest`` at it, prune."""
        manifest = json.loads(self._manifest_text)
        try:
            manifest["files"] = complete_digests(self.tmp, gathered, skip=(MANIFEST_FILE,))
            write_text_atomic(self.tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint {self.path.name} not saved, its partial files removed"
                                  f"{_previous_kept(self.root)}: {describe_save_failure(e, self.tmp)}") from e
        if self.path.exists():  # the same step saved before (a resume from an earlier checkpoint)
            replaced = self.path.with_name(self.path.name + ".replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(self.path, replaced)
            os.rename(self.tmp, self.path)
            shutil.rmtree(replaced)
        else:
            os.rename(self.tmp, self.path)
        write_text_atomic(self.root / LATEST_FILE, self.path.name + "\n")
        prune_checkpoints(self.root, keep_last=self._keep_last, keep=self.path)


# Below this much free space a failed write is taken for a full disk, whatever the error says: torch's
# file writer reports one as "unexpected pos 704 vs 598".
_NEARLY_FULL_BYTES = 64 << 20


def describe_save_failure(error: BaseException, where: Path) -> str:
    """One line for a failed save: DCP's CheckpointException unwrapped into each rank's error, and a
    full disk said as such, with where and how much space is left."""
    causes = [exc for exc, _ in error.failures.values()] if isinstance(error, CheckpointException) else [error]
    text = describe_dcp_failure(error)
    free = _free_bytes(where)
    if any(_is_disk_full(cause) for cause in causes) or (free is not None and free < _NEARLY_FULL_BYTES):
        usage = f" ({free / 1e6:.1f} MB free)" if free is not None else ""
        return f"no space left on the device holding {where.parent}{usage}; free some space. ({text})"
    return text


def describe_dcp_failure(error: BaseException) -> str:
    """DCP's CheckpointException (a BaseException holding each failed rank's exception and traceback)
    as one line, ``rank R: Type: first line`` per rank; any other error as ``Type: first line``."""
    if isinstance(error, CheckpointException) and error.failures:
        return "; ".join(f"rank {r}: {_one_line(exc)}" for r, (exc, _) in sorted(error.failures.items()))
    if isinstance(error, CheckpointException):
        return str(error).strip().splitlines()[0]
    return _one_line(error)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}" + (" ..." if len(lines) > 1 else "")


def _is_disk_full(error: BaseException | None) -> bool:
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _agree_or_abandon(root: Path, tmp: Path, value, error: str | None) -> list:
    """Every rank's ``value``; or, when any rank failed, the partial save ``tmp`` removed and one
    CheckpointError on every rank saying so (call on all ranks)."""
    try:
        return gather_from_ranks(value, error)
    except CheckpointError as e:
        run_on_rank0(lambda: shutil.rmtree(tmp, ignore_errors=True))
        name = tmp.name.removesuffix(".tmp")
        raise CheckpointError(f"checkpoint {name} not saved, its partial files removed{_previous_kept(root)}: "
                              f"{e}") from None


def _previous_kept(root: Path) -> str:
    kept = complete_checkpoints(root)
    return f" ({kept[-1].name} is kept)" if kept else ""


def save_checkpoint(out_dir: str | os.PathLike, *, step: int, pmodel: ParallelModel | nn.Module,
                    optimizer: torch.optim.Optimizer | None, scheduler=None, extra_state: dict | None = None,
                    config_dict: dict | None = None, keep_last: int = 3, async_save: bool = False,
                    async_group=None) -> PendingSave:
    """Writes ``OUT/checkpoints/step_NNNNNN`` from every rank (call it on all ranks, at the same step).

    ``extra_state`` is this rank's JSON-able state (the data loader's position...); ``config_dict`` the
    resolved run config (JSON-able, rank 0's is written); ``scheduler`` any object with
    ``state_dict()`` / ``load_state_dict()`` giving JSON-able state (torch's LR schedulers do).
    ``keep_last`` complete checkpoints are kept (by step; the one just written always). With
    ``async_save`` the shards are copied to CPU memory now, before this returns (so the next optimizer
    step may change them), and written in the background: call ``wait()`` on the result before the
    next save and before exiting. ``async_group``: the group of the background write's collectives
    (``async_save_group()``, made once per run); None: one made for this save.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(out_dir) / CHECKPOINTS_DIR
    tmp = _in_progress(root / checkpoint_name(step))
    this_rank = rank()
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": step, "world_size": world_size(),
                "layout": dataclasses.asdict(pmodel.dims.layout) if isinstance(pmodel, ParallelModel) else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None}
    # As text now: what an asynchronous save writes later is the state of this step.
    texts, errors = {}, []
    for key, value, what in (("manifest", manifest, "the scheduler's state_dict"),
                             ("config", config_dict or {}, "config_dict"),
                             ("extra", extra_state or {}, f"extra_state of rank {this_rank}")):
        try:
            texts[key] = json.dumps(value, indent=2) + "\n"
        except (TypeError, ValueError) as e:
            errors.append(f"{what} must be JSON-able: {e}")
    raise_if_any_rank_failed("; ".join(errors) or None)

    def prepare() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)  # a crashed attempt at this step
        try:
            (tmp / RANK_STATE_DIR).mkdir(parents=True)
            write_text_atomic(tmp / RUN_CONFIG_FILE, texts["config"])
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"checkpoint {tmp.name.removesuffix('.tmp')} not saved"
                                  f"{_previous_kept(root)}: {describe_save_failure(e, tmp)}") from e
    run_on_rank0(prepare)

    error = None
    try:
        stem = tmp / RANK_STATE_DIR / f"rank_{this_rank:05d}"
        torch.save(rng_state(), stem.with_suffix(".pt"))
        write_text_atomic(stem.with_suffix(".json"), texts["extra"])
    except (OSError, RuntimeError) as e:
        error = f"cannot write {tmp / RANK_STATE_DIR}: {describe_save_failure(e, tmp)}"
    _agree_or_abandon(root, tmp, None, error)

    state = _dcp_state(pmodel, optimizer if _holds_parameters(optimizer) else None)
    writer = dcp.FileSystemWriter(tmp)
    if not async_save:
        digests, error = None, None
        try:
            with single_process_quiet():
                dcp.save(state, storage_writer=writer, no_dist=world_size() == 1)
            digests = digest_own_files(tmp, this_rank)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - every rank hears of it in wait()
            error = describe_save_failure(e, tmp)
        pending = PendingSave(root, step, texts["manifest"], keep_last, digests=digests, error=error)
        pending.wait()
        return pending
    owns_group = async_group is None
    group = async_save_group() if owns_group else async_group
    # FileSystemWriter is a BlockingAsyncStager: async_save copies the state to CPU memory before it
    # returns a plain Future (not an AsyncSaveResponse, whose staging would still be running). This
    # rank's checksums are computed in the write's thread once it is done.
    future = _then_digest(dcp.async_save(state, storage_writer=writer, process_group=group), tmp, this_rank)
    return PendingSave(root, step, texts["manifest"], keep_last, future, group, owns_group)


def _then_digest(write: Future, tmp: Path, this_rank: int) -> Future:
    """A future of this rank's file digests, computed when ``write`` has finished (in its thread)."""
    digests: Future = Future()

    def finished(done: Future) -> None:
        try:
            done.result()
            digests.set_result(digest_own_files(tmp, this_rank))
        except BaseException as e:  # noqa: BLE001 - CheckpointException is one; wait() reports it
            digests.set_exception(e)
    write.add_done_callback(finished)
    return digests


def _in_progress(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def prune_checkpoints(root: Path, *, keep_last: int, keep: Path | None = None) -> list[Path]:
    """Deletes complete checkpoints beyond the newest ``keep_last`` (by step; ``keep`` always counts
    among them); ``.tmp`` directories are left alone. → the deleted directories."""
    newest_first = complete_checkpoints(root)[::-1]
    kept = [keep] if keep in newest_first else []
    kept += [path for path in newest_first if path != keep][:keep_last - len(kept)]
    doomed = [path for path in newest_first if path not in kept]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def complete_checkpoints(root: Path) -> list[Path]:
    """``step_N`` directories of ``root`` (renamed into place only once complete), by step."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.fullmatch(path.name).group(1))


# ----------------------------------------------------------------------------------------------
# resume


@dataclasses.dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` restored besides the model and optimizer."""

    directory: Path
    step: int
    config: dict                 # the run config saved with it
    extra_state: dict | None     # this rank's; None when the saving run had no rank of this number
    saved_world_size: int
    rng_restored: bool           # False when the world size changed (RNG streams are per rank)


def resolve_resume(out_dir: str | os.PathLike, resume: str, *, fallback: bool = True) -> Path | None:
    """``train.resume`` → the checkpoint directory to load, verified, or None to start fresh; call on
    all ranks (the files' checksums are verified by all of them together).

    ``none``: None. ``auto``: the checkpoint ``OUT/checkpoints/latest`` names, then the other complete
    ``step_N`` newest first (``.tmp`` directories, incomplete, are ignored); the first one whose
    manifest, metadata and checksums are good, saying why each newer one was passed over; None when
    there is none. With ``fallback`` False the first bad one is an error instead. An error too when
    checkpoints exist and none is good. Anything else is a checkpoint path, which must be good.
    """
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        check_checkpoint(path)
        return path
    root = Path(out_dir) / CHECKPOINTS_DIR
    candidates, passed_over = [], []
    latest = root / LATEST_FILE
    named = None
    if latest.is_file():
        name = latest.read_text().strip()
        named = root / name if name else None
        if named is not None and not _inside(named, root):
            log.warning("checkpoint: %s names %s, outside this run's directory %s; resuming from it", latest,
                        named, root)
        if named is None or not named.is_dir():
            passed_over.append(f"{latest} names {name!r}, which is not a checkpoint directory")
            named = None
        else:
            candidates.append(named)
    candidates += [path for path in reversed(complete_checkpoints(root)) if path != named]
    for path in candidates:
        if passed_over and not fallback:
            break
        try:
            check_checkpoint(path)
        except CheckpointError as e:
            passed_over.append(str(e))
            continue
        for reason in passed_over:
            log.warning("checkpoint: passed over: %s", reason)
        if passed_over:
            log.warning("checkpoint: resuming from %s, the newest good checkpoint", path)
        return path
    if not passed_over:
        return None
    listed = "\n  ".join(passed_over)
    hint = ("train.resume_fallback=true resumes from the newest good checkpoint instead; " if not fallback else "")
    raise CheckpointError(f"cannot resume from {root}:\n  {listed}\n{hint}train.resume=none starts afresh; "
                          f"train.resume=PATH picks one")


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def check_checkpoint(directory: Path) -> dict:
    """The manifest of a complete checkpoint whose metadata reads and whose files match their recorded
    checksums, or a CheckpointError naming what is wrong (on every rank; call on all ranks)."""
    error, manifest = None, None
    try:
        manifest = _read_manifest(directory)
        _read_dcp_metadata(directory)
    except CheckpointError as e:
        error = str(e)
    raise_if_any_rank_failed(error)
    if "files" not in manifest:
        log.warning("checkpoint: %s records no checksums (written by an older pivot_mega): not verified", directory)
    verify_files(directory, manifest.get("files"))
    return manifest


def load_checkpoint(directory: str | os.PathLike, *, pmodel: ParallelModel | nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                    restore_rng: bool = True, verify: bool = True) -> LoadedCheckpoint:
    """Loads a checkpoint into this run's model (any layout), optimizer and scheduler; call on all ranks.

    Without ``optimizer`` only the model is loaded. Gradients are cleared (the optimizer state is
    created, then overwritten). The checkpoint is checked against the model first: a missing,
    unexpected or mis-shaped tensor is an error that names it, on every rank. Its files are checked
    against their checksums (``verify``; False for a directory ``resolve_resume`` has just checked).
    """
    directory = Path(directory)
    manifest = check_checkpoint(directory) if verify else _read_manifest(directory)
    metadata = _read_dcp_metadata(directory)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    state = _dcp_state(pmodel, optimizer if _holds_parameters(optimizer) else None)
    _check_fits(directory, metadata, state, model_config(pmodel))
    if scheduler is not None and manifest.get("scheduler") is None:
        raise CheckpointError(f"{directory / MANIFEST_FILE}: holds no scheduler state, but a scheduler was given")

    try:
        with single_process_quiet():
            dcp.load(state, storage_reader=MetadataReader(directory), planner=_WeightsOnlyLoadPlanner(),
                     no_dist=world_size() == 1)
    except CheckpointException as e:  # a BaseException: an `except Exception` above would miss it
        raise CheckpointError(f"{directory}: reading the checkpoint failed: {describe_dcp_failure(e)}") from None
    module = rank_module(pmodel)
    if not _holds_parameters(optimizer):
        set_model_state_dict(module, state["model"])
    else:
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=_STATE_DICT_OPTIONS)
    if scheduler is not None:
        scheduler.load_state_dict(manifest["scheduler"])

    stem = directory / RANK_STATE_DIR / f"rank_{rank():05d}"
    rng_restored = restore_rng and manifest["world_size"] == world_size()
    extra_state, error = None, None
    try:
        if stem.with_suffix(".json").is_file():
            extra_state = json.loads(stem.with_suffix(".json").read_text())
        if rng_restored:
            set_rng_state(torch.load(stem.with_suffix(".pt"), weights_only=True))
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
        error = f"{directory}: cannot restore rank {rank()}'s state from {stem}.pt / .json ({type(e).__name__}: {e})"
    raise_if_any_rank_failed(error)
    config_path = directory / RUN_CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return LoadedCheckpoint(directory=directory, step=int(manifest["step"]), config=config, extra_state=extra_state,
                            saved_world_size=int(manifest["world_size"]), rng_restored=rng_restored)


def _read_manifest(directory: Path) -> dict:
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: incomplete or not a training checkpoint (no {MANIFEST_FILE}, which "
                              f"is written last)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt ({e})") from e
    if manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a pivot_mega training checkpoint (format {manifest.get('format')!r}); "
                              f"portable model checkpoints are loaded with init_from")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {manifest.get('format_version')} is not supported "
                              f"(this pivot_mega reads {FORMAT_VERSION})")
    if not (directory / DCP_METADATA_FILE).is_file():
        raise CheckpointError(f"{directory}: incomplete checkpoint, no DCP metadata file {DCP_METADATA_FILE}")
    return manifest


def _read_dcp_metadata(directory: Path) -> Metadata:
    try:
        return MetadataReader(directory).read_metadata()
    except CheckpointError:
        raise  # a class DCP never writes, named
    except Exception as e:  # noqa: BLE001 - unpickling a damaged file raises anything
        raise CheckpointError(f"{directory / DCP_METADATA_FILE}: cannot read the checkpoint's metadata, it is "
                              f"corrupt or incomplete ({type(e).__name__}: {e})") from e


def _check_fits(directory: Path, metadata: Metadata, state: dict, config: ModelConfig) -> None:
    """Model tensors against the whole model's shapes (same answer on every rank), then this rank's
    optimizer entries; one error listing every problem, raised on every rank."""
    stored = metadata.state_dict_metadata
    model_entries = {key.removeprefix("model."): entry for key, entry in stored.items() if key.startswith("model.")}
    not_tensors = sorted(key for key, entry in model_entries.items() if not isinstance(entry, TensorStorageMetadata))
    if not_tensors:
        raise CheckpointError(f"{directory}: model entries {not_tensors[:_MAX_LISTED]} are not tensors")
    as_meta = {key: torch.empty(entry.size, dtype=entry.properties.dtype, device="meta")
               for key, entry in model_entries.items()}
    check_tensors(as_meta, expected_shapes(config), f"{directory} does not fit this run's model")

    problems = []
    if "optimizer" in state:
        if not any(key.startswith("optimizer.") for key in stored):
            problems.append("the checkpoint holds no optimizer state")
        else:
            for key, value in state["optimizer"].items():
                entry = stored.get(f"optimizer.{key}")
                if entry is None:
                    problems.append(f"missing optimizer entry {key}")
                elif isinstance(value, torch.Tensor) and (not isinstance(entry, TensorStorageMetadata) or
                                                          tuple(entry.size) != tuple(value.shape)):
                    shape = list(entry.size) if isinstance(entry, TensorStorageMetadata) else "not a tensor"
                    problems.append(f"optimizer entry {key} has shape {shape} in the checkpoint, "
                                    f"this run expects {list(value.shape)}")
    error = None
    if problems:
        shown = problems[:_MAX_LISTED] + ([f"... and {len(problems) - _MAX_LISTED} more"]
                                          if len(problems) > _MAX_LISTED else [])
        error = f"{directory} does not fit this run's optimizer:\n  " + "\n  ".join(shown)
    raise_if_any_rank_failed(error)


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries (optimizer hyper-parameters) are read with
    ``weights_only=True``: loading a checkpoint never unpickles arbitrary objects from its shards."""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# ----------------------------------------------------------------------------------------------
# the state DCP writes and reads


def _holds_parameters(optimizer: torch.optim.Optimizer | None) -> bool:
    """False for an optimizer with nothing to train on this rank (a pipeline stage of frozen towers has
    one empty group so it can step with the others): it has no state to save or restore."""
    return optimizer is not None and any(group["params"] for group in optimizer.param_groups)


def _dcp_state(pmodel: ParallelModel | nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    module = rank_module(pmodel)
    if optimizer is None:
        return {"model": get_model_state_dict(module)}
    model_state, optimizer_state = get_state_dict(module, optimizer, options=_STATE_DICT_OPTIONS)
    return {"model": model_state, "optimizer": optimizer_state}
