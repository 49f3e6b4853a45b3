"""TRANSPORT_TCP_BULK: a version's bytes over the learner's bulk data plane (transport.py).

DescribeVersion (gRPC) gives the manifest and the CRC-32 of every chunk; the bytes come over
plain TCP straight into the preallocated buffer (bulk_receiver.py), each chunk's CRC-32 checked
on a second thread as soon as it has arrived, and chunks that fail are asked for again by byte
range. Then the whole version's SHA-256, which came with the announcement over the gRPC
control plane, is checked too (folded in as the chunks are checked, so it overlaps with the
transfer): a bulk server that serves other bytes with matching CRC-32s is caught.

On any failure (port unreachable, protocol error, a broken or stalled connection, chunks that
keep failing) the download falls back to the gRPC stream (grpc_stream.py), logs a warning (once,
until bulk works again) and counts it in `puremesh_rollout_weight_bulk_fallbacks_total{reason}`.
After a connection failure the bulk path rests for `bulk_retry_after_s` before it is tried again.

When the announcement says so, the connection is TLS (bulk_tls: the replica's CA and client
certificate, its `weights_security`) and authenticated first (bulk_protocol 2: the handshake with
the replica's token, bulk_auth.py). A replica without a token skips such a bulk port.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from prometheus_client import Counter

from puremesh.contract import bulk
from puremesh.contract.weights import Manifest, ManifestError, parse_manifest
from puremesh.rpc.auth import client_ssl_context, hmac_key
from puremesh.weights.v1 import weights_pb2

from .bulk_receiver import BulkError, BulkReceiver, target_host
from .grpc_stream import GrpcStreamTransport
from .transport import CHUNK_RETRIES, FETCH_BYTES, Announcement, FetchedVersion, Link

log = logging.getLogger(__name__)

# Deadline of DescribeVersion (a small unary call) on the bulk path.
DESCRIBE_TIMEOUT_S = 30.0

BULK_FALLBACKS = Counter(
    "puremesh_rollout_weight_bulk_fallbacks_total",
    "Downloads that fell back from the bulk data plane to FetchWeights, by reason",
    ["reason"],  # BulkError reasons: connect | describe | not_found | unavailable | protocol | io | checksum
    # | sha256 | tls | unauthenticated
)


class TcpBulkTransport:
    """Downloads over the bulk data plane, else with the gRPC stream (module docstring)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.fallback = GrpcStreamTransport(link)
        self.resumes_at = 0.0  # time.monotonic() before which bulk is not tried
        self._warned = False
        self._receivers = ThreadPoolExecutor(1, thread_name_prefix="weights-bulk")
        self._tls = client_ssl_context(link.security)  # None: plaintext, or the system's CAs

    def close(self) -> None:
        self._receivers.shutdown(wait=False)
        self.fallback.close()

    def address(self, announcement: Announcement) -> tuple[str, int] | None:
        """Where to fetch `announcement` over the bulk data plane; None = use the gRPC stream
        (no bulk port, a target without a host, or resting after a connection failure)."""
        if not announcement.bulk_port or time.monotonic() < self.resumes_at:
            return None
        if announcement.bulk_protocol >= bulk.PROTOCOL_AUTH and self.link.tokens is None:
            return None  # nothing to authenticate with: FetchWeights says why
        host = announcement.bulk_host or target_host(self.link.target)
        return (host, announcement.bulk_port) if host else None

    async def download(self, announcement: Announcement, buffer: torch.Tensor) -> FetchedVersion:
        address = self.address(announcement)
        if address is not None:
            try:
                fetched = await self._download(announcement, address, buffer)
                self._warned = False
                return fetched
            except BulkError as error:
                self._fall_back(announcement, address, error)
        return await self.fallback.download(announcement, buffer)

    def _fall_back(self, announcement: Announcement, address: tuple[str, int], error: BulkError) -> None:
        BULK_FALLBACKS.labels(error.reason).inc()
        if error.reason == "connect":
            self.resumes_at = time.monotonic() + self.link.options.bulk_retry_after_s
        if error.reason == "not_found":  # evicted meanwhile: FetchWeights will say so too
            level = logging.DEBUG
        else:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
        log.log(
            level,
            "weight sync: bulk download of version %d from %s:%d failed (%s: %s); using FetchWeights",
            announcement.version,
            *address,
            error.reason,
            error,
        )

    async def _download(
        self, announcement: Announcement, address: tuple[str, int], buffer: torch.Tensor
    ) -> FetchedVersion:
        """The bytes over TCP, each chunk checked by its CRC-32; DescribeVersion (manifest and
        CRC-32s) runs meanwhile, so that the transfer starts at once."""
        options = self.link.options
        receiver = BulkReceiver(
            address,
            self.link.replica_id,
            announcement.version,
            memoryview(buffer.numpy()),
            self.link.worker,
            max_attempts=options.retry.max_attempts,
            connect_timeout_s=options.bulk_connect_timeout_s,
            io_timeout_s=options.bulk_io_timeout_s,
            **self._credentials(announcement),
        )
        running = asyncio.wrap_future(self._receivers.submit(receiver.run))
        running.add_done_callback(_consume)  # its error, if it is aborted, is nobody's to raise
        try:
            async with asyncio.timeout(options.fetch_timeout_s):
                manifest = await self._describe(announcement, receiver)
                await asyncio.shield(running)
        except asyncio.CancelledError:
            receiver.abort()  # (the buffer is not reused: it is nobody's spare)
            raise
        except BaseException as error:
            receiver.abort()
            await asyncio.wait([running])  # the buffer is free again once it has stopped
            if isinstance(error, TimeoutError):
                raise BulkError("io", f"no complete download within {options.fetch_timeout_s} s") from None
            raise
        finally:
            FETCH_BYTES.inc(receiver.received_bytes)
            CHUNK_RETRIES.inc(receiver.retried_chunks)
        digest = await asyncio.wrap_future(self.link.worker.submit(receiver.sha256))
        if digest != announcement.sha256:
            raise BulkError(
                "sha256",
                f"version {announcement.version}: every chunk matches its CRC-32 but the version's "
                f"SHA-256 {digest} is not the announced {announcement.sha256}",
            )
        return FetchedVersion(announcement.version, manifest, buffer, announcement.run_id, digest)

    def _credentials(self, announcement: Announcement) -> dict:
        """BulkReceiver's TLS context, server name and handshake key for `announcement`."""
        security, tokens = self.link.security, self.link.tokens
        tls = (self._tls or ssl.create_default_context()) if announcement.bulk_tls else None
        authenticate = announcement.bulk_protocol >= bulk.PROTOCOL_AUTH and tokens is not None
        return {
            "tls": tls,
            "server_name": security.tls_server_name if security is not None else "",
            "key": hmac_key(tokens.token()) if authenticate and tokens is not None else None,
        }

    async def _describe(self, announcement: Announcement, receiver: BulkReceiver) -> Manifest:
        """DescribeVersion: hand the chunk CRC-32s to `receiver`, return the manifest."""
        request = weights_pb2.DescribeVersionRequest(
            version=announcement.version, replica_id=self.link.replica_id
        )
        try:
            layout = await self.link.stub.DescribeVersion(request, timeout=DESCRIBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            reason = "not_found" if error.code() == grpc.StatusCode.NOT_FOUND else "describe"
            raise BulkError(reason, f"DescribeVersion: {error.code().name} {error.details()}") from error
        expected = (announcement.version, announcement.total_bytes, announcement.sha256)
        if (layout.version, layout.total_bytes, layout.sha256) != expected:
            raise BulkError("protocol", f"DescribeVersion does not match the announcement of {announcement}")
        try:
            manifest = parse_manifest(layout.manifest, announcement.total_bytes)
        except ManifestError as error:
            raise BulkError("protocol", str(error)) from error
        if len(manifest) != announcement.num_tensors:
            raise BulkError(
                "protocol", f"{len(manifest)} tensors, the announcement says {announcement.num_tensors}"
            )
        receiver.set_layout(layout.crc32_chunk_bytes, layout.chunk_crc32)
        return manifest


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
