"""The rollout replica's side of weight sync: follow the learner's WeightService and swap in
every new policy version (weights.proto; ARCHITECTURE.md, "The data flow").

    WeightFetcher     one learner target, no engine: watch announcements, download a version
                      (bulk data plane, else FetchWeights chunk stream), verify it, rebuild the
                      tensors.
    WeightSubscriber  a WeightFetcher bound to an Engine: `sync_once` pulls the current version
                      (a replica does it before it reports ready), `run` follows every new one
                      until stopped, reconnecting with backoff when the learner goes away.

Two data paths, one integrity rule each:

- Bulk data plane (the default when the announcement offers a bulk port and `bulk` is on):
  DescribeVersion (gRPC) gives the manifest and the CRC-32 of every chunk; the bytes come over
  plain TCP straight into the preallocated buffer, and each chunk's CRC-32 is checked on a
  second thread as soon as it has arrived (weight_bulk.py). Chunks that fail are asked for
  again by byte range. On this path the per-chunk CRC-32s are the integrity check (they catch
  the corruption a transfer can cause; the whole-version SHA-256 is not computed: it would cost
  more CPU than the transfer itself). On any failure (port unreachable, protocol error, a
  broken or stalled connection, chunks that keep failing) the download falls back to
  FetchWeights, logs a warning (once, until bulk works again) and counts it in
  `puremesh_rollout_weight_bulk_fallbacks_total{reason}`. After a connection failure the bulk
  path rests for `bulk_retry_after_s` before it is tried again.
- FetchWeights (gRPC chunk stream): the chunks are received on the event loop while a worker
  thread copies each into the buffer and folds it into the version's SHA-256 (hashlib releases
  the GIL), so the check of the whole version costs no pass of its own at the end. If that
  check fails, each chunk is checked against its own SHA-256 and only the failing chunks are
  fetched again by index (after a broken stream, only the missing ones), up to
  `retry.max_attempts` FetchWeights calls. Checking every chunk as well when the whole matches
  would hash every byte twice to learn nothing: a matching SHA-256 of the whole proves every
  chunk intact.

The tensors handed to the engine are views of that buffer (no copy); WeightSubscriber reuses
the buffer for the next version once the engine has copied them (page faults on a fresh
buffer cost about as much as hashing it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch
from prometheus_client import Counter, Histogram

from puremesh.rpc.client import DEFAULT_MAX_MESSAGE_BYTES, RetryPolicy, RpcError
from puremesh.weights.v1 import weights_pb2, weights_pb2_grpc

from .engine import Engine
from .weight_bulk import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_IO_TIMEOUT_S, BulkError, BulkReceiver, target_host

log = logging.getLogger(__name__)

DEFAULT_FETCH_TIMEOUT_S = 600.0
# After WatchVersions answered (headers), how long to wait for an announcement before
# concluding that the learner has nothing newer (the learner sends it right after the headers).
DEFAULT_ANNOUNCE_GRACE_S = 0.5
# Reconnect backoff never grows past retry.max_backoff_s; neither does the channel's own.
RECONNECT_ATTEMPT_CAP = 16
# Chunks received but not yet copied and hashed before the download waits for the worker.
MAX_BACKLOG_CHUNKS = 8
# Deadline of DescribeVersion (a small unary call) on the bulk path.
DESCRIBE_TIMEOUT_S = 30.0
# After the bulk port could not be reached, use FetchWeights alone for this long.
DEFAULT_BULK_RETRY_AFTER_S = 60.0
FETCH_METHOD = "/puremesh.weights.v1.WeightService/FetchWeights"

FETCH_SECONDS = Histogram(
    "puremesh_rollout_weight_fetch_seconds",
    "Time to download, verify and rebuild one policy version",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
FETCH_BYTES = Counter(
    "puremesh_rollout_weight_fetch_bytes_total",
    "Tensor bytes received by FetchWeights or the bulk data plane (refetches included)",
)
CHUNK_RETRIES = Counter(
    "puremesh_rollout_weight_chunk_retries_total",
    "Chunks fetched again because their checksum failed or their stream broke",
)
BULK_FALLBACKS = Counter(
    "puremesh_rollout_weight_bulk_fallbacks_total",
    "Downloads that fell back from the bulk data plane to FetchWeights, by reason",
    ["reason"],  # connect | describe | not_found | unavailable | protocol | io | checksum
)
SYNC_FAILURES = Counter(
    "puremesh_rollout_weight_sync_failures_total",
    "Versions that could not be fetched or loaded, by stage",
    ["stage"],  # fetch | load
)


class WeightSyncError(Exception):
    """A version could not be obtained intact: a checksum still failing after the allowed
    refetches, or a stream that contradicts its announcement."""


@dataclass(frozen=True)
class Announcement:
    """A published version (weights.proto VersionAnnouncement)."""

    version: int
    total_bytes: int
    total_chunks: int
    num_tensors: int
    sha256: str
    transport: int = weights_pb2.TRANSPORT_GRPC_STREAM
    bulk_port: int = 0  # 0 = no bulk data plane
    bulk_host: str = ""  # empty = the host of the fetcher's target

    @classmethod
    def from_proto(cls, message: weights_pb2.VersionAnnouncement) -> Announcement:
        return cls(
            version=message.version,
            total_bytes=message.total_bytes,
            total_chunks=message.total_chunks,
            num_tensors=message.num_tensors,
            sha256=message.sha256,
            transport=message.transport,
            bulk_port=message.bulk_port,
            bulk_host=message.bulk_host,
        )


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"unknown tensor dtype {name!r} in the manifest")
    return dtype


def parse_manifest(specs: Sequence[weights_pb2.TensorSpec], total_bytes: int) -> tuple[TensorSpec, ...]:
    """Check that the manifest tiles [0, total_bytes) in order, each size matching its shape."""
    manifest = []
    offset = 0
    for spec in specs:
        entry = TensorSpec(spec.name, spec.dtype, tuple(spec.shape), spec.offset, spec.nbytes)
        numel = 1
        for size in entry.shape:
            numel *= size
        expected = numel * _dtype(entry.dtype).itemsize
        if entry.offset != offset or entry.nbytes != expected or min(entry.shape, default=0) < 0:
            raise WeightSyncError(f"inconsistent manifest entry {entry}")
        manifest.append(entry)
        offset += entry.nbytes
    if offset != total_bytes:
        raise WeightSyncError(f"the manifest covers {offset} bytes, the version has {total_bytes}")
    return tuple(manifest)


def rebuild_tensors(buffer: torch.Tensor, manifest: Sequence[TensorSpec]) -> list[tuple[str, torch.Tensor]]:
    """The tensors of `manifest` from a uint8 `buffer` holding the version's bytes.

    A tensor whose offset is a multiple of its element size is a view of `buffer` (no copy: the
    buffer is freed once the last tensor is, e.g. right after Engine.load_weights copied them
    into the model); the others (after an odd-sized tensor) are copied to aligned memory.
    """
    tensors = []
    for spec in manifest:
        dtype = _dtype(spec.dtype)
        raw = buffer[spec.offset : spec.offset + spec.nbytes]
        if spec.offset % dtype.itemsize:
            raw = raw.clone()
        tensor = raw.view(dtype).view(spec.shape) if spec.nbytes else torch.empty(spec.shape, dtype=dtype)
        tensors.append((spec.name, tensor))
    return tensors


@dataclass
class FetchedVersion:
    """A downloaded, verified version: its bytes and manifest."""

    version: int
    manifest: tuple[TensorSpec, ...]
    buffer: torch.Tensor  # uint8, total_bytes long

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        return rebuild_tensors(self.buffer, self.manifest)


def split_chunk(message: bytes) -> tuple[weights_pb2.WeightChunk, memoryview]:
    """Deserialise a WeightChunk without copying its data: (every other field, data view).

    Walks the top-level fields (a message is a sequence of key, value pairs) and hands all but
    `data` (field 5) to protobuf; protobuf would copy the data twice (into the message, then
    into a new bytes object on access).
    """
    view = memoryview(message)
    end = len(view)
    pos = 0
    data = view[0:0]
    others = []
    while pos < end:
        start = pos
        key, pos = _read_varint(view, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(view, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(view, pos)
            if key >> 3 == 5:
                data = view[pos : pos + length]
                pos += length
                continue
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire} in a WeightChunk")
        if pos > end:
            raise ValueError("truncated WeightChunk")
        others.append(view[start:pos])
    if pos != end:
        raise ValueError("truncated WeightChunk")
    return weights_pb2.WeightChunk.FromString(b"".join(others)), data


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


class _Assembly:
    """One version being assembled from chunks.

    `receive` (event loop) checks a chunk's header and hands its bytes to the worker thread,
    which copies them into place and, while the chunks come in index order, folds them into the
    version's SHA-256 (hashlib releases the GIL: this overlaps with receiving the next chunk).

    The chunk checksums are checked when the version's checksum fails: a match of the whole
    proves every chunk intact (SHA-256), so checking each chunk as well would hash every byte
    twice for nothing. On a mismatch, the chunks whose checksum fails are dropped, to be
    fetched again.
    """

    def __init__(self, announcement: Announcement, worker: ThreadPoolExecutor, buffer: torch.Tensor):
        self.announcement = announcement
        self.buffer = buffer
        self._view = memoryview(self.buffer.numpy())
        self._worker = worker
        self.manifest: tuple[TensorSpec, ...] | None = None
        self.total_chunks: int | None = None
        self.received_bytes = 0
        self._chunks: dict[int, tuple[int, int, str]] = {}  # index -> (offset, length, sha256)
        self._pending: deque[Future[None]] = deque()
        self._hash = hashlib.sha256()
        self._next_hashed = 0  # chunks [0, _next_hashed) are folded into _hash
        self._streaming = True  # False once a chunk came out of order: hash it all at the end

    def receive(self, header: weights_pb2.WeightChunk, data: memoryview) -> None:
        ann = self.announcement
        if header.version != ann.version:
            raise WeightSyncError(f"asked for version {ann.version}, got a chunk of {header.version}")
        if self.total_chunks is None:  # the first chunk of the first stream carries the manifest
            self.manifest = parse_manifest(header.manifest, ann.total_bytes)
            if len(self.manifest) != ann.num_tensors:
                raise WeightSyncError(
                    f"{len(self.manifest)} tensors, the announcement says {ann.num_tensors}"
                )
            self.total_chunks = header.total_chunks
        if header.total_chunks != self.total_chunks or header.index >= self.total_chunks:
            raise WeightSyncError(
                f"chunk {header.index} of {header.total_chunks}, expected {self.total_chunks}"
            )
        if header.offset + len(data) > ann.total_bytes:
            raise WeightSyncError(f"chunk {header.index} runs past the version's {ann.total_bytes} bytes")
        self.received_bytes += len(data)
        self._chunks[header.index] = (header.offset, len(data), header.sha256)
        in_order = self._streaming and header.index == self._next_hashed
        self._next_hashed += 1
        self._streaming = in_order
        self._pending.append(self._worker.submit(self._place, header.offset, data, in_order))

    def _place(self, offset: int, data: memoryview, in_order: bool) -> None:
        """Worker thread: copy into place; fold into the version's hash while in order."""
        self._view[offset : offset + len(data)] = data
        if in_order:
            self._hash.update(data)

    async def throttle(self, backlog: int) -> None:
        """Wait until at most `backlog` received chunks are still being placed (bounds the
        memory held by chunks received faster than they are placed)."""
        while len(self._pending) > backlog:
            await asyncio.wrap_future(self._pending.popleft())

    async def settle(self) -> list[int]:
        """Wait for the chunks received so far; return the indices not received yet (all of
        them, [] meaning unknown, when no chunk came yet)."""
        await self.throttle(0)
        if self.total_chunks is None:
            return []
        return [i for i in range(self.total_chunks) if i not in self._chunks]

    async def sha256(self) -> str:
        """The SHA-256 of the assembled version (once every chunk was received)."""
        await self.throttle(0)
        if self._streaming and self._next_hashed == self.total_chunks:
            return self._hash.hexdigest()
        return await asyncio.to_thread(lambda: hashlib.sha256(self._view).hexdigest())

    async def drop_bad_chunks(self) -> list[int]:
        """Check every chunk against its checksum; forget and return those that fail."""

        def bad() -> list[int]:
            return [
                index
                for index, (offset, length, sha256) in sorted(self._chunks.items())
                if hashlib.sha256(self._view[offset : offset + length]).hexdigest() != sha256
            ]

        failed = await asyncio.to_thread(bad)
        for index in failed:
            del self._chunks[index]
        self._streaming = False  # the refetched chunks come out of order
        return failed


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _open_channel(target: str, max_backoff_s: float) -> grpc.aio.Channel:
    backoff_ms = max(100, int(max_backoff_s * 1000))
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            # a restarted learner is found again within the retry policy's backoff
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ],
    )


class WeightFetcher:
    """Watches and downloads policy versions from one learner (no engine involved).

    Args:
        target: the learner's WeightService, host:port.
        replica_id: this replica's stable id (the learner tracks versions per id).
        retry: FetchWeights calls per version (max_attempts, first included) and the backoff
            between them; also the reconnect backoff of WeightSubscriber.run.
        fetch_timeout_s: deadline of one FetchWeights call, and of one bulk download.
        max_chunk_bytes: FetchWeights chunk size to ask for; 0 = the learner's default.
        bulk: use the learner's bulk data plane when it offers one (see the module docstring);
            retry.max_attempts also bounds its passes over failing chunks.
        bulk_connect_timeout_s / bulk_io_timeout_s: connecting to the bulk port / the longest
            wait for bytes on it, before falling back to FetchWeights.
        bulk_retry_after_s: after the bulk port could not be reached, FetchWeights alone is used
            for this long.
    """

    def __init__(
        self,
        target: str,
        replica_id: str,
        retry: RetryPolicy | None = None,
        fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
        max_chunk_bytes: int = 0,
        announce_grace_s: float = DEFAULT_ANNOUNCE_GRACE_S,
        *,
        bulk: bool = True,
        bulk_connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        bulk_io_timeout_s: float = DEFAULT_IO_TIMEOUT_S,
        bulk_retry_after_s: float = DEFAULT_BULK_RETRY_AFTER_S,
    ) -> None:
        if not replica_id:
            raise ValueError("replica_id must not be empty")
        self.target = target
        self.replica_id = replica_id
        self.retry = retry or RetryPolicy()
        self.fetch_timeout_s = fetch_timeout_s
        self.max_chunk_bytes = max_chunk_bytes
        self.announce_grace_s = announce_grace_s
        self._channel = _open_channel(target, self.retry.max_backoff_s)
        self._stub = weights_pb2_grpc.WeightServiceStub(self._channel)
        self._fetch = self._channel.unary_stream(
            FETCH_METHOD,
            request_serializer=weights_pb2.FetchWeightsRequest.SerializeToString,
            response_deserializer=split_chunk,
        )
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="weights-sha")
        self._spare: torch.Tensor | None = None
        self.bulk = bulk
        self.bulk_connect_timeout_s = bulk_connect_timeout_s
        self.bulk_io_timeout_s = bulk_io_timeout_s
        self.bulk_retry_after_s = bulk_retry_after_s
        self._receiver_pool = ThreadPoolExecutor(1, thread_name_prefix="weights-bulk")
        self._bulk_resumes_at = 0.0  # time.monotonic() before which bulk is not tried
        self._bulk_warned = False

    async def close(self) -> None:
        await self._channel.close()
        self._worker.shutdown(wait=False)
        self._receiver_pool.shutdown(wait=False)

    async def __aenter__(self) -> WeightFetcher:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ announcements

    def watch(self, current_version: int) -> grpc.aio.UnaryStreamCall:
        """Open WatchVersions: announcements of versions newer than `current_version`. The
        caller reads it (`async for` or `read()`) and cancels it."""
        request = weights_pb2.WatchVersionsRequest(
            replica_id=self.replica_id, current_version=current_version
        )
        return self._stub.WatchVersions(request)

    async def current(self, held_version: int) -> Announcement | None:
        """The learner's current version if it is newer than `held_version`, else None.
        RpcError if the learner does not answer (UNAVAILABLE while it is down)."""
        call = self.watch(held_version)
        try:
            await call.initial_metadata()  # the learner sends headers as soon as it accepted
            try:
                async with asyncio.timeout(self.announce_grace_s):
                    message = await call.read()
            except TimeoutError:
                return None
            if message is grpc.aio.EOF:
                code = await call.code()
                raise RpcError(code, await call.details() or "stream ended", self.target)
            return Announcement.from_proto(message)
        except grpc.aio.AioRpcError as error:
            raise RpcError(error.code(), error.details() or "", self.target) from error
        finally:
            call.cancel()

    # ------------------------------------------------------------------ download

    async def download(self, announcement: Announcement) -> FetchedVersion:
        """Download and verify `announcement`'s version: over the bulk data plane when offered
        and enabled, else (or when it fails) with FetchWeights. Raises RpcError (e.g.
        NOT_FOUND: evicted meanwhile) or WeightSyncError."""
        began = time.perf_counter()
        buffer = self._buffer(announcement.total_bytes)
        address = self.bulk_address(announcement)
        fetched = None
        if address is not None:
            try:
                fetched = await self._download_bulk(announcement, address, buffer)
                self._bulk_warned = False
            except BulkError as error:
                self._fall_back(announcement, address, error)
        if fetched is None:
            fetched = await self._download_stream(announcement, buffer)
        FETCH_SECONDS.observe(time.perf_counter() - began)
        return fetched

    def bulk_address(self, announcement: Announcement) -> tuple[str, int] | None:
        """Where to fetch `announcement` over the bulk data plane; None = use FetchWeights."""
        if not (self.bulk and announcement.bulk_port) or time.monotonic() < self._bulk_resumes_at:
            return None
        host = announcement.bulk_host or target_host(self.target)
        return (host, announcement.bulk_port) if host else None

    def _fall_back(self, announcement: Announcement, address: tuple[str, int], error: BulkError) -> None:
        BULK_FALLBACKS.labels(error.reason).inc()
        if error.reason == "connect":
            self._bulk_resumes_at = time.monotonic() + self.bulk_retry_after_s
        if error.reason == "not_found":  # evicted meanwhile: FetchWeights will say so too
            level = logging.DEBUG
        else:
            level = logging.DEBUG if self._bulk_warned else logging.WARNING
            self._bulk_warned = True
        log.log(
            level,
            "weight sync: bulk download of version %d from %s:%d failed (%s: %s); using FetchWeights",
            announcement.version,
            *address,
            error.reason,
            error,
        )

    async def _download_bulk(
        self, announcement: Announcement, address: tuple[str, int], buffer: torch.Tensor
    ) -> FetchedVersion:
        """The bytes over TCP, each chunk checked by its CRC-32; DescribeVersion (manifest and
        CRC-32s) runs meanwhile, so that the transfer starts at once."""
        receiver = BulkReceiver(
            address,
            self.replica_id,
            announcement.version,
            memoryview(buffer.numpy()),
            self._worker,
            max_attempts=self.retry.max_attempts,
            connect_timeout_s=self.bulk_connect_timeout_s,
            io_timeout_s=self.bulk_io_timeout_s,
        )
        running = asyncio.wrap_future(self._receiver_pool.submit(receiver.run))
        running.add_done_callback(_consume)  # its error, if it is aborted, is nobody's to raise
        try:
            async with asyncio.timeout(self.fetch_timeout_s):
                manifest = await self._describe(announcement, receiver)
                await asyncio.shield(running)
        except asyncio.CancelledError:
            receiver.abort()  # (the buffer is not reused: it is nobody's spare)
            raise
        except BaseException as error:
            receiver.abort()
            await asyncio.wait([running])  # the buffer is free again once it has stopped
            if isinstance(error, TimeoutError):
                raise BulkError("io", f"no complete download within {self.fetch_timeout_s} s") from None
            raise
        finally:
            FETCH_BYTES.inc(receiver.received_bytes)
            CHUNK_RETRIES.inc(receiver.retried_chunks)
        return FetchedVersion(announcement.version, manifest, buffer)

    async def _describe(self, announcement: Announcement, receiver: BulkReceiver) -> tuple[TensorSpec, ...]:
        """DescribeVersion: hand the chunk CRC-32s to `receiver`, return the manifest."""
        request = weights_pb2.DescribeVersionRequest(version=announcement.version, replica_id=self.replica_id)
        try:
            layout = await self._stub.DescribeVersion(request, timeout=DESCRIBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            reason = "not_found" if error.code() == grpc.StatusCode.NOT_FOUND else "describe"
            raise BulkError(reason, f"DescribeVersion: {error.code().name} {error.details()}") from error
        expected = (announcement.version, announcement.total_bytes, announcement.sha256)
        if (layout.version, layout.total_bytes, layout.sha256) != expected:
            raise BulkError("protocol", f"DescribeVersion does not match the announcement of {announcement}")
        try:
            manifest = parse_manifest(layout.manifest, announcement.total_bytes)
        except WeightSyncError as error:
            raise BulkError("protocol", str(error)) from error
        if len(manifest) != announcement.num_tensors:
            raise BulkError(
                "protocol", f"{len(manifest)} tensors, the announcement says {announcement.num_tensors}"
            )
        receiver.set_layout(layout.crc32_chunk_bytes, layout.chunk_crc32)
        return manifest

    async def _download_stream(self, announcement: Announcement, buffer: torch.Tensor) -> FetchedVersion:
        """Fetch every chunk of `announcement`'s version with FetchWeights and verify the whole;
        on a mismatch, refetch only the chunks whose checksum fails, and only the missing ones
        after a broken stream, up to retry.max_attempts FetchWeights calls."""
        assembly = _Assembly(announcement, self._worker, buffer)
        wanted: list[int] = []  # [] = all chunks
        for attempt in range(self.retry.max_attempts):
            if attempt:
                CHUNK_RETRIES.inc(len(wanted))
            request = weights_pb2.FetchWeightsRequest(
                version=announcement.version,
                replica_id=self.replica_id,
                chunk_indices=wanted,
                max_chunk_bytes=self.max_chunk_bytes,
            )
            broken = False
            received = assembly.received_bytes
            try:
                async for header, data in self._fetch(request, timeout=self.fetch_timeout_s):
                    assembly.receive(header, data)
                    await assembly.throttle(MAX_BACKLOG_CHUNKS)
            except grpc.aio.AioRpcError as error:
                if error.code() not in self.retry.retryable or attempt + 1 == self.retry.max_attempts:
                    raise RpcError(error.code(), error.details() or "", self.target) from error
                broken = True
            finally:
                missing = await assembly.settle()
                FETCH_BYTES.inc(assembly.received_bytes - received)
            if assembly.total_chunks is not None and not missing:
                digest = await assembly.sha256()
                if digest == announcement.sha256:
                    assert assembly.manifest is not None
                    return FetchedVersion(announcement.version, assembly.manifest, assembly.buffer)
                missing = await assembly.drop_bad_chunks()
                if not missing:
                    raise WeightSyncError(
                        f"version {announcement.version}: every chunk matches its checksum but the "
                        f"version's SHA-256 {digest} is not the announced {announcement.sha256}"
                    )
            wanted = missing
            if broken:
                await asyncio.sleep(self.retry.backoff(attempt))
        raise WeightSyncError(
            f"version {announcement.version}: chunks {wanted[:8]} still bad or missing after "
            f"{self.retry.max_attempts} attempts"
        )

    def _buffer(self, size: int) -> torch.Tensor:
        spare, self._spare = self._spare, None
        if spare is not None and spare.numel() == size:
            return spare
        return torch.empty(size, dtype=torch.uint8)

    def recycle(self, fetched: FetchedVersion) -> None:
        """Hand back a version whose tensors are no longer used (e.g. Engine.load_weights copied
        them into the model): the next download of the same size reuses its buffer. Writing
        into memory already mapped is several times faster than into fresh pages (the page
        faults of a new 64 MB buffer cost about as much as hashing it)."""
        self._spare = fetched.buffer

    async def fetch(self, announcement: Announcement) -> list[tuple[str, torch.Tensor]]:
        """`download`, then the rebuilt (name, tensor) pairs, in manifest order."""
        return (await self.download(announcement)).tensors()


class WeightSubscriber:
    """Keeps an engine on the learner's newest policy version.

    `await sync_once(timeout)` before reporting ready, then `start()` (or `await run()`),
    `await stop()` before closing the engine. `on_version(v)` is called after each swap.
    `reuse_buffer` keeps the last version's bytes (host memory, one model's size) to receive
    the next one into; it relies on Engine.load_weights copying the tensors into the model, as
    both backends do. `bulk`: use the learner's bulk data plane when offered (WeightFetcher).
    """

    def __init__(
        self,
        engine: Engine,
        target: str,
        replica_id: str,
        retry: RetryPolicy | None = None,
        fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
        *,
        max_chunk_bytes: int = 0,
        announce_grace_s: float = DEFAULT_ANNOUNCE_GRACE_S,
        on_version: Callable[[int], None] | None = None,
        reuse_buffer: bool = True,
        bulk: bool = True,
    ) -> None:
        self.engine = engine
        self.reuse_buffer = reuse_buffer
        self.fetcher = WeightFetcher(
            target,
            replica_id,
            retry=retry,
            fetch_timeout_s=fetch_timeout_s,
            max_chunk_bytes=max_chunk_bytes,
            announce_grace_s=announce_grace_s,
            bulk=bulk,
        )
        self.retry = self.fetcher.retry
        self.on_version = on_version
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def target(self) -> str:
        return self.fetcher.target

    async def fetch(self, announcement: Announcement) -> int:
        """Download the announced version and swap it into the engine (skipped if the engine
        already holds it or a newer one). Returns the engine's version."""
        if announcement.version <= self.engine.policy_version:
            return self.engine.policy_version
        try:
            fetched = await self.fetcher.download(announcement)
        except (RpcError, WeightSyncError):
            SYNC_FAILURES.labels("fetch").inc()
            raise
        if announcement.version <= self.engine.policy_version:  # a concurrent swap got there first
            return self.engine.policy_version
        try:
            await self.engine.load_weights(fetched.tensors(), announcement.version)
        except Exception:
            SYNC_FAILURES.labels("load").inc()
            self._recycle(fetched)
            raise
        # (not after a cancellation: the engine's copy may still be reading the buffer)
        self._recycle(fetched)
        if self.on_version is not None:
            self.on_version(self.engine.policy_version)
        return self.engine.policy_version

    def _recycle(self, fetched: FetchedVersion) -> None:
        if self.reuse_buffer:  # the engine is done with the tensors, views of the buffer
            self.fetcher.recycle(fetched)

    async def sync_once(self, timeout: float) -> int:
        """Pull the learner's current version if it is newer than the engine's.

        Retries with backoff while the learner does not answer or the download fails, up to
        `timeout` s for reaching it (a download that started runs to its own deadline). Returns
        the engine's version (unchanged if the learner has nothing newer, e.g. nothing published
        yet). TimeoutError if it did not succeed in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempt = 0
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    found = await self.fetcher.current(self.engine.policy_version)
                if found is None:
                    return self.engine.policy_version
                return await self.fetch(found)
            except (RpcError, WeightSyncError) as error:
                last = error
            except TimeoutError:
                raise TimeoutError(
                    f"the learner at {self.target} did not answer within {timeout} s"
                ) from None
            pause = self.retry.backoff(min(attempt, RECONNECT_ATTEMPT_CAP))
            attempt += 1
            if loop.time() + pause >= deadline:
                raise TimeoutError(
                    f"could not pull the current version from {self.target} within {timeout} s: {last}"
                ) from last
            await asyncio.sleep(pause)

    def start(self) -> asyncio.Task[None]:
        """Run `run()` as a background task."""
        if self._task is None or self._task.done():
            self._stopped = False
            self._task = asyncio.create_task(self.run(), name=f"weight-sync {self.target}")
        return self._task

    async def run(self) -> None:
        """Follow the learner until `stop()`: swap in every announced version newer than the
        engine's (the newest only, when several came during a swap); reconnect with backoff
        when the stream ends or fails (a restarting learner answers UNAVAILABLE meanwhile). A
        version that cannot be fetched or loaded is logged and skipped; the next announcement
        (or reconnect, which announces the current version) tries again."""
        if self._task is None:
            self._task = asyncio.current_task()
        failures = 0
        while not self._stopped:
            try:
                await self._follow()
                failures = 0
            except RpcError as error:
                if error.code in self.retry.retryable:  # down, restarting or busy: once per outage
                    level = logging.DEBUG if failures else logging.WARNING
                    log.log(level, "weight sync: %s unavailable (%s); retrying", self.target, error.details)
                else:
                    log.warning("weight sync from %s: %s", self.target, error)
                failures += 1
            except (WeightSyncError, ValueError, RuntimeError) as error:
                # RuntimeError: EngineNotReadyError; ValueError: weights the engine refused
                log.warning("weight sync from %s: %s", self.target, error)
                failures += 1
            except Exception:
                log.exception("weight sync from %s failed", self.target)
                failures += 1
            await asyncio.sleep(self.retry.backoff(min(failures, RECONNECT_ATTEMPT_CAP)))

    async def _follow(self) -> None:
        """One WatchVersions stream, until it ends; returns when the learner ended it or went
        away after answering (reconnect at once), raises if it never answered."""
        call = self.fetcher.watch(self.engine.policy_version)
        inbox: asyncio.Queue[weights_pb2.VersionAnnouncement | RpcError | None] = asyncio.Queue()
        answered = False

        async def read() -> None:
            nonlocal answered
            try:
                await call.initial_metadata()
                answered = not call.done()  # headers came: the learner accepted the stream
                async for message in call:
                    inbox.put_nowait(message)
                inbox.put_nowait(None)
            except grpc.aio.AioRpcError as error:
                inbox.put_nowait(RpcError(error.code(), error.details() or "", self.target))

        reader = asyncio.create_task(read())
        try:
            while True:
                items = [await inbox.get()]
                while not inbox.empty():
                    items.append(inbox.get_nowait())
                announcements = [i for i in items if isinstance(i, weights_pb2.VersionAnnouncement)]
                if announcements:  # only the newest matters
                    newest = max(announcements, key=lambda a: a.version)
                    await self.fetch(Announcement.from_proto(newest))
                if None in items:
                    return
                error = next((i for i in items if isinstance(i, RpcError)), None)
                if error is not None:
                    if error.code == grpc.StatusCode.UNAVAILABLE and answered:
                        log.info("weight sync: %s went away (%s); reconnecting", self.target, error.details)
                        return
                    raise error
        finally:
            call.cancel()
            reader.cancel()

    async def stop(self) -> None:
        """Stop following and close the channel (an in-flight download is cancelled)."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])  # its cancellation is not ours to raise
        await self.fetcher.close()
