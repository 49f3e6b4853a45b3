"""Weight transfer and integrity over real servers on port 0: publish (weightsync.store) ->
chunks on the wire (weightsync.servicer) -> fetch, verify and rebuild (weightsync.fetcher);
the bulk data plane (weightsync.bulk_server, weightsync.tcp_bulk): its protocol, per-chunk
CRC-32 checks and the fallback to FetchWeights; and the choice of transport by announcement."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import socket
import struct
import time
import types
import zlib

import grpc
import pytest
import torch
from weightsync_learner import start_learner

from puremesh.rpc.client import RetryPolicy, RpcError
from puremesh.weights.v1 import weights_pb2, weights_pb2_grpc
from puremesh.weightsync import fetcher as fetcher_module
from puremesh.weightsync import tcp_bulk, transport
from puremesh.weightsync.bulk_receiver import BulkError, BulkReceiver
from puremesh.weightsync.fetcher import TRANSPORTS, WeightFetcher
from puremesh.weightsync.grpc_stream import GrpcStreamTransport
from puremesh.weightsync.servicer import announcement
from puremesh.weightsync.store import VersionNotFound, WeightStore
from puremesh.weightsync.transport import Announcement, FetchOptions, WeightSyncError

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
BULK_CHUNK = 48  # the bulk CRC-32 chunk size: not the FetchWeights chunk size (64), nor a divisor
TCP_BULK = weights_pb2.TRANSPORT_TCP_BULK


def mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        ("f32", torch.randn(3, 5, generator=generator)),
        ("odd_bytes", torch.arange(3, dtype=torch.int8)),  # leaves the next offset misaligned
        ("bf16", torch.randn(4, 7, generator=generator).to(torch.bfloat16)),
        ("i64", torch.arange(-6, 6, dtype=torch.int64).reshape(2, 2, 3)),
        ("scalar", torch.tensor(2.5)),
        ("empty", torch.empty(0, 4)),
        ("mask", torch.tensor([True, False, True])),
        ("f16_t", torch.randn(6, 2, generator=generator).half().t()),  # not contiguous
        ("grad", torch.randn(5, requires_grad=True, generator=generator)),
    ]


def fetcher_of(learner, replica_id: str, **options) -> WeightFetcher:
    return WeightFetcher(learner.target, replica_id, FetchOptions(retry=FAST_RETRY, **options))


def bulk_transport(fetcher: WeightFetcher) -> tcp_bulk.TcpBulkTransport:
    found = fetcher.transports[TCP_BULK]
    assert isinstance(found, tcp_bulk.TcpBulkTransport)
    return found


def announced(info) -> Announcement:
    return Announcement.from_proto(announcement(info))


@pytest.fixture(params=["encoded", "generated"])
async def learner(request):
    """A learner without bulk data plane whose WeightService is registered with
    add_weight_service_to_server (chunks encoded by the servicer) or with the generated
    function (chunks as WeightChunk messages); and a fetcher of it."""
    generated = {"add_to_server": weights_pb2_grpc.add_WeightServiceServicer_to_server}
    learner = await start_learner(chunk_bytes=64, **(generated if request.param == "generated" else {}))
    fetcher = fetcher_of(learner, "replica-a")
    yield types.SimpleNamespace(
        learner=learner, store=learner.store, servicer=learner.servicer, fetcher=fetcher
    )
    await fetcher.close()
    await learner.stop()


def assert_same(fetched: list[tuple[str, torch.Tensor]], expected: list[tuple[str, torch.Tensor]]) -> None:
    assert [name for name, _ in fetched] == [name for name, _ in expected]
    for (name, got), (_, want) in zip(fetched, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want.detach()), name


@pytest.mark.parametrize("max_chunk_bytes", [0, 5, 1000])
async def test_round_trip_every_dtype_and_shape(learner, max_chunk_bytes) -> None:
    tensors = mixed_tensors()
    info = learner.store.publish(1, tensors)
    stored = learner.store.get(1)
    layout = b"".join(
        t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for _, t in tensors
    )
    assert info.total_bytes == len(layout) and info.sha256 == hashlib.sha256(layout).hexdigest()
    assert info.total_chunks == -(-len(layout) // 64) and info.num_tensors == len(tensors)
    assert [(e.name, e.dtype, e.shape) for e in stored.manifest][:3] == [
        ("f32", "float32", (3, 5)),
        ("odd_bytes", "int8", (3,)),
        ("bf16", "bfloat16", (4, 7)),
    ]
    async with fetcher_of(learner.learner, "replica-c", max_chunk_bytes=max_chunk_bytes) as fetcher:
        assert_same(await fetcher.fetch(announced(info)), tensors)
    size = min(max_chunk_bytes or 64, 64)  # 0 = the learner's chunk size, which is also the limit
    assert learner.learner.fetched_chunks == list(range(-(-len(layout) // size)))


async def test_snapshot_is_a_copy_and_empty_versions_work(learner) -> None:
    weight = torch.ones(10)
    info = learner.store.publish(1, [("w", weight)])
    weight.add_(1)  # the learner keeps training after publishing
    assert_same(await learner.fetcher.fetch(announced(info)), [("w", torch.ones(10))])
    info = learner.store.publish(2, [])
    assert (info.total_bytes, info.total_chunks, info.num_tensors) == (0, 1, 0)
    assert await learner.fetcher.fetch(announced(info)) == []


async def test_checksum_failures_are_detected(learner, monkeypatch) -> None:
    info = learner.store.publish(1, mixed_tensors())
    ann = announced(info)
    # the announced checksum of the whole version is checked after assembly
    with pytest.raises(WeightSyncError, match="every chunk matches its checksum but"):
        await learner.fetcher.fetch(dataclasses.replace(ann, sha256="0" * 64))
    # a chunk that arrives corrupted on every attempt fails after max_attempts
    produce = learner.servicer.chunk

    def corrupt(stored, index, chunk_bytes, with_manifest):
        chunk = produce(stored, index, chunk_bytes, with_manifest)
        if index == 2:
            data = bytearray(chunk.data)
            data[0] ^= 0xFF
            chunk = dataclasses.replace(chunk, data=bytes(data))
        return chunk

    monkeypatch.setattr(learner.servicer, "chunk", corrupt)
    retries = transport.CHUNK_RETRIES._value.get()
    with pytest.raises(WeightSyncError, match=r"chunks \[2\] still bad or missing after 3 attempts"):
        await learner.fetcher.fetch(ann)
    assert transport.CHUNK_RETRIES._value.get() - retries == 2


def test_versions_must_increase() -> None:
    store = WeightStore()
    for bad in (0, -1, True, 1.0, "1"):
        with pytest.raises(ValueError, match="version must be an int greater than"):
            store.publish(bad, [("w", torch.zeros(1))])
    assert store.current_version == 0 and store.current is None
    store.publish(3, [("w", torch.zeros(1))])
    for bad in (3, 2):
        with pytest.raises(ValueError, match="greater than the current version 3"):
            store.publish(bad, [("w", torch.zeros(1))])
    with pytest.raises(ValueError, match="given twice"):
        store.publish(4, [("w", torch.zeros(1)), ("w", torch.zeros(1))])
    with pytest.raises(ValueError, match="pairs"):
        store.publish(4, [torch.zeros(1)])
    assert store.current_version == 3
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.publish(4, [("w", torch.zeros(1))])


async def test_retention_evicts_old_versions(learner) -> None:
    store, fetcher = learner.store, learner.fetcher
    infos = [store.publish(v, [("w", torch.full((4,), float(v)))]) for v in (1, 2, 3)]
    assert store.retained_versions == [2, 3] and store.current_version == 3
    with pytest.raises(VersionNotFound, match="version 1 is not retained"):
        store.get(1)
    with pytest.raises(RpcError) as info:
        await fetcher.fetch(announced(infos[0]))
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "version 1 is not retained" in info.value.details
    assert_same(await fetcher.fetch(announced(infos[1])), [("w", torch.full((4,), 2.0))])


async def test_buffers_are_reused_only_when_nobody_reads_them(learner) -> None:
    store, fetcher = learner.store, learner.fetcher
    weights = [("w", torch.arange(100, dtype=torch.float32))]
    for version in (1, 2):
        store.publish(version, weights)
    first = store.get(1).storage.data_ptr()
    held = store.acquire(2)  # e.g. a FetchWeights stream still sending version 2
    store.publish(3, weights)  # evicts 1, whose bytes nobody reads: reused
    assert store.get(3).storage.data_ptr() == first and store.retained_versions == [2, 3]
    store.publish(4, weights)  # evicts 2, still read: fresh bytes, 2 stays intact
    assert store.get(4).storage.data_ptr() != held.storage.data_ptr()
    assert bytes(held.data) == bytes(store.get(4).data)
    store.release(held)
    store.publish(5, [("w", torch.zeros(3))])  # another size: fresh bytes
    assert store.retained_versions == [4, 5]

    # the replica side: a recycled buffer receives the next version of the same size
    fetched = await fetcher.download(announced(store.get(4).info))
    pointer = fetched.buffer.data_ptr()
    fetcher.recycle(fetched)
    again = await fetcher.download(announced(store.get(4).info))
    assert again.buffer.data_ptr() == pointer
    assert_same(again.tensors(), weights)


# ---------------------------------------------------------------------- the announced transport


async def test_the_announced_transport_selects_the_download(learner, monkeypatch) -> None:
    """An announcement is received by the transport registered for its `transport` value; one
    this replica has not (NCCL turned off here, or unspecified) goes over the gRPC stream when no
    bulk port is announced (the NCCL transport itself: test_weight_nccl.py)."""
    assert set(TRANSPORTS) == {weights_pb2.TRANSPORT_GRPC_STREAM, TCP_BULK, weights_pb2.TRANSPORT_NCCL}
    info = learner.store.publish(1, mixed_tensors())
    async with fetcher_of(learner.learner, "replica-x", nccl=False) as plain:
        for value in (weights_pb2.TRANSPORT_NCCL, weights_pb2.TRANSPORT_UNSPECIFIED):
            ann = dataclasses.replace(announced(info), transport=value)
            assert isinstance(plain.transport_for(ann), GrpcStreamTransport)
            learner.learner.fetched_chunks.clear()
            assert_same(await plain.fetch(ann), mixed_tensors())
            assert learner.learner.fetched_chunks == list(range(info.total_chunks))

    used: list[int] = []

    class Recording(GrpcStreamTransport):  # a transport added by one registry entry
        async def download(self, announcement, buffer):
            used.append(announcement.version)
            return await super().download(announcement, buffer)

    monkeypatch.setitem(fetcher_module.TRANSPORTS, weights_pb2.TRANSPORT_NCCL, Recording)
    async with fetcher_of(learner.learner, "replica-n") as fetcher:
        ann = dataclasses.replace(announced(info), transport=weights_pb2.TRANSPORT_NCCL)
        assert isinstance(fetcher.transport_for(ann), Recording)
        assert_same(await fetcher.fetch(ann), mixed_tensors())
    assert used == [1]


# ---------------------------------------------------------------------- the bulk data plane


@pytest.fixture
async def bulk_learner():
    """A learner on port 0 with its bulk data plane, and a fetcher of it; FetchWeights chunks are
    recorded in `sent`."""
    learner = await start_learner(chunk_bytes=64, bulk=True, bulk_chunk_bytes=BULK_CHUNK)
    fetcher = fetcher_of(learner, "replica-b")
    yield types.SimpleNamespace(
        learner=learner,
        store=learner.store,
        servicer=learner.servicer,
        bulk=learner.bulk,
        fetcher=fetcher,
        sent=learner.fetched_chunks,
        port=learner.port,
    )
    await fetcher.close()
    await learner.stop()


def fallbacks(reason: str) -> float:
    return tcp_bulk.BULK_FALLBACKS.labels(reason)._value.get()


def bulk_request(
    version: int, offset: int, length: int, replica_id: bytes = b"raw", magic: bytes = b"PMWB"
) -> bytes:
    return struct.pack("<4sHHQQQ", magic, 1, len(replica_id), version, offset, length) + replica_id


def read_reply(conn: socket.socket) -> tuple[int, bytes]:
    """(status, payload or error message) of one bulk reply."""
    head = conn.recv(16, socket.MSG_WAITALL)
    magic, status, reserved, length = struct.unpack("<4sHHQ", head)
    assert magic == b"PMWB" and reserved == 0
    payload = bytearray()
    while len(payload) < length:
        more = conn.recv(length - len(payload))
        assert more, "the server closed in the middle of a reply"
        payload += more
    return status, bytes(payload)


async def test_bulk_round_trip_every_dtype_and_shape(bulk_learner) -> None:
    store, fetcher = bulk_learner.store, bulk_learner.fetcher
    tensors = mixed_tensors()
    info = store.publish(1, tensors)
    ann = announcement(info)
    assert ann.transport == TCP_BULK and ann.bulk_port == bulk_learner.bulk.port > 0
    assert ann.bulk_host == ""  # = the host of the replica's target
    assert isinstance(fetcher.transport_for(Announcement.from_proto(ann)), tcp_bulk.TcpBulkTransport)
    assert bulk_transport(fetcher).address(Announcement.from_proto(ann)) == ("127.0.0.1", ann.bulk_port)
    before = {reason: fallbacks(reason) for reason in ("connect", "protocol", "io", "checksum")}
    assert_same(await fetcher.fetch(Announcement.from_proto(ann)), tensors)
    assert bulk_learner.sent == []  # not one FetchWeights chunk
    assert before == {reason: fallbacks(reason) for reason in before}
    # a download alone records nothing: only subscribers are tracked (replicas.py)
    assert "replica-b" not in store.replicas
    assert store.get(1).readers == 0  # released after sending
    # an empty version: one empty chunk
    info = store.publish(2, [])
    assert await fetcher.fetch(announced(info)) == []
    assert bulk_learner.sent == []


async def test_describe_version(bulk_learner) -> None:
    store = bulk_learner.store
    tensors = mixed_tensors()
    info = store.publish(1, tensors)
    data = bytes(store.get(1).data)
    async with grpc.aio.insecure_channel(bulk_learner.learner.target) as channel:
        stub = weights_pb2_grpc.WeightServiceStub(channel)
        describe = weights_pb2.DescribeVersionRequest
        layout = await stub.DescribeVersion(describe(version=1, replica_id="raw"), timeout=5)
        assert (layout.version, layout.total_bytes, layout.sha256) == (1, info.total_bytes, info.sha256)
        assert [spec.name for spec in layout.manifest] == [name for name, _ in tensors]
        assert layout.crc32_chunk_bytes == BULK_CHUNK
        assert list(layout.chunk_crc32) == [
            zlib.crc32(data[i : i + BULK_CHUNK]) for i in range(0, len(data), BULK_CHUNK)
        ]
        for request, code in [
            (describe(version=1), grpc.StatusCode.INVALID_ARGUMENT),
            (describe(version=7, replica_id="raw"), grpc.StatusCode.NOT_FOUND),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.DescribeVersion(request, timeout=5)
            assert error.value.code() == code
        store.close()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.DescribeVersion(describe(version=1, replica_id="raw"), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error.value.details() == "the learner is shutting down"


async def test_bulk_corrupted_chunk_is_refetched_by_range(bulk_learner) -> None:
    store, fetcher, server = bulk_learner.store, bulk_learner.fetcher, bulk_learner.bulk
    tensors = mixed_tensors()
    info = store.publish(1, tensors)
    produce = server.payload
    ranges: list[tuple[int, int]] = []

    def flip_once(held, start, stop):  # the first time chunk 2 goes out, one bit flips
        ranges.append((start, stop))
        data = produce(held, start, stop)
        if len(ranges) == 1:
            data = bytearray(data)
            data[2 * BULK_CHUNK + 5 - start] ^= 0x10
        return data

    server.payload = flip_once
    retries = transport.CHUNK_RETRIES._value.get()
    assert_same(await fetcher.fetch(announced(info)), tensors)
    assert ranges == [(0, info.total_bytes), (96, 144)]  # everything, then only chunk 2
    assert transport.CHUNK_RETRIES._value.get() - retries == 1
    assert bulk_learner.sent == []


async def test_bulk_chunk_failing_every_pass_falls_back_to_fetchweights(bulk_learner) -> None:
    store, fetcher, server = bulk_learner.store, bulk_learner.fetcher, bulk_learner.bulk
    tensors = mixed_tensors()
    info = store.publish(1, tensors)
    produce = server.payload
    passes = []

    def corrupt(held, start, stop):
        passes.append((start, stop))
        data = bytearray(produce(held, start, stop))
        data[50 - start if start <= 50 < stop else 0] ^= 0xFF  # chunk 1, every time
        return data

    server.payload = corrupt
    before = fallbacks("checksum")
    assert_same(await fetcher.fetch(announced(info)), tensors)
    assert passes == [(0, info.total_bytes), (48, 96), (48, 96)]  # FAST_RETRY: 3 passes
    assert fallbacks("checksum") - before == 1
    assert bulk_learner.sent == list(range(info.total_chunks))  # then FetchWeights, intact


async def test_learner_without_bulk_is_fetched_with_fetchweights(learner) -> None:
    info = learner.store.publish(1, mixed_tensors())
    ann = announcement(info)
    assert ann.transport == weights_pb2.TRANSPORT_GRPC_STREAM and ann.bulk_port == 0
    assert learner.learner.bulk is None
    assert isinstance(learner.fetcher.transport_for(Announcement.from_proto(ann)), GrpcStreamTransport)
    assert bulk_transport(learner.fetcher).address(Announcement.from_proto(ann)) is None
    assert_same(await learner.fetcher.fetch(Announcement.from_proto(ann)), mixed_tensors())
    assert learner.learner.fetched_chunks == list(range(info.total_chunks))


async def test_replica_with_bulk_off_uses_fetchweights(bulk_learner) -> None:
    info = bulk_learner.store.publish(1, mixed_tensors())
    async with fetcher_of(bulk_learner.learner, "no-bulk", bulk=False) as fetcher:
        ann = announced(info)
        assert ann.transport == TCP_BULK and TCP_BULK not in fetcher.transports
        assert isinstance(fetcher.transport_for(ann), GrpcStreamTransport)
        assert_same(await fetcher.fetch(ann), mixed_tensors())
    assert bulk_learner.sent == list(range(info.total_chunks))


async def test_closed_bulk_port_falls_back_and_rests(bulk_learner, caplog) -> None:
    store, fetcher = bulk_learner.store, bulk_learner.fetcher
    bulk_learner.bulk.close()  # the port stops answering; the announcements still offer it
    info = store.publish(1, mixed_tensors())
    ann = announced(info)
    before = fallbacks("connect")
    with caplog.at_level(logging.WARNING, logger=tcp_bulk.__name__):
        assert_same(await fetcher.fetch(ann), mixed_tensors())
    assert fallbacks("connect") - before == 1
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "using FetchWeights" in caplog.text
    assert bulk_learner.sent == list(range(info.total_chunks))
    # the bulk path rests for a while after a connection failure ...
    assert bulk_transport(fetcher).address(ann) is None
    assert_same(await fetcher.fetch(ann), mixed_tensors())
    assert fallbacks("connect") - before == 1
    # ... then it is tried again
    bulk_transport(fetcher).resumes_at = 0.0
    assert bulk_transport(fetcher).address(ann) == ("127.0.0.1", bulk_learner.bulk.port)


async def test_unreachable_bulk_port_falls_back(learner, unused_tcp_port) -> None:
    info = learner.store.publish(1, mixed_tensors())
    ann = dataclasses.replace(announced(info), transport=TCP_BULK, bulk_port=unused_tcp_port)
    before = fallbacks("connect")
    assert_same(
        await learner.fetcher.fetch(ann), mixed_tensors()
    )  # DescribeVersion answers, the port refuses
    assert fallbacks("connect") - before == 1


async def test_bulk_server_answers_bad_requests_and_keeps_serving(bulk_learner) -> None:
    store = bulk_learner.store
    store.publish(1, mixed_tensors())
    data = bytes(store.get(1).data)
    address = ("127.0.0.1", bulk_learner.bulk.port)

    def exchange() -> None:
        with socket.create_connection(address, timeout=5) as conn:
            conn.sendall(bulk_request(1, 0, 0, magic=b"HTTP"))
            status, message = read_reply(conn)
            assert status == 3 and b"magic" in message  # BAD_REQUEST, then the server closes
            assert conn.recv(1) == b""
        with socket.create_connection(address, timeout=5) as conn:
            conn.sendall(bulk_request(9, 0, 10))
            status, message = read_reply(conn)
            assert status == 1 and b"version 9 is not retained" in message  # NOT_FOUND
            conn.sendall(bulk_request(1, len(data) - 4, 5))
            status, message = read_reply(conn)
            assert status == 2 and b"out of range" in message  # OUT_OF_RANGE
            conn.sendall(bulk_request(1, 2**64 - 1, 2))  # offset + length overflows 64 bits
            assert read_reply(conn)[0] == 2
            conn.sendall(bulk_request(1, 10, 100))  # the same connection still serves
            assert read_reply(conn) == (0, data[10:110])
            conn.sendall(bulk_request(1, len(data), 0))
            assert read_reply(conn) == (0, b"")
        with socket.create_connection(address, timeout=5) as conn:
            conn.sendall(struct.pack("<4sHHQQQ", b"PMWB", 2, 0, 1, 0, 1))  # unknown protocol
            assert read_reply(conn)[0] == 3
        with socket.create_connection(address, timeout=5) as conn:
            conn.sendall(bulk_request(1, 0, 1, replica_id=b"\xff\xfe"))  # not UTF-8
            assert read_reply(conn)[0] == 3
        with socket.create_connection(address, timeout=5) as conn:
            conn.sendall(bulk_request(1, 0, len(data), replica_id=b"raw-bulk"))
            assert read_reply(conn) == (0, data)

    await asyncio.to_thread(exchange)
    assert store.replicas == {}  # nobody subscribed: no records, whatever ids were sent
    assert store.get(1).readers == 0
    assert_same(await bulk_learner.fetcher.fetch(announced(store.current)), mixed_tensors())


def wait_for_connections(server, count: int) -> None:
    deadline = time.monotonic() + 5
    while server.connections != count:
        assert time.monotonic() < deadline, f"{server.connections} connections, expected {count}"
        time.sleep(0.01)


async def test_bulk_server_limits_connections_refuses_a_closed_store_and_closes(bulk_learner) -> None:
    store, server = bulk_learner.store, bulk_learner.bulk
    store.publish(1, mixed_tensors())
    address = ("127.0.0.1", server.port)
    server.max_connections = 1

    def busy() -> None:
        with socket.create_connection(address, timeout=5) as first:
            first.sendall(bulk_request(1, 0, 4))
            assert read_reply(first)[0] == 0  # admitted
            with socket.create_connection(address, timeout=5) as second:
                status, message = read_reply(second)
                assert status == 4 and b"connections are open" in message  # UNAVAILABLE
            store.close()  # the store stops serving: the next request is refused, then closed
            first.sendall(bulk_request(1, 0, 4))
            status, message = read_reply(first)
            assert status == 4 and b"shutting down" in message
            assert first.recv(1) == b""
        server.max_connections = 4
        with socket.create_connection(address, timeout=5) as third:
            third.sendall(bulk_request(1, 0, 4))
            assert read_reply(third)[0] == 4  # admitted, the store still refuses (UNAVAILABLE)
            assert third.recv(1) == b""
        wait_for_connections(server, 0)
        with socket.create_connection(address, timeout=5) as fourth:
            wait_for_connections(server, 1)  # accepted, waiting for a request
            server.close()  # the composition root closes the bulk server: open connections end
            assert fourth.recv(1) == b""
        with pytest.raises(OSError):
            socket.create_connection(address, timeout=2)

    await asyncio.to_thread(busy)
    assert server.closed and server.connections == 0


async def test_bulk_evicted_version_is_a_clear_error_then_fetchweights_decides(bulk_learner) -> None:
    store, fetcher = bulk_learner.store, bulk_learner.fetcher
    first = store.publish(1, [("w", torch.ones(100))])
    layout = bulk_learner.servicer.layout(store.get(1))
    for version in (2, 3):
        store.publish(version, [("w", torch.ones(100))])
    # the bulk server says NOT_FOUND for a version evicted after DescribeVersion answered
    receiver = BulkReceiver(
        ("127.0.0.1", bulk_learner.bulk.port),
        "r",
        1,
        memoryview(bytearray(layout.total_bytes)),
        fetcher.link.worker,
        max_attempts=3,
        connect_timeout_s=5,
        io_timeout_s=5,
    )
    receiver.set_layout(layout.crc32_chunk_bytes, layout.chunk_crc32)
    with pytest.raises(BulkError, match="version 1 is not retained") as error:
        await asyncio.to_thread(receiver.run)
    assert error.value.reason == "not_found"
    # a replica falls back to FetchWeights, which has the last word: NOT_FOUND
    before = fallbacks("not_found")
    with pytest.raises(RpcError) as info:
        await fetcher.fetch(announced(first))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert fallbacks("not_found") - before == 1
