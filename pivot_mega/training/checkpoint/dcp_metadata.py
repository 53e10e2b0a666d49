"""DCP's ``.metadata`` read without running code: a pickle, unpickled admitting only what DCP writes.

``torch.distributed.checkpoint`` stores a checkpoint's index (tensor names, shapes, dtypes, which file
holds which bytes) as a pickle, and a plain ``pickle.load`` of a crafted one runs any code it names.
``MetadataReader`` is DCP's ``FileSystemReader`` with that one load replaced by an unpickler whose
``find_class`` admits the classes below and refuses anything else by name, before it is imported.
"""

from __future__ import annotations

import pickle
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from ...models.checkpoint_files import CheckpointError

# What DCP's save writes into .metadata (listed from real checkpoints of this project with pickletools),
# as module → names. Each is a dataclass, an enum or a path: building one runs no code of the file's choosing.
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # torch.layout pickles as _get_layout("torch.strided")
    "torch": frozenset({"Size"}),  # and the dtypes / memory formats, checked by type in find_class
    "pathlib": frozenset({"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "pathlib._local": frozenset({"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and name.isidentifier() and isinstance(getattr(torch, name, None),
                                                                    (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise CheckpointError(f"{self._path}: refusing to unpickle {module}.{name}, which DCP metadata never holds "
                              f"(a crafted checkpoint could run code); only resume from checkpoints you trust")


class MetadataReader(dcp.FileSystemReader):
    """``dcp.FileSystemReader`` whose ``read_metadata`` admits only the classes DCP writes; pass it to
    ``dcp.load`` wherever a checkpoint directory is read. The rest is torch's ``read_metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        where = getattr(self, "_get_metadata_path", None)  # torch >= 2.6; before, always ".metadata"
        path = where(kwargs.get("rank")) if where is not None else self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as metadata_file:
            metadata = _MetadataUnpickler(metadata_file, path).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP's Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
