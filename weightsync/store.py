"""The learner's version store: snapshots of each new policy version, kept for the replicas.

`WeightStore` keeps the newest `retain` versions. `publish` copies the tensors, in the given
order, into ONE contiguous byte buffer (the layout of contract/weights.py), and computes once
the SHA-256 of the whole buffer, the SHA-256 of every chunk at the default chunk size and the
CRC-32 of every bulk chunk (threads: hashlib and the CRC-32 release the GIL), so that serving a
version to N replicas costs no hashing and no copy of the buffer (a chunk is a memoryview slice
of it). Then it wakes every waiter (the WatchVersions streams).

The readers of a version (servicer.py's FetchWeights, bulk_server.py) `acquire` and `release`
it. A version's buffer is reused for a later version of the same size once it is evicted and
nobody reads it (writing into mapped memory is several times faster than into fresh pages), so
steady publishing keeps `retain` (+1 while a slow reader holds one) buffers of the model's size.

Threads: `publish` may run on any thread (the training loop usually blocks its own); the
servicer and the `wait_*` helpers run on event loops, and the store wakes them thread-safely.
Shutdown: `close()` the store before draining the host that serves it: WatchVersions streams
never end on their own.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from prometheus_client import Gauge, Histogram

from puremesh.contract.bulk import crc32
from puremesh.contract.weights import Manifest, chunk_count, chunk_range, copy_into, lay_out
from puremesh.weights.v1 import weights_pb2

from .broadcast import Broadcast
from .replicas import ReplicaBook, ReplicaState

DEFAULT_RETAIN = 2
DEFAULT_CHUNK_BYTES = 4 << 20
# Chunks of the bulk data plane's CRC-32s: small enough that checking the last one adds little
# after the last byte, and that a bad one is cheap to send again.
DEFAULT_BULK_CHUNK_BYTES = 1 << 20

PUBLISH_SECONDS = Histogram(
    "puremesh_learner_weight_publish_seconds",
    "Time to snapshot, checksum and announce one policy version",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
PUBLISHED_VERSION = Gauge("puremesh_learner_weight_version", "Newest published policy version")


class VersionNotFound(LookupError):
    """The version is not retained (evicted, or never published)."""


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


class WeightStore:
    """Snapshots policy versions for the replicas to pull; see the module docstring.

    Args:
        retain: how many of the newest versions stay fetchable (older ones are NOT_FOUND).
            Keep at least 2, so that a replica still fetching version v when v+1 is published
            can finish.
        chunk_bytes: the default (and largest) chunk size of FetchWeights.
        hash_threads: threads that checksum a new version (0 = up to 4, one per core).
        bulk_chunk_bytes: the chunk size of the CRC-32s that check the bulk data plane (computed
            at publish whether or not a bulk server runs: DescribeVersion serves them).
    """

    def __init__(
        self,
        retain: int = DEFAULT_RETAIN,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        hash_threads: int = 0,
        *,
        bulk_chunk_bytes: int = DEFAULT_BULK_CHUNK_BYTES,
    ) -> None:
        if retain < 1:
            raise ValueError(f"retain must be >= 1, got {retain}")
        if chunk_bytes < 1 or bulk_chunk_bytes < 1:
            raise ValueError(f"chunk sizes must be >= 1, got {chunk_bytes} and {bulk_chunk_bytes}")
        if sys.byteorder != "little":
            raise RuntimeError("the weight layout is little-endian; this host is big-endian")
        self.retain = retain
        self.chunk_bytes = chunk_bytes
        self.bulk_chunk_bytes = bulk_chunk_bytes
        self._hash_threads = hash_threads or min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self._publishing = threading.Lock()
        self._versions: OrderedDict[int, StoredVersion] = OrderedDict()
        self._current: VersionInfo | None = None
        self._changed = Broadcast()
        self._replicas = ReplicaBook(self._changed)
        self._closed = False
        self._bulk: tuple[int, str] = (0, "")  # (port, advertised host) of a bulk data plane

    # ------------------------------------------------------------------ state

    def offer_bulk(self, port: int, host: str = "") -> None:
        """Announce the versions published from now on with a bulk data plane at `port`
        (bulk_server.py); `host` is the announced host, empty = the host each replica reaches
        the WeightService at (the usual case, also behind a Kubernetes Service)."""
        self._bulk = (port, host)

    @property
    def current_version(self) -> int:
        """The newest published version; 0 before the first publish."""
        current = self._current
        return current.version if current is not None else 0

    @property
    def current(self) -> VersionInfo | None:
        return self._current

    @property
    def retained_versions(self) -> list[int]:
        with self._lock:
            return list(self._versions)

    @property
    def replicas(self) -> dict[str, ReplicaState]:
        """replica_id -> ReplicaState, a copy; lag = current_version - state.version."""
        return self._replicas.states()

    @property
    def closed(self) -> bool:
        return self._closed

    def get(self, version: int) -> StoredVersion:
        """The retained version, to inspect; VersionNotFound if it is not retained. Its bytes may
        be reused for a later version once it is evicted: to read them, `acquire` it."""
        with self._lock:
            stored = self._versions.get(version)
        if stored is None:
            raise VersionNotFound(
                f"version {version} is not retained (retained: {self.retained_versions or 'none'})"
            )
        return stored

    def acquire(self, version: int) -> StoredVersion:
        """The retained version, kept intact (its bytes are not reused) until `release`."""
        with self._lock:
            stored = self.get(version)
            stored.readers += 1
        return stored

    def release(self, stored: StoredVersion) -> None:
        with self._lock:
            stored.readers -= 1

    # ------------------------------------------------------------------ publishing

    def publish(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> VersionInfo:
        """Snapshot `named_tensors` (detached, copied to CPU) as `version` and announce it.

        `version` must be an int greater than the current version (0 is the replicas' weights
        from disk, so the first publish is >= 1); ValueError otherwise, or for a bad tensor.
        Blocks while copying and checksumming (tens of ms per 64 MB): from an event loop that
        also serves the WeightService, call it through `asyncio.to_thread`.
        The version stays fetchable until `retain` newer ones are published.
        """
        if self._closed:
            raise RuntimeError("the publisher is closed")
        began = time.perf_counter()
        with self._publishing:  # one publish at a time; serving goes on meanwhile
            self._check_version(version)
            manifest, tensors = lay_out(named_tensors)
            total = sum(spec.nbytes for spec in manifest)
            storage = self._reusable_storage(total)
            if storage is None:
                storage = torch.empty(total, dtype=torch.uint8)
            copy_into(storage, manifest, tensors)
            del tensors
            whole, chunks, crcs = self._checksums(memoryview(storage.numpy()), total)
            info = self._info(int(version), total, len(chunks), len(manifest), whole)
            stored = StoredVersion(info, manifest, storage, chunks, crcs)
            with self._lock:
                self._check_version(version)
                self._versions[info.version] = stored
                while len(self._versions) > self.retain:
                    self._versions.popitem(last=False)
                self._current = info
        self._changed.notify()
        PUBLISHED_VERSION.set(info.version)
        PUBLISH_SECONDS.observe(time.perf_counter() - began)
        return info

    def _info(self, version: int, total: int, chunks: int, tensors: int, sha256: str) -> VersionInfo:
        port, host = self._bulk
        return VersionInfo(
            version=version,
            total_bytes=total,
            total_chunks=chunks,
            num_tensors=tensors,
            sha256=sha256,
            chunk_bytes=self.chunk_bytes,
            published_at=time.time(),
            transport=weights_pb2.TRANSPORT_TCP_BULK if port else weights_pb2.TRANSPORT_GRPC_STREAM,
            bulk_port=port,
            bulk_host=host,
            bulk_chunk_bytes=self.bulk_chunk_bytes,
        )

    def _reusable_storage(self, total: int) -> torch.Tensor | None:
        """The bytes of the version this publish evicts, if nobody reads it and the size fits:
        writing into memory already mapped is several times faster than into fresh pages. That
        version is dropped now (NOT_FOUND a moment earlier than it would be anyway)."""
        with self._lock:
            if len(self._versions) < self.retain:
                return None
            oldest = next(iter(self._versions.values()))
            if oldest.readers or oldest.info.total_bytes != total:
                return None
            del self._versions[oldest.info.version]
            return oldest.storage

    def _check_version(self, version: int) -> None:
        if isinstance(version, bool) or not isinstance(version, int) or version <= self.current_version:
            raise ValueError(
                f"version must be an int greater than the current version {self.current_version}, "
                f"got {version!r}"
            )

    def _checksums(self, data: memoryview, total: int) -> tuple[str, list[str], list[int]]:
        """SHA-256 of the whole buffer (this thread), and SHA-256 of every default-size chunk and
        CRC-32 of every bulk chunk (the pool), at the same time."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._hash_threads, thread_name_prefix="weights-sha")
        sha = self._spread(_chunk_sha256, data, self.chunk_bytes, total)
        crc = self._spread(_chunk_crc32, data, self.bulk_chunk_bytes, total)
        whole = hashlib.sha256(data).hexdigest()
        return whole, [d for task in sha for d in task.result()], [d for task in crc for d in task.result()]

    def _spread(self, function: Callable[..., list], data: memoryview, size: int, total: int) -> list[Future]:
        """`function` over the chunks of `size`, in one task per pool thread."""
        assert self._pool is not None
        count = chunk_count(total, size)
        per_task = max(1, math.ceil(count / self._hash_threads))
        return [
            self._pool.submit(function, data, size, first, min(first + per_task, count), total)
            for first in range(0, count, per_task)
        ]

    def close(self) -> None:
        """Stop serving: open WatchVersions streams end (UNAVAILABLE, shutting down), FetchWeights
        calls and bulk sends stop at the next chunk, `wait_*` calls return. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._changed.notify()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ replicas

    def record_replica(self, replica_id: str, version: int | None = None, watching: int = 0) -> None:
        """Note that `replica_id` holds `version` (None: unchanged) and opened (+1) or closed (-1)
        a WatchVersions stream. Called by the servicer and the bulk server."""
        self._replicas.record(replica_id, version, watching)

    async def wait_newer(self, version: int) -> VersionInfo | None:
        """The current version once it is newer than `version` (the newest, if several were
        published meanwhile); None once the store is closed."""
        while True:
            epoch = self._changed.epoch
            if self._closed:
                return None
            current = self._current
            if current is not None and current.version > version:
                return current
            await self._changed.wait(epoch)

    async def wait_for_replicas(
        self, version: int, replicas: Iterable[str] | int, timeout: float | None = None
    ) -> dict[str, ReplicaState]:
        """Wait until replicas hold `version` or newer: every id in `replicas`, or (an int) at
        least that many replicas. Returns the replicas that do; TimeoutError after `timeout` s
        (naming the laggards); RuntimeError if the store closes first."""
        return await self._replicas.wait_for(version, replicas, timeout, lambda: self._closed)


def _chunk_sha256(data: memoryview, size: int, first: int, stop: int, total: int) -> list[str]:
    return [hashlib.sha256(data[slice(*chunk_range(i, size, total))]).hexdigest() for i in range(first, stop)]


def _chunk_crc32(data: memoryview, size: int, first: int, stop: int, total: int) -> list[int]:
    return [crc32(data[slice(*chunk_range(i, size, total))]) for i in range(first, stop)]
