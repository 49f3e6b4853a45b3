"""The weight layout of weights.proto, written once for the learner and the replicas.

A version's tensors are concatenated, in manifest order, into one byte string (each tensor
C-contiguous, little-endian, no padding); a manifest entry (`TensorSpec`) says where each lies.
This module lays (name, tensor) pairs out into a manifest (`lay_out`, `copy_into`), checks a
received manifest (`parse_manifest`), rebuilds the tensors from the bytes (`rebuild_tensors`),
and encodes / decodes a WeightChunk around its `data` field without copying it
(`encode_chunk`, `split_chunk`): protobuf encodes and parses the other fields, the caller's job.

Pure: the standard library and torch, plain values in and out (docs/LAYOUT.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

# Policy versions are integers in [0, MAX_VERSION]: exact in float64, so metrics and JSON carry
# them unchanged (weights.proto's uint64 fields could hold more; larger ones are refused).
MAX_VERSION = 2**53

# WeightChunk.data: field 5, wire type LEN (weights.proto)
CHUNK_DATA_FIELD = 5
_WIRE_LEN = 2
_DATA_KEY = bytes([(CHUNK_DATA_FIELD << 3) | _WIRE_LEN])


class ManifestError(ValueError):
    """A manifest that contradicts the layout (gaps, overlaps, sizes, unknown dtypes)."""


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lies in a version's concatenated bytes (weights.proto TensorSpec)."""

    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class SpecLike(Protocol):
    """Anything with TensorSpec's fields, e.g. the protobuf message."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> Iterable[int]: ...
    @property
    def offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...


Manifest = tuple[TensorSpec, ...]


def chunk_count(total_bytes: int, chunk_bytes: int) -> int:
    """Chunks of a version at `chunk_bytes`; a version of 0 bytes still has one (empty) chunk,
    which carries the manifest."""
    return max(1, math.ceil(total_bytes / chunk_bytes))


def chunk_range(index: int, chunk_bytes: int, total_bytes: int) -> tuple[int, int]:
    """Bytes [start, stop) of chunk `index` at `chunk_bytes` (the last one may be shorter)."""
    start = index * chunk_bytes
    return start, min(start + chunk_bytes, total_bytes)


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype name ("float32", "bfloat16", ...)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ManifestError(f"unknown tensor dtype {name!r} in the manifest")
    return dtype


def lay_out(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[Manifest, list[torch.Tensor]]:
    """Check the (name, tensor) pairs and lay them out one after the other, in order: the
    manifest and the detached tensors. ValueError for anything but unique (name, Tensor) pairs."""
    manifest: list[TensorSpec] = []
    tensors: list[torch.Tensor] = []
    seen: set[str] = set()
    offset = 0
    for item in named_tensors:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ValueError(f"expected (name, tensor) pairs, got {type(item).__name__}")
        name, tensor = item
        if not isinstance(name, str) or not name or not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"expected (non-empty str, Tensor) pairs, got ({name!r}, {type(tensor).__name__})"
            )
        if name in seen:
            raise ValueError(f"tensor {name!r} given twice")
        seen.add(name)
        tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        dtype = str(tensor.dtype).removeprefix("torch.")
        manifest.append(TensorSpec(name, dtype, tuple(tensor.shape), offset, nbytes))
        tensors.append(tensor)
        offset += nbytes
    return tuple(manifest), tensors


def copy_into(storage: torch.Tensor, manifest: Manifest, tensors: Sequence[torch.Tensor]) -> None:
    """Copy each tensor's bytes (C-contiguous) to its place in the uint8 CPU `storage`.

    From CPU tensors through numpy (a plain memcpy, measured 5-10x faster than torch's uint8
    copy_ kernel); from device tensors with copy_ (one device-to-host transfer each).
    """
    array = storage.numpy()
    for spec, tensor in zip(manifest, tensors, strict=True):
        if not spec.nbytes:
            continue
        source = tensor.contiguous().reshape(-1).view(torch.uint8)
        if source.device.type == "cpu":
            array[spec.offset : spec.offset + spec.nbytes] = source.numpy()
        else:
            storage[spec.offset : spec.offset + spec.nbytes].copy_(source)


def parse_manifest(specs: Iterable[SpecLike], total_bytes: int) -> Manifest:
    """The manifest, checked: it tiles [0, total_bytes) in order, each size matching its shape
    and dtype. ManifestError otherwise."""
    manifest = []
    offset = 0
    for spec in specs:
        entry = TensorSpec(spec.name, spec.dtype, tuple(spec.shape), spec.offset, spec.nbytes)
        expected = math.prod(entry.shape) * dtype_of(entry.dtype).itemsize
        if entry.offset != offset or entry.nbytes != expected or min(entry.shape, default=0) < 0:
            raise ManifestError(f"inconsistent manifest entry {entry}")
        manifest.append(entry)
        offset += entry.nbytes
    if offset != total_bytes:
        raise ManifestError(f"the manifest covers {offset} bytes, the version has {total_bytes}")
    return tuple(manifest)


def rebuild_tensors(buffer: torch.Tensor, manifest: Sequence[TensorSpec]) -> list[tuple[str, torch.Tensor]]:
    """The tensors of `manifest` from a uint8 `buffer` holding the version's bytes.

    A tensor whose offset is a multiple of its element size is a view of `buffer` (no copy: the
    buffer is freed once the last tensor is, e.g. right after the engine copied them into the
    model); the others (after an odd-sized tensor) are copied to aligned memory.
    """
    tensors = []
    for spec in manifest:
        dtype = dtype_of(spec.dtype)
        raw = buffer[spec.offset : spec.offset + spec.nbytes]
        if spec.offset % dtype.itemsize:
            raw = raw.clone()
        tensor = raw.view(dtype).view(spec.shape) if spec.nbytes else torch.empty(spec.shape, dtype=dtype)
        tensors.append((spec.name, tensor))
    return tensors


# ---------------------------------------------------------------------- the WeightChunk codec


def encode_chunk(head: bytes, data: memoryview | bytes) -> bytes:
    """The wire bytes of a WeightChunk: `head` (every other field, encoded by protobuf) with
    the data field appended (a message is the concatenation of its fields, in any order), with
    one copy of the data (protobuf's own encoding takes three)."""
    if not len(data):
        return head
    return b"".join((head, _DATA_KEY, _varint(len(data)), data))


def split_chunk(message: bytes | memoryview) -> tuple[bytes, memoryview]:
    """The inverse of `encode_chunk`, for any field order: (the other fields' bytes, a view of
    the data). The caller parses the first with protobuf, which would copy the data twice."""
    view = memoryview(message)
    end = len(view)
    pos = 0
    data = view[0:0]
    others = []
    while pos < end:
        start = pos
        key, pos = _read_varint(view, pos)
        wire = key & 7
        if wire == _WIRE_LEN:
            length, pos = _read_varint(view, pos)
            if key >> 3 == CHUNK_DATA_FIELD:
                data = view[pos : pos + length]
                pos += length
                continue
            pos += length
        else:
            pos = _skip_scalar(view, pos, wire)
        if pos > end:
            raise ValueError("truncated WeightChunk")
        others.append(view[start:pos])
    if pos != end:
        raise ValueError("truncated WeightChunk")
    return b"".join(others), data


def _skip_scalar(view: memoryview, pos: int, wire: int) -> int:
    """The position after a varint (0), fixed64 (1) or fixed32 (5) value."""
    if wire == 0:
        return _read_varint(view, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire} in a WeightChunk")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError("truncated or overlong varint in a WeightChunk")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
