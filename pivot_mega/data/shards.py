"""WebDataset shards: their format, and samples read back by their index (``ShardSet``);
``shard_builder`` writes them.

A shard directory holds
  NNNNNN.tar      members ``KEY.json`` (text fields, source file/line/id) and ``KEY.jpg|png|webp``
                  (``KEY.0.jpg``, ``KEY.1.png``, ... for several images), original image bytes
  NNNNNN.idx      DALI webdataset index (``v1.2 N`` then per sample ``ext offset size name ...``)
  manifest.json   counts per source and reason, every skipped sample with its reason, the shards
Keys are the global sample number (``000000042``), so they are unique even when source ids are not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from .sources import DataError, validate_text

FORMAT_NAME = "pivot_mega.shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_VERSION = "v1.2"
REBUILD = "rebuild the shards with `pivot-mega data build-shards` (or copy this file again)"

@dataclasses.dataclass(frozen=True)
class Member:
    """Where one tar member's bytes are: shard number, byte offset, size; its name for messages."""

    shard: int
    offset: int
    size: int
    name: str = ""


class BadSidecar(DataError):
    """One sample's sidecar cannot be used while the rest of the shard set can: the loader skips the
    sample and counts ``reason``. The message names the tar, the member and the sample id (or key)."""

    reason = "bad_sidecar"

    def __init__(self, message: str, sample_id: str):
        super().__init__(message)
        self.sample_id = sample_id


class ShardSet:
    """Random access to the samples of a shard directory through its DALI index files.

    Sample ``i`` is the i-th sample over the shards in order (its key is ``f"{i:09d}"``).
    Thread-safe: reads are ``os.pread`` on descriptors opened once. A shard set whose manifest,
    index or tar files are missing, cut or not what they claim raises DataError here, before any
    step; one bad sidecar raises BadSidecar when it is read.
    """

    def __init__(self, directory: str | os.PathLike):
        self._fds: dict[int, int] = {}
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        raw = _read_manifest_bytes(self.directory)
        self.manifest = _parse_manifest(manifest_path, raw)
        self.fingerprint = hashlib.sha256(raw).hexdigest()[:16]
        self.samples: list[dict[str, Member]] = []
        for number, shard in enumerate(self.manifest["shards"]):
            entries = read_index(self.directory / shard["index"], number)
            if len(entries) != shard["samples"]:
                raise DataError(f"{self.directory / shard['index']}: {len(entries)} samples, "
                                f"manifest says {shard['samples']}")
            _check_tar(self.directory / shard["tar"], entries)
            self.samples += entries
        if len(self.samples) != self.manifest["counts"]["written"]:
            raise DataError(f"{manifest_path}: shards hold {len(self.samples)} samples, "
                            f"manifest says {self.manifest['counts']['written']}")

    def __len__(self) -> int:
        return len(self.samples)

    def tar_path(self, member: Member) -> Path:
        return self.directory / self.manifest["shards"][member.shard]["tar"]

    def read(self, member: Member) -> bytes:
        fd = self._fds.get(member.shard)
        if fd is None:
            try:
                fd = self._fds[member.shard] = os.open(self.tar_path(member), os.O_RDONLY)
            except FileNotFoundError:
                raise DataError(f"{self.tar_path(member)}: no such file (it was there when training started)") from None
        data = os.pread(fd, member.size, member.offset)
        if len(data) != member.size:
            raise DataError(f"{self.tar_path(member)}: short read of member {member.name} at {member.offset} "
                            f"({len(data)} of {member.size} bytes); the shard is truncated")
        return data

    def sidecar(self, index: int) -> dict:
        """The JSON sidecar of sample ``index``, checked as the build checked it; BadSidecar when it
        is not JSON or lacks a field the templates need."""
        members = self.samples[index]
        key = f"{index:09d}"
        if "json" not in members:
            where = self.tar_path(next(iter(members.values())))
            raise BadSidecar(f"{where}: sample {key} has no .json member, only {sorted(members)}", key)
        member = members["json"]
        where = f"{self.tar_path(member)}: member {member.name}"
        try:
            sidecar = json.loads(self.read(member))
        except json.JSONDecodeError as e:
            raise BadSidecar(f"{where}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})",
                            key) from None
        except UnicodeDecodeError:
            raise BadSidecar(f"{where}: not valid JSON (not UTF-8 text)", key) from None
        sample_id = sidecar.get("id") if isinstance(sidecar, dict) else None
        sample_id = sample_id if isinstance(sample_id, str) and sample_id else key
        problem = _sidecar_problem(sidecar, members)
        if problem:
            raise BadSidecar(f"{where}: sample {sample_id!r}: {problem}", sample_id)
        return sidecar

    def image_bytes(self, index: int, ext: str) -> bytes:
        return self.read(self.samples[index][ext])

    def member(self, index: int, ext: str) -> str:
        """``"<tar path>: member <name>"`` of one member, for messages."""
        member = self.samples[index][ext]
        return f"{self.tar_path(member)}: member {member.name}"

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        self.close()


def _read_manifest_bytes(directory: Path) -> bytes:
    try:
        return (directory / MANIFEST).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{directory}: no {MANIFEST}; build shards with `pivot-mega data build-shards`") from None


def _parse_manifest(path: Path, raw: bytes) -> dict:
    """The manifest, with the keys reading needs checked; DataError naming the file and the key."""
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; {REBUILD}")
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}): the file is cut short or "
                        f"corrupt; {REBUILD}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid JSON (not UTF-8 text): the file is corrupt; {REBUILD}") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME
            or manifest.get("format_version") != FORMAT_VERSION):
        raise DataError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} manifest; {REBUILD}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise DataError(f"{path}: 'shards' must be a list of {{tar, index, samples}}, got {shards!r}; {REBUILD}")
    for i, shard in enumerate(shards):
        fields = isinstance(shard, dict) and all(isinstance(shard.get(k), t)
                                                 for k, t in (("tar", str), ("index", str), ("samples", int)))
        if not fields:
            raise DataError(f"{path}: shards[{i}] needs 'tar', 'index' (file names) and 'samples' (a count), "
                            f"got {shard!r}; {REBUILD}")
    counts = manifest.get("counts")
    if not isinstance(counts, dict) or not all(isinstance(counts.get(k), int) for k in ("written", "conversations")):
        raise DataError(f"{path}: 'counts' needs 'written' and 'conversations' sample counts, got {counts!r}; "
                        f"{REBUILD}")
    return manifest


def _check_tar(path: Path, entries: list[dict[str, Member]]) -> None:
    """The tar exists and holds every byte its index points at (a cut copy fails here, not mid-run)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; the manifest lists it as a shard; {REBUILD}") from None
    cut = [m for entry in entries for m in entry.values() if m.offset + m.size > size]
    if cut:
        first = min(cut, key=lambda m: m.offset)
        raise DataError(f"{path}: truncated: member {first.name} ends at byte {first.offset + first.size}, "
                        f"the file has {size} bytes ({len(cut)} member(s) cut off); {REBUILD}")


def _sidecar_problem(sidecar, members: dict[str, Member]) -> str | None:
    """What makes a sidecar unusable (the fields ``_write_sample`` writes), or None."""
    if not isinstance(sidecar, dict):
        return f"expected a JSON object, got {type(sidecar).__name__}"
    if not isinstance(sidecar.get("id"), str) or not sidecar["id"]:
        return f"'id' must be a non-empty string, got {sidecar.get('id')!r}"
    images = sidecar.get("images")
    if not isinstance(images, list) or not all(isinstance(m, str) for m in images):
        return f"'images' must be a list of member extensions, got {images!r}"
    missing = [m for m in images if m not in members]
    if missing:
        return f"'images' names {missing}, members this sample does not have (it has {sorted(members)})"
    kind = {"conversation": "llava", "pair": "dpo"}.get(sidecar.get("type"))
    if kind is None:
        return f"'type' must be 'conversation' or 'pair', got {sidecar.get('type')!r}"
    checked = validate_text(sidecar, kind, len(images))
    return f"{checked[1]} ({checked[0]})" if isinstance(checked, tuple) else None


def read_index(path: Path, shard: int) -> list[dict[str, Member]]:
    """Samples of one DALI index file: per sample {ext: Member}."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; the manifest lists it as a shard index; {REBUILD}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a DALI webdataset index (not text); {REBUILD}") from None
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise DataError(f"{path}: not a DALI webdataset index ({INDEX_VERSION} N); {REBUILD}")
    entries = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise DataError(f"{path}:{lineno}: expected groups of 'ext offset size name'; {REBUILD}")
        try:
            entries.append({fields[i]: Member(shard, int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                            for i in range(0, len(fields), 4)})
        except ValueError:
            raise DataError(f"{path}:{lineno}: offsets and sizes must be whole numbers, got {line!r}; "
                            f"{REBUILD}") from None
    if len(entries) != int(header[1]):
        raise DataError(f"{path}: header says {header[1]} samples, found {len(entries)}")
    return entries
