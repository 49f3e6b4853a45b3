"""The replica side's one interface for receiving a version's bytes: `Transport`.

A version's announcement names its data path (weights.proto `Transport`); the fetcher
(fetcher.py) picks the transport registered for that value and calls
`download(announcement, buffer)`, which fills the buffer, verifies it, and returns the
`FetchedVersion`. The transports, one module each:

    TRANSPORT_GRPC_STREAM  grpc_stream.py  the FetchWeights chunk stream; always available
    TRANSPORT_TCP_BULK     tcp_bulk.py     the learner's bulk TCP port, falling back to the stream
    TRANSPORT_NCCL         nccl.py         the replica's NCCL group with the learner (GPU), falling
                                           back to the bulk port (or the stream)

Every transport of one fetcher shares its `Link` (the learner's channel and stub, the replica
id, the options, a worker thread). Adding a transport means one module with a class built
from a Link, and one entry in fetcher.TRANSPORTS.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from prometheus_client import Counter

from puremesh.contract.weights import Manifest, rebuild_tensors
from puremesh.rpc.auth import TokenSource
from puremesh.rpc.client import RetryPolicy
from puremesh.rpc.settings import ClientSecurity
from puremesh.weights.v1 import weights_pb2, weights_pb2_grpc

DEFAULT_FETCH_TIMEOUT_S = 600.0
# After WatchVersions answered (headers), how long to wait for an announcement before
# concluding that the learner has nothing newer (the learner sends it right after the headers).
DEFAULT_ANNOUNCE_GRACE_S = 0.5
DEFAULT_BULK_CONNECT_TIMEOUT_S = 3.0
DEFAULT_BULK_IO_TIMEOUT_S = 30.0
# After the bulk port could not be reached, use FetchWeights alone for this long.
DEFAULT_BULK_RETRY_AFTER_S = 60.0
# After an NCCL group could not be set up (or the learner refused one), skip NCCL this long.
DEFAULT_NCCL_RETRY_AFTER_S = 60.0

FETCH_BYTES = Counter(
    "puremesh_rollout_weight_fetch_bytes_total",
    "Tensor bytes received by FetchWeights or the bulk data plane (refetches included)",
)
CHUNK_RETRIES = Counter(
    "puremesh_rollout_weight_chunk_retries_total",
    "Chunks fetched again because their checksum failed or their stream broke",
)


class WeightSyncError(Exception):
    """A version could not be obtained intact: a checksum still failing after the allowed
    refetches, or a stream that contradicts its announcement."""


@dataclass(frozen=True)
class FetchOptions:
    """How a replica fetches versions (WeightFetcher).

    retry: FetchWeights calls per version (max_attempts, first included) and the backoff between
        them; also the reconnect backoff of WeightSubscriber.run, and the bulk path's passes
        over failing chunks.
    fetch_timeout_s: deadline of one FetchWeights call, and of one bulk download.
    max_chunk_bytes: FetchWeights chunk size to ask for; 0 = the learner's default.
    announce_grace_s: see DEFAULT_ANNOUNCE_GRACE_S.
    bulk: use the learner's bulk data plane when it offers one (tcp_bulk.py).
    bulk_connect_timeout_s / bulk_io_timeout_s: connecting to the bulk port / the longest wait
        for bytes on it, before falling back to FetchWeights.
    bulk_retry_after_s: after the bulk port could not be reached, FetchWeights alone is used
        for this long.
    nccl: receive over NCCL when the learner announces TRANSPORT_NCCL (nccl.py) and this
        process has CUDA and NCCL; else, and on any failure, the bulk port (or FetchWeights).
    nccl_device: the device the NCCL transport receives into (the engine's GPU).
    nccl_retry_after_s: after an NCCL setup failed or was refused, NCCL is skipped this long.
    """

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_chunk_bytes: int = 0
    announce_grace_s: float = DEFAULT_ANNOUNCE_GRACE_S
    bulk: bool = True
    bulk_connect_timeout_s: float = DEFAULT_BULK_CONNECT_TIMEOUT_S
    bulk_io_timeout_s: float = DEFAULT_BULK_IO_TIMEOUT_S
    bulk_retry_after_s: float = DEFAULT_BULK_RETRY_AFTER_S
    nccl: bool = True
    nccl_device: str = "cuda"
    nccl_retry_after_s: float = DEFAULT_NCCL_RETRY_AFTER_S


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
    run_id: str = ""  # the learner run; versions compare only within one run
    bulk_protocol: int = 1  # 2: authenticate each bulk connection first (weights.proto)
    bulk_tls: bool = False  # the bulk port speaks TLS

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
            run_id=message.run_id,
            bulk_protocol=message.bulk_protocol or 1,
            bulk_tls=message.bulk_tls,
        )


@dataclass
class FetchedVersion:
    """A downloaded, verified version: its bytes and manifest (the whole version's SHA-256
    matched the announced one on every transport)."""

    version: int
    manifest: Manifest
    buffer: torch.Tensor  # uint8, total_bytes long (on the GPU when it came over NCCL)
    run_id: str = ""
    sha256: str = ""

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        return rebuild_tensors(self.buffer, self.manifest)


@dataclass
class Link:
    """One learner as a fetcher's transports see it."""

    target: str  # the WeightService, host:port
    replica_id: str
    options: FetchOptions
    stub: weights_pb2_grpc.WeightServiceStub
    # FetchWeights with each chunk split, not parsed: (the header message, a view of the data)
    fetch_chunks: Callable[..., Any]
    # copies and hashes FetchWeights chunks, checks bulk CRC-32s (one thread is enough)
    worker: ThreadPoolExecutor
    # TLS and the token file (the channel sends the token on every call; the bulk port's TLS
    # and handshake use them too: tcp_bulk.py)
    security: ClientSecurity | None = None
    tokens: TokenSource | None = None


class Transport(Protocol):
    """One way of receiving a version's bytes (see the module docstring)."""

    async def download(self, announcement: Announcement, buffer: torch.Tensor) -> FetchedVersion:
        """Fill `buffer` (uint8, total_bytes long, reusable) with the announced version and
        verify it. RpcError (e.g. NOT_FOUND: evicted meanwhile) or WeightSyncError."""
        ...

    def close(self) -> None:
        """Release the transport's threads and connections."""
        ...
