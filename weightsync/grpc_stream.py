"""TRANSPORT_GRPC_STREAM: a version's bytes through the FetchWeights chunk stream (transport.py).

The chunks are received on the event loop while a worker thread copies each into the buffer
and folds it into the version's SHA-256 (hashlib releases the GIL), so the check of the whole
version costs no pass of its own at the end. If that check fails, each chunk is checked against
its own SHA-256 and only the failing chunks are fetched again by index (after a broken stream,
only the missing ones), up to `retry.max_attempts` FetchWeights calls. Checking every chunk as
well when the whole matches would hash every byte twice to learn nothing: a matching SHA-256 of
the whole proves every chunk intact.

Always available: the other transports fall back to it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import torch

from puremesh.contract.weights import Manifest, ManifestError, parse_manifest
from puremesh.rpc.client import RpcError
from puremesh.weights.v1 import weights_pb2

from .transport import CHUNK_RETRIES, FETCH_BYTES, Announcement, FetchedVersion, Link, WeightSyncError

# Chunks received but not yet copied and hashed before the download waits for the worker.
MAX_BACKLOG_CHUNKS = 8


class GrpcStreamTransport:
    """Downloads with FetchWeights (see the module docstring)."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def close(self) -> None:
        pass  # the fetcher owns the channel and the worker

    async def download(self, announcement: Announcement, buffer: torch.Tensor) -> FetchedVersion:
        """Fetch every chunk of `announcement`'s version and verify the whole; on a mismatch,
        refetch only the chunks whose checksum fails, and only the missing ones after a broken
        stream, up to retry.max_attempts FetchWeights calls."""
        retry = self.link.options.retry
        assembly = _Assembly(announcement, self.link.worker, buffer)
        wanted: list[int] = []  # [] = all chunks
        for attempt in range(retry.max_attempts):
            if attempt:
                CHUNK_RETRIES.inc(len(wanted))
            broken = await self._fetch(assembly, wanted, last=attempt + 1 == retry.max_attempts)
            missing = await assembly.settle()
            if assembly.total_chunks is not None and not missing:
                digest = await assembly.sha256()
                if digest == announcement.sha256:
                    assert assembly.manifest is not None
                    return FetchedVersion(
                        announcement.version, assembly.manifest, assembly.buffer, announcement.run_id, digest
                    )
                missing = await assembly.drop_bad_chunks()
                if not missing:
                    raise WeightSyncError(
                        f"version {announcement.version}: every chunk matches its checksum but the "
                        f"version's SHA-256 {digest} is not the announced {announcement.sha256}"
                    )
            wanted = missing
            if broken:
                await asyncio.sleep(retry.backoff(attempt))
        raise WeightSyncError(
            f"version {announcement.version}: chunks {wanted[:8]} still bad or missing after "
            f"{retry.max_attempts} attempts"
        )

    async def _fetch(self, assembly: _Assembly, wanted: list[int], last: bool) -> bool:
        """One FetchWeights call for the chunks `wanted` ([] = all) into `assembly`; True if
        the stream broke with a retryable code (and this is not the `last` attempt)."""
        link = self.link
        request = weights_pb2.FetchWeightsRequest(
            version=assembly.announcement.version,
            replica_id=link.replica_id,
            chunk_indices=wanted,
            max_chunk_bytes=link.options.max_chunk_bytes,
        )
        received = assembly.received_bytes
        try:
            async for head, data in link.fetch_chunks(request, timeout=link.options.fetch_timeout_s):
                assembly.receive(weights_pb2.WeightChunk.FromString(head), data)
                await assembly.throttle(MAX_BACKLOG_CHUNKS)
        except grpc.aio.AioRpcError as error:
            if error.code() not in link.options.retry.retryable or last:
                raise RpcError(error.code(), error.details() or "", link.target) from error
            return True
        finally:
            await assembly.settle()
            FETCH_BYTES.inc(assembly.received_bytes - received)
        return False


class _Assembly:
    """One version being assembled from chunks.

    `receive` (event loop) checks a chunk's header and hands its bytes to the worker thread,
    which copies them into place and, while the chunks come in index order, folds them into the
    version's SHA-256 (this overlaps with receiving the next chunk).

    The chunk checksums are checked only when the version's checksum fails (module docstring);
    the chunks whose checksum fails are then dropped, to be fetched again.
    """

    def __init__(self, announcement: Announcement, worker: ThreadPoolExecutor, buffer: torch.Tensor):
        self.announcement = announcement
        self.buffer = buffer
        self._view = memoryview(self.buffer.numpy())
        self._worker = worker
        self.manifest: Manifest | None = None
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
            self.manifest = _manifest(header, ann)
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


def _manifest(header: weights_pb2.WeightChunk, announcement: Announcement) -> Manifest:
    """The manifest of a stream's first chunk, checked against the announcement."""
    try:
        manifest = parse_manifest(header.manifest, announcement.total_bytes)
    except ManifestError as error:
        raise WeightSyncError(str(error)) from error
    if len(manifest) != announcement.num_tensors:
        raise WeightSyncError(f"{len(manifest)} tensors, the announcement says {announcement.num_tensors}")
    return manifest
