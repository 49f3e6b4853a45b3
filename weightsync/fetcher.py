"""The replica's fetcher: watch one learner's announcements and download the versions it
announces, through the transport each announcement names (transport.py), into a buffer that is
reused from one version to the next.

The tensors handed on are views of that buffer (no copy); `recycle` gives the buffer back for
the next version once they have been copied (page faults on a fresh buffer cost about as much
as hashing it). No engine here: the subscriber (subscriber.py) swaps the versions in.

With a ClientSecurity (the replica's `weights_security`), the channel to the learner speaks TLS
and every call carries the subscriber token; the bulk transport uses both for the bulk port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from prometheus_client import Histogram

from puremesh.contract.weights import split_chunk
from puremesh.rpc.auth import token_source
from puremesh.rpc.client import RetryPolicy, RpcError, open_channel
from puremesh.rpc.settings import ClientSecurity
from puremesh.weights.v1 import weights_pb2, weights_pb2_grpc

from .grpc_stream import GrpcStreamTransport
from .nccl import NcclTransport
from .tcp_bulk import TcpBulkTransport
from .transport import Announcement, FetchedVersion, FetchOptions, Link, Transport

FETCH_METHOD = "/puremesh.weights.v1.WeightService/FetchWeights"
CONFIRM_TIMEOUT_S = 30.0
# announced transport -> the class that receives it; announcements of a transport this replica
# does not have (or has turned off) are fetched over the bulk port when one is announced and
# this replica uses it, else with TRANSPORT_GRPC_STREAM, always available.
TRANSPORTS: dict[int, Callable[[Link], Transport]] = {
    weights_pb2.TRANSPORT_GRPC_STREAM: GrpcStreamTransport,
    weights_pb2.TRANSPORT_TCP_BULK: TcpBulkTransport,
    weights_pb2.TRANSPORT_NCCL: NcclTransport,
}
# the transports a FetchOptions flag turns off
_SWITCHES = {weights_pb2.TRANSPORT_TCP_BULK: "bulk", weights_pb2.TRANSPORT_NCCL: "nccl"}

FETCH_SECONDS = Histogram(
    "puremesh_rollout_weight_fetch_seconds",
    "Time to download, verify and rebuild one policy version",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


def _reconnect_options(max_backoff_s: float) -> list[tuple[str, int]]:
    """A restarted learner is found again within the retry policy's backoff."""
    return [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", max(100, int(max_backoff_s * 1000))),
    ]


class WeightFetcher:
    """Watches and downloads policy versions from one learner (no engine involved).

    target: the learner's WeightService, host:port. replica_id: this replica's stable id (the
    learner tracks versions per id). options: see FetchOptions (`bulk=False`: never the bulk
    data plane). security: TLS and the subscriber token (module docstring); None = plaintext.
    """

    def __init__(
        self,
        target: str,
        replica_id: str,
        options: FetchOptions | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        if not replica_id:
            raise ValueError("replica_id must not be empty")
        options = options or FetchOptions()
        self.options = options
        tokens = token_source(security)  # SecurityError: an unreadable or empty token file
        reconnect = _reconnect_options(options.retry.max_backoff_s)
        self._channel = open_channel(target, security=security, options=reconnect, tokens=tokens)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="weights-sha")
        self.link = Link(
            target=target,
            replica_id=replica_id,
            options=options,
            stub=weights_pb2_grpc.WeightServiceStub(self._channel),
            fetch_chunks=self._channel.unary_stream(
                FETCH_METHOD,
                request_serializer=weights_pb2.FetchWeightsRequest.SerializeToString,
                response_deserializer=split_chunk,
            ),
            worker=self._worker,
            security=security,
            tokens=tokens,
        )
        self.transports: dict[int, Transport] = {
            value: factory(self.link)
            for value, factory in TRANSPORTS.items()
            if getattr(options, _SWITCHES.get(value, ""), True)
        }
        self._spare: torch.Tensor | None = None

    @property
    def target(self) -> str:
        return self.link.target

    @property
    def replica_id(self) -> str:
        return self.link.replica_id

    @property
    def retry(self) -> RetryPolicy:
        return self.options.retry

    async def close(self) -> None:
        await self._channel.close()
        for transport in self.transports.values():
            transport.close()
        self._worker.shutdown(wait=False)

    async def __aenter__(self) -> WeightFetcher:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ announcements

    def watch(self, current_version: int, run_id: str = "") -> grpc.aio.UnaryStreamCall:
        """Open WatchVersions: announcements of versions newer than `current_version` of run
        `run_id` (any version of another run). The caller reads it (`async for` or `read()`) and
        cancels it."""
        request = weights_pb2.WatchVersionsRequest(
            replica_id=self.replica_id, current_version=current_version, run_id=run_id
        )
        return self.link.stub.WatchVersions(request)

    async def confirm(self, fetched: FetchedVersion) -> None:
        """ConfirmVersion: tell the learner this replica verified and swapped in `fetched`.
        RpcError if the learner refuses it or does not answer."""
        request = weights_pb2.ConfirmVersionRequest(
            replica_id=self.replica_id, run_id=fetched.run_id, version=fetched.version, sha256=fetched.sha256
        )
        try:
            await self.link.stub.ConfirmVersion(request, timeout=CONFIRM_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            raise RpcError(error.code(), error.details() or "", self.target) from error

    async def current(self, held_version: int, held_run: str = "") -> Announcement | None:
        """The learner's current version if it is newer than `held_version` or of another run
        than `held_run`, else None. RpcError if the learner does not answer (UNAVAILABLE while
        it is down)."""
        call = self.watch(held_version, held_run)
        try:
            await call.initial_metadata()  # the learner sends headers as soon as it accepted
            try:
                async with asyncio.timeout(self.options.announce_grace_s):
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

    def transport_for(self, announcement: Announcement) -> Transport:
        """The transport that receives `announcement`'s version: the one it names, if this
        replica has it, else the bulk port if announced and used here, else the gRPC stream."""
        transport = self.transports.get(announcement.transport)
        if transport is None and announcement.bulk_port:
            transport = self.transports.get(weights_pb2.TRANSPORT_TCP_BULK)
        return transport or self.transports[weights_pb2.TRANSPORT_GRPC_STREAM]

    async def download(self, announcement: Announcement) -> FetchedVersion:
        """Download and verify `announcement`'s version through its transport. Raises RpcError
        (e.g. NOT_FOUND: evicted meanwhile) or WeightSyncError."""
        began = time.perf_counter()
        fetched = await self.transport_for(announcement).download(
            announcement, self._buffer(announcement.total_bytes)
        )
        FETCH_SECONDS.observe(time.perf_counter() - began)
        return fetched

    def _buffer(self, size: int) -> torch.Tensor:
        spare, self._spare = self._spare, None
        if spare is not None and spare.numel() == size:
            return spare
        return torch.empty(size, dtype=torch.uint8)

    def recycle(self, fetched: FetchedVersion) -> None:
        """Hand back a version whose tensors are no longer used (e.g. the engine copied them
        into the model): the next download of the same size reuses its buffer. Writing into
        memory already mapped is several times faster than into fresh pages. (A buffer on a GPU,
        from the NCCL transport, stays with that transport.)"""
        if fetched.buffer.device.type == "cpu":
            self._spare = fetched.buffer

    async def fetch(self, announcement: Announcement) -> list[tuple[str, torch.Tensor]]:
        """`download`, then the rebuilt (name, tensor) pairs, in manifest order."""
        return (await self.download(announcement)).tensors()
