"""Checksums of a training checkpoint's files: recorded before the checkpoint is renamed into place,
verified before it is loaded.

Every rank hashes the files it wrote itself (its DCP shards ``__R_*.distcp`` and its ``rank_state``
files; rank 0 also ``.metadata`` and ``config.json``), in the write's own thread for an asynchronous
save; rank 0 gathers the lists and hashes whatever nobody claimed, so the manifest covers every file
in the directory. On load the files are split over the ranks, each verifying its share, and any
mismatch is raised on every rank naming the file.

    "files": {"__0_0.distcp": {"bytes": 123456, "sha256": "9f86d0..."}, ...}   in checkpoint.json
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path

from .ranks import raise_if_any_rank_failed, rank, world_size

log = logging.getLogger(__name__)
_CHUNK = 8 << 20
# Files a rank writes into a checkpoint, besides the ones rank 0 writes for everyone.
_RANK_FILES = ("rank_state/rank_{rank:05d}.pt", "rank_state/rank_{rank:05d}.json")
_RANK0_FILES = (".metadata", "config.json")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def files_written_by(directory: Path, this_rank: int) -> list[str]:
    """The files of ``directory`` that rank ``this_rank`` wrote (relative names)."""
    shard = re.compile(rf"__{this_rank}_\d+\.distcp")
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and shard.fullmatch(p.name))
    names += [pattern.format(rank=this_rank) for pattern in _RANK_FILES]
    if this_rank == 0:
        names += list(_RANK0_FILES)
    return [name for name in names if (directory / name).is_file()]


def digest_own_files(directory: Path, this_rank: int) -> dict[str, dict]:
    """{name: {bytes, sha256}} of the files this rank wrote; runs without collectives (any thread)."""
    return {name: describe_file(directory / name) for name in files_written_by(directory, this_rank)}


def complete_digests(directory: Path, gathered: list[dict[str, dict]], *, skip: tuple[str, ...]) -> dict[str, dict]:
    """Rank 0: the ranks' digests merged, plus any file of ``directory`` nobody claimed (hashed here)."""
    files: dict[str, dict] = {}
    for part in gathered:
        files.update(part)
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and name not in files and name not in skip:
            files[name] = describe_file(path)
    return dict(sorted(files.items()))


def verify_files(directory: Path, files: dict[str, dict] | None) -> None:
    """Checks every recorded file's size and SHA-256, the files split over the ranks; call on all ranks.
    One CheckpointError on every rank naming each bad file. ``files`` None (a checkpoint written before
    checksums were recorded): nothing to verify."""
    if files is None:
        return
    names = sorted(files)
    mine = names[rank()::world_size()]
    problems, started, checked = [], time.perf_counter(), 0
    for name in mine:
        path, recorded = directory / name, files[name]
        if not path.is_file():
            problems.append(f"{path}: missing (the checkpoint recorded {recorded['bytes']} bytes)")
            continue
        size = path.stat().st_size
        if size != recorded["bytes"]:
            problems.append(f"{path}: {size} bytes, the checkpoint recorded {recorded['bytes']} (truncated or "
                            f"overwritten)")
            continue
        if sha256_of(path) != recorded["sha256"]:
            problems.append(f"{path}: corrupt, its SHA-256 differs from the one recorded when it was written")
        checked += size
    raise_if_any_rank_failed("; ".join(problems) or None)
    log.info("checkpoint: %s verified: %d file(s), %.1f MB read on this rank in %.2f s", directory.name, len(files),
             checked / 1e6, time.perf_counter() - started)
