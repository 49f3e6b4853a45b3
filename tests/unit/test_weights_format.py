"""Weight layout and integrity: publish (trainer.weights) -> chunks on the wire -> fetch, verify
and rebuild (services.rollout.weight_sync), over a real gRPC server on port 0; and the bulk data
plane (trainer.weight_bulk, services.rollout.weight_bulk): its protocol, per-chunk CRC-32
checks and the fallback to FetchWeights."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import socket
import struct
import types
import zlib

import grpc
import pytest
import torch

from puremesh.rpc.client import RetryPolicy, RpcError
from puremesh.services.rollout import weight_bulk, weight_sync
from puremesh.services.rollout.weight_sync import Announcement, WeightFetcher, WeightSyncError, split_chunk
from puremesh.trainer.weights import (
    ChunkMessage,
    VersionNotFound,
    WeightPublisher,
    WeightServicer,
    add_weight_service_to_server,
    announcement,
)
from puremesh.weights.v1 import weights_pb2, weights_pb2_grpc

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
BULK_CHUNK = 48  # the bulk CRC-32 chunk size: not the FetchWeights chunk size (64), nor a divisor


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


@pytest.fixture(params=["encoded", "generated"])
async def learner(request):
    """A learner on port 0, registered with add_weight_service_to_server (chunks encoded by the
    servicer) or with the generated function (chunks as WeightChunk messages)."""
    publisher = WeightPublisher(retain=2, chunk_bytes=64)
    servicer = WeightServicer(publisher)
    server = grpc.aio.server()
    if request.param == "encoded":
        add_weight_service_to_server(servicer, server)
    else:
        weights_pb2_grpc.add_WeightServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fetcher = WeightFetcher(f"127.0.0.1:{port}", "replica-a", retry=FAST_RETRY)
    yield publisher, servicer, fetcher
    await fetcher.close()
    publisher.close()
    await server.stop(0)


def assert_same(fetched: list[tuple[str, torch.Tensor]], expected: list[tuple[str, torch.Tensor]]) -> None:
    assert [name for name, _ in fetched] == [name for name, _ in expected]
    for (name, got), (_, want) in zip(fetched, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want.detach()), name


def test_chunk_message_serialises_to_a_weight_chunk() -> None:
    spec = weights_pb2.TensorSpec(name="w", dtype="float32", shape=[2], offset=0, nbytes=8)
    data = bytes(range(200))
    chunk = ChunkMessage(7, 3, 9, 600, memoryview(data), "ab" * 32, [spec])
    expected = weights_pb2.WeightChunk(
        version=7, index=3, total_chunks=9, offset=600, data=data, sha256="ab" * 32, manifest=[spec]
    )
    wire = chunk.SerializeToString()
    assert weights_pb2.WeightChunk.FromString(wire) == expected
    header, view = split_chunk(wire)
    assert bytes(view) == data and not header.data
    assert header.manifest[0] == spec and (header.version, header.index, header.offset) == (7, 3, 600)
    # split_chunk reads any field order, e.g. protobuf's own encoding
    header, view = split_chunk(expected.SerializeToString())
    assert bytes(view) == data and header.sha256 == "ab" * 32
    empty = ChunkMessage(1, 0, 1, 0, b"", hashlib.sha256(b"").hexdigest())
    assert split_chunk(empty.SerializeToString())[1].nbytes == 0


@pytest.mark.parametrize("max_chunk_bytes", [0, 5, 1000])
async def test_round_trip_every_dtype_and_shape(learner, max_chunk_bytes) -> None:
    publisher, _, fetcher = learner
    tensors = mixed_tensors()
    info = publisher.publish(1, tensors)
    stored = publisher.get(1)
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
    fetcher.max_chunk_bytes = max_chunk_bytes
    fetched = await fetcher.fetch(Announcement.from_proto(announcement(info)))
    assert_same(fetched, tensors)


async def test_snapshot_is_a_copy_and_empty_versions_work(learner) -> None:
    publisher, _, fetcher = learner
    weight = torch.ones(10)
    info = publisher.publish(1, [("w", weight)])
    weight.add_(1)  # the learner keeps training after publishing
    assert_same(await fetcher.fetch(Announcement.from_proto(announcement(info))), [("w", torch.ones(10))])
    info = publisher.publish(2, [])
    assert (info.total_bytes, info.total_chunks, info.num_tensors) == (0, 1, 0)
    assert await fetcher.fetch(Announcement.from_proto(announcement(info))) == []


async def test_checksum_failures_are_detected(learner, monkeypatch) -> None:
    publisher, servicer, fetcher = learner
    info = publisher.publish(1, mixed_tensors())
    ann = Announcement.from_proto(announcement(info))
    # the announced checksum of the whole version is checked after assembly
    with pytest.raises(WeightSyncError, match="every chunk matches its checksum but"):
        await fetcher.fetch(dataclasses.replace(ann, sha256="0" * 64))
    # a chunk that arrives corrupted on every attempt fails after max_attempts
    produce = servicer.chunk

    def corrupt(stored, index, chunk_bytes, with_manifest):
        chunk = produce(stored, index, chunk_bytes, with_manifest)
        if index == 2:
            data = bytearray(chunk.data)
            data[0] ^= 0xFF
            chunk = dataclasses.replace(chunk, data=bytes(data))
        return chunk

    monkeypatch.setattr(servicer, "chunk", corrupt)
    retries = weight_sync.CHUNK_RETRIES._value.get()
    with pytest.raises(WeightSyncError, match=r"chunks \[2\] still bad or missing after 3 attempts"):
        await fetcher.fetch(ann)
    assert weight_sync.CHUNK_RETRIES._value.get() - retries == 2


def test_versions_must_increase() -> None:
    publisher = WeightPublisher()
    for bad in (0, -1, True, 1.0, "1"):
        with pytest.raises(ValueError, match="version must be an int greater than"):
            publisher.publish(bad, [("w", torch.zeros(1))])
    assert publisher.current_version == 0 and publisher.current is None
    publisher.publish(3, [("w", torch.zeros(1))])
    for bad in (3, 2):
        with pytest.raises(ValueError, match="greater than the current version 3"):
            publisher.publish(bad, [("w", torch.zeros(1))])
    with pytest.raises(ValueError, match="given twice"):
        publisher.publish(4, [("w", torch.zeros(1)), ("w", torch.zeros(1))])
    with pytest.raises(ValueError, match="pairs"):
        publisher.publish(4, [torch.zeros(1)])
    assert publisher.current_version == 3
    publisher.close()
    with pytest.raises(RuntimeError, match="closed"):
        publisher.publish(4, [("w", torch.zeros(1))])


async def test_retention_evicts_old_versions(learner) -> None:
    publisher, _, fetcher = learner
    infos = [publisher.publish(v, [("w", torch.full((4,), float(v)))]) for v in (1, 2, 3)]
    assert publisher.retained_versions == [2, 3] and publisher.current_version == 3
    with pytest.raises(VersionNotFound, match="version 1 is not retained"):
        publisher.get(1)
    with pytest.raises(RpcError) as info:
        await fetcher.fetch(Announcement.from_proto(announcement(infos[0])))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    fetched = await fetcher.fetch(Announcement.from_proto(announcement(infos[1])))
    assert_same(fetched, [("w", torch.full((4,), 2.0))])


async def test_buffers_are_reused_only_when_nobody_reads_them(learner) -> None:
    publisher, _, fetcher = learner
    weights = [("w", torch.arange(100, dtype=torch.float32))]
    for version in (1, 2):
        publisher.publish(version, weights)
    first = publisher.get(1).storage.data_ptr()
    held = publisher.acquire(2)  # e.g. a FetchWeights stream still sending version 2
    publisher.publish(3, weights)  # evicts 1, whose bytes nobody reads: reused
    assert publisher.get(3).storage.data_ptr() == first and publisher.retained_versions == [2, 3]
    publisher.publish(4, weights)  # evicts 2, still read: fresh bytes, 2 stays intact
    assert publisher.get(4).storage.data_ptr() != held.storage.data_ptr()
    assert bytes(held.data) == bytes(publisher.get(4).data)
    publisher.release(held)
    publisher.publish(5, [("w", torch.zeros(3))])  # another size: fresh bytes
    assert publisher.retained_versions == [4, 5]

    # the subscriber side: a recycled buffer receives the next version of the same size
    fetched = await fetcher.download(Announcement.from_proto(announcement(publisher.get(4).info)))
    pointer = fetched.buffer.data_ptr()
    fetcher.recycle(fetched)
    again = await fetcher.download(Announcement.from_proto(announcement(publisher.get(4).info)))
    assert again.buffer.data_ptr() == pointer
    assert_same(again.tensors(), weights)


# ---------------------------------------------------------------------- the bulk data plane


@pytest.fixture
async def bulk_learner():
    """A learner on port 0 with its bulk data plane; FetchWeights chunks are recorded in `sent`."""
    publisher = WeightPublisher(retain=2, chunk_bytes=64, bulk_chunk_bytes=BULK_CHUNK, bulk_host="127.0.0.1")
    servicer = WeightServicer(publisher)
    sent: list[int] = []
    produce = servicer.chunk

    def record(stored, index, chunk_bytes, with_manifest):
        sent.append(index)
        return produce(stored, index, chunk_bytes, with_manifest)

    servicer.chunk = record
    server = grpc.aio.server()
    add_weight_service_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fetcher = WeightFetcher(f"127.0.0.1:{port}", "replica-b", retry=FAST_RETRY)
    yield types.SimpleNamespace(publisher=publisher, servicer=servicer, fetcher=fetcher, sent=sent, port=port)
    await fetcher.close()
    publisher.close()
    await server.stop(0)


def fallbacks(reason: str) -> float:
    return weight_sync.BULK_FALLBACKS.labels(reason)._value.get()


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
    publisher, fetcher = bulk_learner.publisher, bulk_learner.fetcher
    tensors = mixed_tensors()
    info = publisher.publish(1, tensors)
    ann = announcement(info)
    assert ann.transport == weights_pb2.TRANSPORT_TCP_BULK and ann.bulk_port == publisher.bulk_port > 0
    assert ann.bulk_host == ""  # = the host of the replica's target
    assert fetcher.bulk_address(Announcement.from_proto(ann)) == ("127.0.0.1", publisher.bulk_port)
    before = {reason: fallbacks(reason) for reason in ("connect", "protocol", "io", "checksum")}
    fetched = await fetcher.fetch(Announcement.from_proto(ann))
    assert_same(fetched, tensors)
    assert bulk_learner.sent == []  # not one FetchWeights chunk
    assert before == {reason: fallbacks(reason) for reason in before}
    assert publisher.replicas["replica-b"].version == 1  # a full bulk fetch counts, like FetchWeights
    assert publisher.get(1).readers == 0  # released after sending
    # an empty version: one empty chunk
    info = publisher.publish(2, [])
    assert await fetcher.fetch(Announcement.from_proto(announcement(info))) == []
    assert bulk_learner.sent == []


async def test_describe_version(bulk_learner) -> None:
    publisher = bulk_learner.publisher
    tensors = mixed_tensors()
    info = publisher.publish(1, tensors)
    data = bytes(publisher.get(1).data)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{bulk_learner.port}") as channel:
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
        publisher.close()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.DescribeVersion(describe(version=1, replica_id="raw"), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_bulk_corrupted_chunk_is_refetched_by_range(bulk_learner) -> None:
    publisher, fetcher = bulk_learner.publisher, bulk_learner.fetcher
    tensors = mixed_tensors()
    info = publisher.publish(1, tensors)
    server = publisher.bulk
    produce = server.payload
    ranges: list[tuple[int, int]] = []

    def flip_once(stored, start, stop):  # the first time chunk 2 goes out, one bit flips
        ranges.append((start, stop))
        data = produce(stored, start, stop)
        if len(ranges) == 1:
            data = bytearray(data)
            data[2 * BULK_CHUNK + 5 - start] ^= 0x10
        return data

    server.payload = flip_once
    retries = weight_sync.CHUNK_RETRIES._value.get()
    fetched = await fetcher.fetch(Announcement.from_proto(announcement(info)))
    assert_same(fetched, tensors)
    assert ranges == [(0, info.total_bytes), (96, 144)]  # everything, then only chunk 2
    assert weight_sync.CHUNK_RETRIES._value.get() - retries == 1
    assert bulk_learner.sent == []


async def test_bulk_chunk_failing_every_pass_falls_back_to_fetchweights(bulk_learner) -> None:
    publisher, fetcher = bulk_learner.publisher, bulk_learner.fetcher
    tensors = mixed_tensors()
    info = publisher.publish(1, tensors)
    produce = publisher.bulk.payload
    passes = []

    def corrupt(stored, start, stop):
        passes.append((start, stop))
        data = bytearray(produce(stored, start, stop))
        data[50 - start if start <= 50 < stop else 0] ^= 0xFF  # chunk 1, every time
        return data

    publisher.bulk.payload = corrupt
    before = fallbacks("checksum")
    assert_same(await fetcher.fetch(Announcement.from_proto(announcement(info))), tensors)
    assert passes == [(0, info.total_bytes), (48, 96), (48, 96)]  # FAST_RETRY: 3 passes
    assert fallbacks("checksum") - before == 1
    assert bulk_learner.sent == list(range(info.total_chunks))  # then FetchWeights, intact


async def test_learner_without_bulk_is_fetched_with_fetchweights(learner) -> None:
    publisher, _, fetcher = learner
    info = publisher.publish(1, mixed_tensors())
    ann = announcement(info)
    assert ann.transport == weights_pb2.TRANSPORT_GRPC_STREAM and ann.bulk_port == 0
    assert publisher.bulk is None and publisher.bulk_port == 0
    assert fetcher.bulk_address(Announcement.from_proto(ann)) is None
    assert_same(await fetcher.fetch(Announcement.from_proto(ann)), mixed_tensors())


async def test_replica_with_bulk_off_uses_fetchweights(bulk_learner) -> None:
    info = bulk_learner.publisher.publish(1, mixed_tensors())
    async with WeightFetcher(f"127.0.0.1:{bulk_learner.port}", "no-bulk", bulk=False) as fetcher:
        ann = Announcement.from_proto(announcement(info))
        assert fetcher.bulk_address(ann) is None
        assert_same(await fetcher.fetch(ann), mixed_tensors())
    assert bulk_learner.sent == list(range(info.total_chunks))


async def test_closed_bulk_port_falls_back_and_rests(bulk_learner, caplog) -> None:
    publisher, fetcher = bulk_learner.publisher, bulk_learner.fetcher
    publisher.bulk.close()  # the port stops answering; the announcements still offer it
    info = publisher.publish(1, mixed_tensors())
    ann = Announcement.from_proto(announcement(info))
    before = fallbacks("connect")
    with caplog.at_level(logging.WARNING, logger=weight_sync.__name__):
        assert_same(await fetcher.fetch(ann), mixed_tensors())
    assert fallbacks("connect") - before == 1
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "using FetchWeights" in caplog.text
    assert bulk_learner.sent == list(range(info.total_chunks))
    # the bulk path rests for a while after a connection failure ...
    assert fetcher.bulk_address(ann) is None
    assert_same(await fetcher.fetch(ann), mixed_tensors())
    assert fallbacks("connect") - before == 1
    # ... then it is tried again
    fetcher._bulk_resumes_at = 0.0
    assert fetcher.bulk_address(ann) == ("127.0.0.1", publisher.bulk_port)


async def test_unreachable_bulk_port_falls_back(learner, unused_tcp_port) -> None:
    publisher, _, fetcher = learner
    info = publisher.publish(1, mixed_tensors())
    ann = dataclasses.replace(Announcement.from_proto(announcement(info)), bulk_port=unused_tcp_port)
    before = fallbacks("connect")
    assert_same(await fetcher.fetch(ann), mixed_tensors())  # DescribeVersion answers, the port refuses
    assert fallbacks("connect") - before == 1


async def test_bulk_server_answers_bad_requests_and_keeps_serving(bulk_learner) -> None:
    publisher = bulk_learner.publisher
    publisher.publish(1, mixed_tensors())
    data = bytes(publisher.get(1).data)
    address = ("127.0.0.1", publisher.bulk_port)

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
    assert publisher.replicas["raw-bulk"].version == 1 and "raw" not in publisher.replicas
    assert publisher.get(1).readers == 0
    assert_same(
        await bulk_learner.fetcher.fetch(Announcement.from_proto(announcement(publisher.current))),
        mixed_tensors(),
    )


async def test_bulk_server_limits_connections_and_closes_with_the_publisher(bulk_learner) -> None:
    publisher = bulk_learner.publisher
    publisher.publish(1, mixed_tensors())
    server = publisher.bulk
    address = ("127.0.0.1", server.port)
    server.max_connections = 1

    def busy() -> None:
        with socket.create_connection(address, timeout=5) as first:
            first.sendall(bulk_request(1, 0, 4))
            assert read_reply(first)[0] == 0  # admitted
            with socket.create_connection(address, timeout=5) as second:
                status, message = read_reply(second)
                assert status == 4 and b"connections are open" in message  # UNAVAILABLE
            publisher.close()
            assert first.recv(1) == b""  # the open connection was shut down
        with pytest.raises(OSError):
            socket.create_connection(address, timeout=2)

    await asyncio.to_thread(busy)
    assert server.closed and server.connections == 0


async def test_bulk_evicted_version_is_a_clear_error_then_fetchweights_decides(bulk_learner) -> None:
    publisher, fetcher = bulk_learner.publisher, bulk_learner.fetcher
    first = publisher.publish(1, [("w", torch.ones(100))])
    layout = publisher.get(1).layout()
    for version in (2, 3):
        publisher.publish(version, [("w", torch.ones(100))])
    # the bulk server says NOT_FOUND for a version evicted after DescribeVersion answered
    receiver = weight_bulk.BulkReceiver(
        ("127.0.0.1", publisher.bulk_port), "r", 1, memoryview(bytearray(layout.total_bytes)), fetcher._worker
    )
    receiver.set_layout(layout.crc32_chunk_bytes, layout.chunk_crc32)
    with pytest.raises(weight_bulk.BulkError, match="version 1 is not retained") as error:
        await asyncio.to_thread(receiver.run)
    assert error.value.reason == "not_found"
    # a replica falls back to FetchWeights, which has the last word: NOT_FOUND
    before = fallbacks("not_found")
    with pytest.raises(RpcError) as info:
        await fetcher.fetch(Announcement.from_proto(announcement(first)))
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert fallbacks("not_found") - before == 1


def test_target_host() -> None:
    cases = {
        "127.0.0.1:50060": "127.0.0.1",
        "learner:50060": "learner",
        "pm-learner.ns.svc.cluster.local:50060": "pm-learner.ns.svc.cluster.local",
        "dns:///learner:50060": "learner",
        "dns://8.8.8.8/learner:50060": "learner",
        "dns:learner:50060": "learner",
        "ipv4:10.0.0.1:50060,10.0.0.2:50060": "10.0.0.1",
        "[::1]:50060": "::1",
        "ipv6:[fe80::1]:50060": "fe80::1",
        "learner": "learner",
        "unix:/tmp/learner.sock": None,
        "unix-abstract:learner": None,
    }
    assert {target: weight_bulk.target_host(target) for target in cases} == cases
    assert weight_bulk.chunk_ranges([5, 1, 2, 7], 10, 75) == [(10, 30), (50, 60), (70, 75)]
