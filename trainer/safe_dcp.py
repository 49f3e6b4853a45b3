"""Reading torch.distributed.checkpoint (DCP) directories without unpickling arbitrary objects.

DCP keeps its index in a pickled `.metadata` file, which `FileSystemReader.read_metadata` opens
with plain `pickle.load`; and `DefaultLoadPlanner.load_bytes` reads non-tensor items with
`torch.load(weights_only=False)`. A checkpoint directory is input like any other, so here:

- `SafeReader` unpickles `.metadata` with `MetadataUnpickler`, which resolves only the DCP
  metadata classes, torch's dtypes, sizes and layouts, and paths (`ALLOWED`); anything else is
  refused with `UnsafeCheckpoint`, naming what it asked for;
- `SafePlanner` refuses non-tensor items instead of unpickling them (trainer/checkpoint.py
  saves tensors only, and asks for tensors only);
- tensor data is read by DCP itself with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# (module, name) pairs a DCP .metadata file may refer to, besides torch's dtypes.
ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup of torch.strided and its kin by name
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpoint(ValueError):
    """The checkpoint's metadata asks for something a DCP index never holds."""


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED globals and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpoint(
            f"the checkpoint's .metadata refers to {module}.{name}, which a checkpoint index never "
            "holds; refusing to load it"
        )


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is read by MetadataUnpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = MetadataUnpickler(stream).load()
            except UnsafeCheckpoint:
                raise
            except Exception as error:
                raise UnsafeCheckpoint(f"unreadable checkpoint metadata {path} ({error})") from error
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpoint(f"{path} does not hold DCP metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that refuses non-tensor items instead of unpickling them (a puremesh
    checkpoint holds tensors only, and loading asks for tensors only)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise UnsafeCheckpoint(
            f"checkpoint item {read_item.dest_index.fqn!r} is not a tensor; puremesh checkpoints hold "
            "tensors only, and other items are never unpickled"
        )
