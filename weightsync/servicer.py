"""The learner's WeightService (weights.proto): a thin gRPC adapter over the version store.

WatchVersions announces the store's new versions, FetchWeights streams a version's chunks (each
with its SHA-256, the manifest on the stream's first), DescribeVersion gives the manifest and the
bulk chunks' CRC-32s, ConfirmVersion records that a replica holds a version (replicas.py's
rules), OpenNcclGroup and SendNccl hand over to the NCCL sender (nccl_sender.py) when the learner
has one. Bad calls raise the domain errors of rpc/errors.py, which the host's interceptor
(rpc/server.py) maps to status codes.

FetchWeights writes each chunk with `context.write` under a deadline: the whole stream must go
out within `transfer_deadline(bytes)` (a grace plus a minimum throughput), so a client that
reads slowly is cut off (DEADLINE_EXCEEDED). It holds the version only while it encodes a
chunk, never across a write: a slow client pins no buffer.

Register it with `weight_service` (or `add_weight_service_to_server`), not the generated
function: FetchWeights then yields each chunk already encoded, as the bytes of a WeightChunk
(contract/weights.py `encode_chunk`: protobuf encodes the small fields, the data is appended
with one copy, instead of three through a WeightChunk message).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter

from puremesh.contract.weights import MAX_VERSION, chunk_count, encode_chunk
from puremesh.rpc.errors import DeadlineExceeded, InvalidArgument, NotFound, NotReady, Overloaded
from puremesh.rpc.server import ServiceDefinition
from puremesh.weights.v1 import weights_pb2, weights_pb2_grpc

from .replicas import ConfirmRefused
from .store import StoredVersion, VersionInfo, VersionNotFound, WeightStore

SERVICE_NAME = "puremesh.weights.v1.WeightService"
DEFAULT_MAX_WATCHERS = 4096
DEFAULT_MAX_FETCHES = 64
# Every transfer (a FetchWeights stream here, a bulk reply in bulk_server.py) must go out within
# TRANSFER_GRACE_S plus its bytes at MIN_BYTES_PER_SECOND.
DEFAULT_TRANSFER_GRACE_S = 30.0
DEFAULT_MIN_BYTES_PER_SECOND = 4 << 20
SHUTTING_DOWN = "the learner is shutting down"


def transfer_deadline(nbytes: int, grace_s: float, min_bytes_per_second: float) -> float:
    """Seconds a transfer of `nbytes` may take: the grace plus the bytes at the minimum rate."""
    return grace_s + nbytes / min_bytes_per_second


SENT_BYTES = Counter("puremesh_learner_weight_sent_bytes_total", "Tensor bytes sent by FetchWeights")


@dataclass(frozen=True)
class ChunkMessage:
    """A WeightChunk whose data is a view of the stored buffer; `SerializeToString` gives the
    wire bytes of the equivalent WeightChunk with one copy of the data."""

    version: int
    index: int
    total_chunks: int
    offset: int
    data: memoryview | bytes
    sha256: str
    manifest: list[weights_pb2.TensorSpec] | None = None

    def SerializeToString(self) -> bytes:
        head = weights_pb2.WeightChunk(
            version=self.version,
            index=self.index,
            total_chunks=self.total_chunks,
            offset=self.offset,
            sha256=self.sha256,
            manifest=self.manifest,
        ).SerializeToString()
        return encode_chunk(head, self.data)

    def to_proto(self) -> weights_pb2.WeightChunk:
        return weights_pb2.WeightChunk.FromString(self.SerializeToString())


def announcement(info: VersionInfo) -> weights_pb2.VersionAnnouncement:
    return weights_pb2.VersionAnnouncement(
        version=info.version,
        total_bytes=info.total_bytes,
        total_chunks=info.total_chunks,
        num_tensors=info.num_tensors,
        sha256=info.sha256,
        transport=info.transport,
        bulk_port=info.bulk_port,
        bulk_host=info.bulk_host,
        run_id=info.run_id,
        bulk_protocol=info.bulk_protocol,
        bulk_tls=info.bulk_tls,
    )


class WeightServicer(weights_pb2_grpc.WeightServiceServicer):
    """WeightService over a WeightStore (see weights.proto for the contract).

    max_watchers / max_fetches: open WatchVersions streams / concurrent FetchWeights calls
    before RESOURCE_EXHAUSTED. transfer_grace_s / min_bytes_per_second: the deadline of every
    FetchWeights stream (`transfer_deadline`).
    """

    def __init__(
        self,
        store: WeightStore,
        max_watchers: int = DEFAULT_MAX_WATCHERS,
        max_fetches: int = DEFAULT_MAX_FETCHES,
        *,
        transfer_grace_s: float = DEFAULT_TRANSFER_GRACE_S,
        min_bytes_per_second: float = DEFAULT_MIN_BYTES_PER_SECOND,
        nccl: Any = None,
    ) -> None:
        self.store = store
        self.nccl = nccl  # nccl_sender.NcclSender: OpenNcclGroup and SendNccl; None = no NCCL plane
        self.max_watchers = max_watchers
        self.max_fetches = max_fetches
        self.transfer_grace_s = transfer_grace_s
        self.min_bytes_per_second = min_bytes_per_second
        self.watchers = 0
        self.fetches = 0
        # True once registered by add_weight_service_to_server, whose serializer passes encoded
        # chunks through; with the generated add_WeightServiceServicer_to_server, FetchWeights
        # yields WeightChunk messages (same bytes on the wire, slower).
        self.encoded_chunks = False
        self._specs: weakref.WeakKeyDictionary[StoredVersion, list[weights_pb2.TensorSpec]] = (
            weakref.WeakKeyDictionary()
        )
        self._layouts: weakref.WeakKeyDictionary[StoredVersion, weights_pb2.VersionLayout] = (
            weakref.WeakKeyDictionary()
        )

    def _admit(self, replica_id: str) -> None:
        """The guard of every call: a replica id, and a store that still serves."""
        if not replica_id:
            raise InvalidArgument("replica_id is empty")
        if self.store.closed:
            raise NotReady(SHUTTING_DOWN)

    async def WatchVersions(
        self, request: weights_pb2.WatchVersionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[weights_pb2.VersionAnnouncement]:
        store = self.store
        self._admit(request.replica_id)
        if request.current_version > MAX_VERSION:
            raise InvalidArgument(f"current_version {request.current_version} is above {MAX_VERSION}")
        if self.watchers >= self.max_watchers:
            raise Overloaded(f"{self.watchers} WatchVersions streams are open")
        self.watchers += 1
        store.subscribed(request.replica_id, request.current_version, request.run_id)
        try:
            # Headers go out at once, so that a subscriber knows the learner answered even when
            # it has nothing newer to announce.
            await context.send_initial_metadata(())
            held, run = request.current_version, request.run_id
            while True:
                info = await store.wait_newer(held, run)
                if info is None:
                    raise NotReady(SHUTTING_DOWN)
                yield announcement(info)
                held, run = info.version, info.run_id
        finally:
            self.watchers -= 1
            store.unsubscribed(request.replica_id)

    async def FetchWeights(
        self, request: weights_pb2.FetchWeightsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Writes the chunks with `context.write` (see the module docstring)."""
        store = self.store
        self._admit(request.replica_id)
        info = self._info(request.version)
        if self.fetches >= self.max_fetches:
            raise Overloaded(f"{self.fetches} fetches in flight")
        size = min(request.max_chunk_bytes or store.chunk_bytes, store.chunk_bytes)
        indices = _chunk_indices(request, info, size)
        nbytes = sum(min(size, info.total_bytes - i * size) for i in indices)
        limit = transfer_deadline(nbytes, self.transfer_grace_s, self.min_bytes_per_second)
        deadline = asyncio.get_running_loop().time() + limit
        self.fetches += 1
        try:
            for position, index in enumerate(indices):
                if store.closed:
                    raise NotReady(SHUTTING_DOWN)
                chunk = self._encoded(request.version, index, size, with_manifest=position == 0)
                # noted before the write: the replica may confirm before this coroutine resumes
                store.sent(request.replica_id, request.version, chunk[1], chunk[2])
                try:
                    async with asyncio.timeout_at(deadline):
                        await context.write(chunk[0])
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"FetchWeights of {nbytes} bytes did not go out within {limit:.0f} s "
                        f"(at least {self.min_bytes_per_second / 2**20:.1f} MiB/s are required)"
                    ) from None
                SENT_BYTES.inc(chunk[2] - chunk[1])
        finally:
            self.fetches -= 1

    def _info(self, version: int) -> VersionInfo:
        try:
            return self.store.get(version).info
        except VersionNotFound as error:
            raise NotFound(str(error)) from None

    def _encoded(
        self, version: int, index: int, size: int, with_manifest: bool
    ) -> tuple[bytes | weights_pb2.WeightChunk, int, int]:
        """(chunk `index` as it goes on the wire, its first byte, its end), read while the
        version is held; NotFound once it is evicted or revoked."""
        try:
            stored = self.store.acquire(version)
        except VersionNotFound as error:
            raise NotFound(str(error)) from None
        try:
            chunk = self.chunk(stored, index, size, with_manifest)
            # Encoded here rather than by grpc's serializer: measured twice as fast.
            wire = chunk.SerializeToString() if self.encoded_chunks else chunk.to_proto()
        finally:
            self.store.release(stored)
        return wire, chunk.offset, chunk.offset + len(chunk.data)

    async def DescribeVersion(
        self, request: weights_pb2.DescribeVersionRequest, context: grpc.aio.ServicerContext
    ) -> weights_pb2.VersionLayout:
        self._admit(request.replica_id)
        try:
            return self.layout(self.store.get(request.version))
        except VersionNotFound as error:
            raise NotFound(str(error)) from None

    async def ConfirmVersion(
        self, request: weights_pb2.ConfirmVersionRequest, context: grpc.aio.ServicerContext
    ) -> weights_pb2.ConfirmVersionResponse:
        self._admit(request.replica_id)
        try:
            self.store.confirm(request.replica_id, request.run_id, request.version, request.sha256)
        except VersionNotFound as error:
            raise NotFound(str(error)) from None
        except ConfirmRefused as error:
            raise InvalidArgument(str(error)) from None
        return weights_pb2.ConfirmVersionResponse(current_version=self.store.current_version)

    async def OpenNcclGroup(
        self, request: weights_pb2.OpenNcclGroupRequest, context: grpc.aio.ServicerContext
    ) -> weights_pb2.NcclGroup:
        self._admit(request.replica_id)
        return self._nccl().open(request.replica_id, request.run_id)

    async def SendNccl(
        self, request: weights_pb2.SendNcclRequest, context: grpc.aio.ServicerContext
    ) -> weights_pb2.SendNcclResponse:
        self._admit(request.replica_id)
        sent = await self._nccl().send(request.replica_id, request.group_id, request.version, request.run_id)
        return weights_pb2.SendNcclResponse(sent_bytes=sent)

    def _nccl(self) -> Any:
        if self.nccl is None:
            raise NotReady("this learner has no NCCL data plane (learner.weights.nccl is off)")
        return self.nccl

    def chunk(self, stored: StoredVersion, index: int, chunk_bytes: int, with_manifest: bool) -> ChunkMessage:
        """Chunk `index` of `stored` at `chunk_bytes` (the manifest on the stream's first)."""
        start, stop = stored.chunk_range(index, chunk_bytes)
        return ChunkMessage(
            version=stored.info.version,
            index=index,
            total_chunks=chunk_count(stored.info.total_bytes, chunk_bytes),
            offset=start,
            data=stored.data[start:stop],
            sha256=stored.chunk_sha256(index, chunk_bytes),
            manifest=self.tensor_specs(stored) if with_manifest else None,
        )

    def tensor_specs(self, stored: StoredVersion) -> list[weights_pb2.TensorSpec]:
        """The manifest as protobuf messages (built once per version)."""
        specs = self._specs.get(stored)
        if specs is None:
            specs = self._specs[stored] = [
                weights_pb2.TensorSpec(
                    name=s.name, dtype=s.dtype, shape=s.shape, offset=s.offset, nbytes=s.nbytes
                )
                for s in stored.manifest
            ]
        return specs

    def layout(self, stored: StoredVersion) -> weights_pb2.VersionLayout:
        """The DescribeVersion answer: manifest and chunk CRC-32s (built once per version)."""
        layout = self._layouts.get(stored)
        if layout is None:
            layout = self._layouts[stored] = weights_pb2.VersionLayout(
                version=stored.info.version,
                total_bytes=stored.info.total_bytes,
                sha256=stored.info.sha256,
                manifest=self.tensor_specs(stored),
                crc32_chunk_bytes=stored.info.bulk_chunk_bytes,
                chunk_crc32=stored.chunk_crc32,
                run_id=stored.info.run_id,
            )
        return layout


def _chunk_indices(request: weights_pb2.FetchWeightsRequest, info: VersionInfo, size: int):
    """The chunk indices a FetchWeights call asks for, sorted, each once; InvalidArgument for
    one past the version's last chunk."""
    count = chunk_count(info.total_bytes, size)
    indices = sorted(set(request.chunk_indices)) if request.chunk_indices else range(count)
    if indices and indices[-1] >= count:
        raise InvalidArgument(
            f"chunk index {indices[-1]} out of range: version {info.version} has "
            f"{count} chunks of {size} bytes"
        )
    return indices


def _serialize(message: Any) -> bytes:
    """FetchWeights yields chunks already encoded (bytes); everything else is a message."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_weight_service_to_server(servicer: WeightServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_WeightServiceServicer_to_server, with a serializer that also takes
    encoded chunks."""
    handlers = {
        "WatchVersions": grpc.unary_stream_rpc_method_handler(
            servicer.WatchVersions,
            request_deserializer=weights_pb2.WatchVersionsRequest.FromString,
            response_serializer=_serialize,
        ),
        "FetchWeights": grpc.unary_stream_rpc_method_handler(
            servicer.FetchWeights,
            request_deserializer=weights_pb2.FetchWeightsRequest.FromString,
            response_serializer=_serialize,
        ),
        "DescribeVersion": grpc.unary_unary_rpc_method_handler(
            servicer.DescribeVersion,
            request_deserializer=weights_pb2.DescribeVersionRequest.FromString,
            response_serializer=weights_pb2.VersionLayout.SerializeToString,
        ),
        "ConfirmVersion": grpc.unary_unary_rpc_method_handler(
            servicer.ConfirmVersion,
            request_deserializer=weights_pb2.ConfirmVersionRequest.FromString,
            response_serializer=weights_pb2.ConfirmVersionResponse.SerializeToString,
        ),
        "OpenNcclGroup": grpc.unary_unary_rpc_method_handler(
            servicer.OpenNcclGroup,
            request_deserializer=weights_pb2.OpenNcclGroupRequest.FromString,
            response_serializer=weights_pb2.NcclGroup.SerializeToString,
        ),
        "SendNccl": grpc.unary_unary_rpc_method_handler(
            servicer.SendNccl,
            request_deserializer=weights_pb2.SendNcclRequest.FromString,
            response_serializer=weights_pb2.SendNcclResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    servicer.encoded_chunks = True


def weight_service(servicer: WeightServicer) -> ServiceDefinition:
    """The WeightService for a ServiceHost (rpc/server.py), whose interceptor maps the domain
    errors the servicer raises."""
    return ServiceDefinition("weights", SERVICE_NAME, servicer, add_weight_service_to_server)
