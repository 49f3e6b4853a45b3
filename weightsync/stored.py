"""One published version as the learner's version store (store.py) keeps it: what is announced
(`VersionInfo`) and the bytes with their checksums (`StoredVersion`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from puremesh.contract.weights import Manifest, chunk_count, chunk_range
from puremesh.weights.v1 import weights_pb2

# Chunks of the bulk data plane's CRC-32s: small enough that checking the last one adds little
# after the last byte, and that a bad one is cheap to send again.
DEFAULT_BULK_CHUNK_BYTES = 1 << 20


class VersionNotFound(LookupError):
    """The version is not retained (evicted, revoked, or never published)."""


@dataclass(frozen=True)
class VersionInfo:
    """A published version, as announced (total_chunks at the store's chunk size)."""

    version: int
    total_bytes: int
    total_chunks: int
    num_tensors: int
    sha256: str
    chunk_bytes: int
    published_at: float  # time.time()
    transport: int = weights_pb2.TRANSPORT_GRPC_STREAM  # the announced data path
    bulk_port: int = 0  # the bulk data plane's port; 0 = none
    bulk_host: str = ""  # announced bulk host; empty = the host the replica reaches the learner at
    bulk_chunk_bytes: int = DEFAULT_BULK_CHUNK_BYTES  # chunk size of the CRC-32s
    run_id: str = ""  # the learner run (weights.proto VersionAnnouncement.run_id)
    bulk_protocol: int = 1  # 2: the bulk port authenticates every connection (weights.proto)
    bulk_tls: bool = False  # the bulk port speaks TLS


class StoredVersion:
    """One retained version: manifest, bytes (read-only memoryview) and checksums."""

    def __init__(
        self,
        info: VersionInfo,
        manifest: Manifest,
        storage: torch.Tensor,
        chunk_sha256: list[str],
        chunk_crc32: list[int],
    ) -> None:
        self.info = info
        self.manifest = manifest
        self.storage = storage  # owns the bytes that `data` views
        self.data = memoryview(storage.numpy()).toreadonly()
        self._chunk_sha: dict[int, list[str | None]] = {info.chunk_bytes: list(chunk_sha256)}
        self.chunk_crc32 = list(chunk_crc32)  # CRC-32 of each chunk at info.bulk_chunk_bytes
        self.readers = 0  # WeightStore.acquire / release
        self.revoked = False  # evicted while read: readers stop at their next chunk or slice

    def chunk_range(self, index: int, chunk_bytes: int) -> tuple[int, int]:
        return chunk_range(index, chunk_bytes, self.info.total_bytes)

    def chunk_sha256(self, index: int, chunk_bytes: int) -> str:
        """Hex SHA-256 of chunk `index` at `chunk_bytes` (precomputed at the default size,
        computed once and cached at any other)."""
        digests = self._chunk_sha.get(chunk_bytes)
        if digests is None:
            digests = self._chunk_sha[chunk_bytes] = [None] * chunk_count(self.info.total_bytes, chunk_bytes)
        digest = digests[index]
        if digest is None:
            start, stop = self.chunk_range(index, chunk_bytes)
            digest = digests[index] = hashlib.sha256(self.data[start:stop]).hexdigest()
        return digest
