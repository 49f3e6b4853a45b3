"""Weight layout and integrity: publish (trainer.weights) -> chunks on the wire -> fetch, verify
and rebuild (services.rollout.weight_sync), over a real gRPC server on port 0."""

from __future__ import annotations

import dataclasses
import hashlib

import grpc
import pytest
import torch

from puremesh.services.common.client import RetryPolicy, RpcError
from puremesh.services.rollout import weight_sync
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
