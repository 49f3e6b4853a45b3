"""The learner's version store: snapshots of each new policy version, kept for the replicas.

`WeightStore` keeps the newest `retain` versions of one learner run (`run_id`). `publish` copies
the tensors, in the given order, into ONE contiguous byte buffer (the layout of
contract/weights.py) and computes its checksums once (checksums.py), so that serving a version
to N replicas costs no hashing and no copy of the buffer (a chunk is a memoryview slice of it).
Then it wakes every waiter (the WatchVersions streams).

Bounded memory, whatever clients do: at most `max_buffers` model-size buffers exist at once.
The readers of a version (servicer.py's FetchWeights while it encodes a chunk, bulk_server.py
while it sends a slice) `acquire` and `release` it. A version evicted while read is *revoked*:
new readers get NOT_FOUND, the revocation listeners (the bulk server closes the connections
sending it) are called, and its buffer is reused as soon as the last reader let go. A publish
that would need a buffer beyond `max_buffers` waits for that (up to `revoke_wait_s`). Writing
into a reused buffer (already mapped) is also several times faster than into fresh pages.

Threads: `publish` may run on any thread (the training loop usually blocks its own); the
servicer and the `wait_*` helpers run on event loops, and the store wakes them thread-safely.
Shutdown: `close()` the store before draining the host that serves it: WatchVersions streams
never end on their own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from prometheus_client import Counter, Gauge, Histogram

from puremesh.contract.weights import MAX_VERSION, copy_into, lay_out
from puremesh.weights.v1 import weights_pb2

from . import runs
from .broadcast import Broadcast
from .checksums import checksums
from .replicas import DEFAULT_MAX_RECORDS, DEFAULT_TTL_S, ConfirmRefused, ReplicaBook, ReplicaState
from .stored import DEFAULT_BULK_CHUNK_BYTES, StoredVersion, VersionInfo, VersionNotFound

log = logging.getLogger(__name__)

DEFAULT_RETAIN = 2
DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_REVOKE_WAIT_S = 10.0

PUBLISH_SECONDS = Histogram(
    "puremesh_learner_weight_publish_seconds",
    "Time to snapshot, checksum and announce one policy version",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
PUBLISHED_VERSION = Gauge("puremesh_learner_weight_version", "Newest published policy version")
BUFFERS = Gauge("puremesh_learner_weight_buffers", "Model-size weight buffers held by the version store")
REVOKED = Counter(
    "puremesh_learner_weight_revoked_versions_total",
    "Versions evicted while a reader still held them (their readers are cut off)",
)


class WeightStore:
    """Snapshots policy versions for the replicas to pull; see the module docstring.

    Args:
        retain: how many of the newest versions stay fetchable (older ones are NOT_FOUND).
            Keep at least 2, so that a replica still fetching version v when v+1 is published
            can finish.
        chunk_bytes: the default (and largest) chunk size of FetchWeights.
        hash_threads: threads that checksum a new version (0 = up to 4, one per core).
        bulk_chunk_bytes: the chunk size of the CRC-32s that check the bulk data plane.
        run_id: the learner run the versions belong to (announced with each).
        run_file: where the run's highest published version is written before each version is
            announced (runs.py); `published` is the highest one an earlier learner of this run
            announced (`high_water`).
        max_buffers: model-size buffers at most (default retain + 1: one for a version evicted
            while a reader still holds it).
        revoke_wait_s: how long a publish waits for the readers of a revoked version.
        replica_ttl_s / max_replica_records: the replica records' expiry and bound (replicas.py).
    """

    def __init__(
        self,
        retain: int = DEFAULT_RETAIN,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        hash_threads: int = 0,
        *,
        bulk_chunk_bytes: int = DEFAULT_BULK_CHUNK_BYTES,
        run_id: str = "",
        run_file: Path | None = None,
        published: int = 0,
        max_buffers: int | None = None,
        revoke_wait_s: float = DEFAULT_REVOKE_WAIT_S,
        replica_ttl_s: float = DEFAULT_TTL_S,
        max_replica_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        max_buffers = retain + 1 if max_buffers is None else max_buffers
        if retain < 1 or max_buffers < retain:
            raise ValueError(f"need retain >= 1 and max_buffers >= retain, got {retain} and {max_buffers}")
        if chunk_bytes < 1 or bulk_chunk_bytes < 1:
            raise ValueError(f"chunk sizes must be >= 1, got {chunk_bytes} and {bulk_chunk_bytes}")
        if sys.byteorder != "little":
            raise RuntimeError("the weight layout is little-endian; this host is big-endian")
        self.retain, self.max_buffers, self.revoke_wait_s = retain, max_buffers, revoke_wait_s
        self.chunk_bytes = chunk_bytes
        self.bulk_chunk_bytes = bulk_chunk_bytes
        self.run_id, self.run_file, self._published = run_id, run_file, published
        self._hash_threads = hash_threads or min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self._released = threading.Condition(self._lock)
        self._publishing = threading.Lock()
        self._versions: OrderedDict[int, StoredVersion] = OrderedDict()
        self._revoked: list[StoredVersion] = []  # evicted, still read
        self._current: VersionInfo | None = None
        self._changed = Broadcast()
        self._replicas = ReplicaBook(self._changed, ttl_s=replica_ttl_s, max_records=max_replica_records)
        self._revoke_listeners: list[Callable[[StoredVersion], None]] = []
        self._closed = False
        # (port, advertised host, protocol, TLS) of a bulk data plane
        self._bulk: tuple[int, str, int, bool] = (0, "", 1, False)
        self._nccl = False

    # ------------------------------------------------------------------ state

    def offer_bulk(self, port: int, host: str = "", protocol: int = 1, tls: bool = False) -> None:
        """Announce the versions published from now on with a bulk data plane at `port`
        (bulk_server.py); `host` is the announced host, empty = the host each replica reaches
        the WeightService at (the usual case, also behind a Kubernetes Service); `protocol` and
        `tls` say how it authenticates (BulkServer.protocol, its TLS)."""
        self._bulk = (port, host, protocol, tls)

    def offer_nccl(self) -> None:
        """Announce the versions published from now on with TRANSPORT_NCCL (nccl_sender.py); the
        bulk port, if offered, stays announced for replicas that cannot use NCCL."""
        self._nccl = True

    def on_revoke(self, listener: Callable[[StoredVersion], None]) -> None:
        """Call `listener(stored)` (on the publishing thread) when a version is revoked."""
        self._revoke_listeners.append(listener)

    @property
    def current_version(self) -> int:
        """The newest published version; 0 before the first publish."""
        current = self._current
        return current.version if current is not None else 0

    @property
    def current(self) -> VersionInfo | None:
        return self._current

    @property
    def high_water(self) -> int:
        """The highest version this run ever announced, by this learner or a lost one before
        it (runs.py): a resumed learner publishes above it."""
        return max(self._published, self.current_version)

    @property
    def retained_versions(self) -> list[int]:
        with self._lock:
            return list(self._versions)

    @property
    def buffers(self) -> int:
        """Model-size buffers held now: the retained versions and the revoked ones still read."""
        with self._lock:
            return len(self._versions) + len(self._revoked)

    @property
    def replicas(self) -> dict[str, ReplicaState]:
        """replica_id -> ReplicaState, a copy; lag = current_version - state.version."""
        return self._replicas.states()

    @property
    def book(self) -> ReplicaBook:
        return self._replicas

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
            if stored.revoked and not stored.readers:
                self._released.notify_all()

    # ------------------------------------------------------------------ publishing

    def publish(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> VersionInfo:
        """Snapshot `named_tensors` (detached, copied to CPU) as `version` and announce it.

        `version` must be an int greater than the current version and at most MAX_VERSION (0 is
        the replicas' weights from disk, so the first publish is >= 1); ValueError otherwise,
        or for a bad tensor. Blocks while copying and checksumming (tens of ms per 64 MB): from
        an event loop that also serves the WeightService, call it through `asyncio.to_thread`.
        The version stays fetchable until `retain` newer ones are published.
        """
        if self._closed:
            raise RuntimeError("the publisher is closed")
        began = time.perf_counter()
        with self._publishing:  # one publish at a time; serving goes on meanwhile
            self._check_version(version)
            manifest, tensors = lay_out(named_tensors)
            total = sum(spec.nbytes for spec in manifest)
            storage = self._storage_for(total)
            copy_into(storage, manifest, tensors)
            del tensors
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._hash_threads, thread_name_prefix="weights-sha")
            whole, chunks, crcs = checksums(
                self._pool, self._hash_threads, memoryview(storage.numpy()), self.chunk_bytes,
                self.bulk_chunk_bytes,
            )  # fmt: skip
            info = self._info(int(version), total, len(chunks), len(manifest), whole)
            if self.run_file is not None:  # written ahead: no replica hears of it before
                runs.write(self.run_file, runs.RunRecord(self.run_id, max(self.high_water, info.version)))
            with self._lock:
                self._check_version(version)
                self._versions[info.version] = StoredVersion(info, manifest, storage, chunks, crcs)
                self._current = info
                BUFFERS.set(len(self._versions) + len(self._revoked))
        self._changed.notify()
        PUBLISHED_VERSION.set(info.version)
        PUBLISH_SECONDS.observe(time.perf_counter() - began)
        return info

    def _info(self, version: int, total: int, chunks: int, tensors: int, sha256: str) -> VersionInfo:
        port, host, protocol, tls = self._bulk
        return VersionInfo(
            version=version,
            total_bytes=total,
            total_chunks=chunks,
            num_tensors=tensors,
            sha256=sha256,
            chunk_bytes=self.chunk_bytes,
            published_at=time.time(),
            transport=_transport(self._nccl, port),
            bulk_port=port,
            bulk_host=host,
            bulk_chunk_bytes=self.bulk_chunk_bytes,
            run_id=self.run_id,
            bulk_protocol=protocol,
            bulk_tls=tls,
        )

    def _storage_for(self, total: int) -> torch.Tensor:
        """A buffer of `total` bytes for the next version, never beyond max_buffers: the bytes of
        the version this publish evicts when nobody reads it and the size fits, else a fresh
        one once there is room (evicting revokes a version still read; see the module
        docstring). That version is dropped now (NOT_FOUND a moment earlier than otherwise)."""
        deadline = time.monotonic() + self.revoke_wait_s
        with self._lock:
            if len(self._versions) >= self.retain:
                oldest = next(iter(self._versions.values()))
                del self._versions[oldest.info.version]
                self._replicas.forget(oldest.info.version)
                if not oldest.readers and oldest.info.total_bytes == total:
                    return oldest.storage
                if oldest.readers:
                    self._revoke(oldest)
            while True:
                self._revoked = [stored for stored in self._revoked if stored.readers]
                if len(self._versions) + len(self._revoked) < self.max_buffers:
                    return torch.empty(total, dtype=torch.uint8)
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error(
                        "weights: readers of revoked versions %s did not let go in %.0f s; allocating "
                        "beyond max_buffers",
                        [s.info.version for s in self._revoked],
                        self.revoke_wait_s,
                    )
                    return torch.empty(total, dtype=torch.uint8)
                self._released.wait(left)

    def _revoke(self, stored: StoredVersion) -> None:
        """Called with the lock held: `stored` was evicted while read."""
        stored.revoked = True
        self._revoked.append(stored)
        REVOKED.inc()
        for listener in self._revoke_listeners:
            try:
                listener(stored)
            except Exception:
                log.exception("weights: a revocation listener failed")

    def _check_version(self, version: int) -> None:
        ok = isinstance(version, int) and not isinstance(version, bool)
        if not ok or not self.current_version < version <= MAX_VERSION:
            raise ValueError(
                f"version must be an int greater than the current version {self.current_version} "
                f"and at most {MAX_VERSION}, got {version!r}"
            )

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

    def subscribed(self, replica_id: str, reported: int, reported_run: str = "") -> None:
        self._replicas.subscribed(replica_id, reported, reported_run)

    async def other_runs(self, expected: int, timeout: float) -> list[str]:
        """The watching replicas that hold another run's weights (a fresh learner checks this
        before its first step), once `expected` replicas watch or after `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    epoch = self._changed.epoch
                    if sum(state.watching for state in self.replicas.values()) >= expected:
                        break
                    await self._changed.wait(epoch)
        except TimeoutError:
            pass
        return sorted(
            rid
            for rid, state in self.replicas.items()
            if state.watching and state.reported_run != self.run_id and (state.reported_run or state.reported)
        )

    def unsubscribed(self, replica_id: str) -> None:
        self._replicas.unsubscribed(replica_id)

    def sent(self, replica_id: str, version: int, start: int, stop: int) -> None:
        """Bytes [start, stop) of `version` went out to `replica_id` (servicer, bulk server)."""
        self._replicas.sent(replica_id, version, start, stop)

    def confirm(self, replica_id: str, run_id: str, version: int, sha256: str) -> None:
        """ConfirmVersion: VersionNotFound, or ConfirmRefused (replicas.py's rules)."""
        info = self.get(version).info
        if run_id != info.run_id or sha256 != info.sha256:
            raise ConfirmRefused(
                f"version {version} of run {info.run_id!r} has SHA-256 {info.sha256}, the replica "
                f"confirmed {sha256!r} of run {run_id!r}"
            )
        self._replicas.confirm(replica_id, version, info.total_bytes)

    async def wait_newer(self, version: int, run_id: str | None = None) -> VersionInfo | None:
        """The current version once it is newer than `version` (the newest, if several were
        published meanwhile), or any current version when `run_id` is given and is not the
        store's; None once the store is closed."""
        other_run = run_id is not None and run_id != self.run_id
        while True:
            epoch = self._changed.epoch
            if self._closed:
                return None
            current = self._current
            if current is not None and (other_run or current.version > version):
                return current
            await self._changed.wait(epoch)

    async def wait_for_replicas(
        self, version: int, replicas: Iterable[str] | int, timeout: float | None = None
    ) -> dict[str, ReplicaState]:
        """Wait until replicas hold `version` or newer: every id in `replicas`, or (an int n) n
        of them, or every watching replica that is not idle when fewer watch (replicas.py).
        Returns the replicas that do; TimeoutError after `timeout` s (naming the laggards);
        RuntimeError if the store closes first."""
        return await self._replicas.wait_for(version, replicas, timeout, lambda: self._closed)


def _transport(nccl: bool, bulk_port: int) -> int:
    """The announced data path (weights.proto VersionAnnouncement.transport)."""
    if nccl:
        return weights_pb2.TRANSPORT_NCCL
    return weights_pb2.TRANSPORT_TCP_BULK if bulk_port else weights_pb2.TRANSPORT_GRPC_STREAM
