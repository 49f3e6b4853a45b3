"""Hostile and slow clients against the learner's weight plane, on loopback (issue 12, point 4).

A real learner side (version store, WeightService in a ServiceHost, bulk data plane) is
attacked with raw sockets and raw gRPC calls: slow readers on the bulk port and on
FetchWeights, trickled headers, a connection flood, wrong ranges and versions, made-up replica
ids. Throughout, the learner's model-size buffers and threads stay bounded and a real fetcher
(the replica side) still syncs over the bulk path. Attackers connect from 127.0.0.2..., the
real replica from 127.0.0.1 (per-peer limits are per address).
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import threading
import time
import weakref
from contextlib import ExitStack

import grpc
import pytest
import torch

from puremesh.rpc.client import RetryPolicy
from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import ServerSettings
from puremesh.weights.v1 import weights_pb2, weights_pb2_grpc
from puremesh.weightsync import tcp_bulk
from puremesh.weightsync.bulk_server import BulkServer
from puremesh.weightsync.fetcher import WeightFetcher
from puremesh.weightsync.servicer import WeightServicer, announcement, weight_service
from puremesh.weightsync.store import WeightStore
from puremesh.weightsync.transport import Announcement, FetchOptions

BIG = 8 << 20  # float32 elements: 32 MiB versions, far more than the socket buffers take
FAST_RETRY = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.05)


def weights(version: int, elements: int = BIG) -> list[tuple[str, torch.Tensor]]:
    return [("w", torch.full((elements,), float(version)))]


class Learner:
    """The weight side of a learner, wired as cli/learner.py wires it."""

    def __init__(self, store: WeightStore, bulk: BulkServer, servicer: WeightServicer) -> None:
        self.store, self.bulk, self.servicer = store, bulk, servicer
        self.host = ServiceHost([weight_service(servicer)], ServerSettings(metrics_port=None))

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.bulk.port)

    async def stop(self) -> None:
        self.store.close()
        self.bulk.close()
        await self.host.drain(grace=1)


@pytest.fixture
async def learner_factory():
    started: list[Learner] = []

    async def start(store: dict | None = None, bulk: dict | None = None, servicer: dict | None = None):
        """`store` holds WeightStore arguments; `bulk` and `servicer` limits, set as attributes
        (both read them at each use)."""
        weight_store = WeightStore(chunk_bytes=1 << 20, **(store or {}))
        server = BulkServer(weight_store, "127.0.0.1")
        weight_store.offer_bulk(server.port)
        learner = Learner(weight_store, server, WeightServicer(weight_store))
        for target, limits in ((server, bulk), (learner.servicer, servicer)):
            for name, value in (limits or {}).items():
                setattr(target, name, value)
        await learner.host.start()
        started.append(learner)
        return learner

    yield start
    for learner in started:
        await learner.stop()


def attacker(address: tuple[str, int], peer: int, rcvbuf: int = 4096) -> socket.socket:
    """A raw connection from 127.0.0.<peer> with a tiny receive buffer (a slow reader)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((f"127.0.0.{peer}", 0))
    sock.settimeout(10)
    sock.connect(address)
    return sock


def bulk_request(version: int, offset: int, length: int, replica_id: bytes = b"attacker") -> bytes:
    return struct.pack("<4sHHQQQ", b"PMWB", 1, len(replica_id), version, offset, length) + replica_id


def closed_by_peer(sock: socket.socket, within_s: float, chunk: int = 1 << 16, pause_s: float = 0.0) -> bool:
    """True if the server closed (EOF or reset) within `within_s` s, reading whatever comes
    (`chunk` bytes at a time, `pause_s` between reads: a slow reader)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(chunk):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
        time.sleep(pause_s)
    return False


def live(refs: list[weakref.ref]) -> int:
    gc.collect()
    return sum(ref() is not None for ref in refs)


def fallbacks() -> float:
    return sum(
        s.value for m in tcp_bulk.BULK_FALLBACKS.collect() for s in m.samples if s.name.endswith("_total")
    )


async def real_fetch(learner: Learner, replica_id: str = "real-replica") -> list[tuple[str, torch.Tensor]]:
    fetcher = WeightFetcher(
        f"127.0.0.1:{learner.host.port}", replica_id, FetchOptions(retry=FAST_RETRY, bulk_io_timeout_s=10)
    )
    try:
        info = learner.store.current
        assert info is not None
        return await fetcher.fetch(Announcement.from_proto(announcement(info)))
    finally:
        await fetcher.close()


async def test_slow_bulk_readers_pin_no_buffers(learner_factory) -> None:
    """Each publish, one more slow client asks for the newest version over the bulk port and
    stops reading. The learner keeps at most retain + 1 buffers: a publish revokes the version
    a slow reader holds and cuts its connection."""
    learner = await learner_factory()
    store, refs = learner.store, []
    with ExitStack() as stack:
        readers = []
        for version in range(1, 6):
            await asyncio.to_thread(store.publish, version, weights(version))
            refs.append(weakref.ref(store.get(version).storage))
            sock = stack.enter_context(attacker(learner.address, peer=1 + version))
            sock.sendall(bulk_request(version, 0, BIG * 4))
            readers.append(sock)
            deadline = time.monotonic() + 5
            while store.get(version).readers == 0:  # the server is sending, blocked on the reader
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        assert live(refs) <= store.retain + 1
        cut = [await asyncio.to_thread(closed_by_peer, sock, 5) for sock in readers[:-2]]
        assert all(cut), "the readers of revoked versions are cut off"
    assert [round(t[0].item()) for _, t in await real_fetch(learner)] == [5]


async def test_bulk_reply_has_a_total_deadline(learner_factory) -> None:
    learner = await learner_factory(bulk={"transfer_grace_s": 0.5, "min_bytes_per_second": 64 << 20})
    learner.store.publish(1, weights(1))
    with attacker(learner.address, peer=2) as sock:
        sock.sendall(bulk_request(1, 0, BIG * 4))
        # reading 4 KiB every 10 ms (400 KiB/s) would take 80 s; the deadline is 0.5 s + 0.5 s
        reading = asyncio.create_task(asyncio.to_thread(closed_by_peer, sock, 30, 4096, 0.01))
        began = time.monotonic()
        try:
            while learner.bulk.connections:
                assert time.monotonic() - began < 4, "the slow reader's connection is still served"
                await asyncio.sleep(0.05)
            assert learner.store.get(1).readers == 0
        finally:
            sock.shutdown(socket.SHUT_RDWR)
            await reading


async def test_slow_fetchweights_reader_is_cut_off_and_pins_nothing(learner_factory) -> None:
    learner = await learner_factory(servicer={"transfer_grace_s": 0.5, "min_bytes_per_second": 64 << 20})
    learner.store.publish(1, weights(1))
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{learner.host.port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        stub = weights_pb2_grpc.WeightServiceStub(channel)
        call = stub.FetchWeights(weights_pb2.FetchWeightsRequest(version=1, replica_id="slow"), timeout=30)
        await call.read()  # one chunk, then nothing
        await asyncio.sleep(0.2)
        assert learner.store.get(1).readers == 0, "a stalled FetchWeights holds no buffer"
        await asyncio.sleep(2.5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not go out within" in info.value.details()
    assert learner.servicer.fetches == 0


async def test_trickled_headers_hold_no_slot(learner_factory) -> None:
    learner = await learner_factory(bulk={"header_timeout_s": 1.0, "max_connections": 4})
    learner.store.publish(1, weights(1, 1024))
    request = bulk_request(1, 0, 4096)

    def trickle(peer: int) -> float:
        with attacker(learner.address, peer) as sock:
            began = time.monotonic()
            for byte in request:  # one byte every 0.2 s: the header would take 8 s
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                if closed_by_peer(sock, 0.2):
                    break
            return time.monotonic() - began

    held = await asyncio.gather(*(asyncio.to_thread(trickle, peer) for peer in range(2, 10)))
    assert max(held) < 4, f"trickled headers held their connections for {max(held):.1f} s"
    assert [round(t[0].item()) for _, t in await real_fetch(learner)] == [1]


async def test_a_connection_flood_costs_no_threads_and_replicas_still_sync(learner_factory) -> None:
    """A flood from one address takes at most max_connections_per_peer slots (and threads); the
    others are refused from the accepting thread. Garbage requests get error replies. A real
    replica syncs over the bulk path meanwhile, without falling back."""
    learner = await learner_factory()
    learner.store.publish(1, weights(1, 1 << 16))
    threads_before = threading.active_count()
    before = fallbacks()
    with ExitStack() as stack:
        flood = [stack.enter_context(attacker(learner.address, peer=2)) for _ in range(200)]
        await asyncio.sleep(0.5)
        per_peer = getattr(learner.bulk, "max_connections_per_peer", 4)
        assert threading.active_count() - threads_before <= per_peer + 1
        assert learner.bulk.connections <= per_peer
        for sock in flood[:3]:  # wrong versions and ranges on admitted connections
            sock.sendall(bulk_request(99, 0, 1) + bulk_request(1, 1 << 40, 1))
        fetched = await real_fetch(learner)
        assert torch.equal(fetched[0][1], weights(1, 1 << 16)[0][1])
        assert fallbacks() == before, "the real replica was served over the bulk path"
    assert learner.store.replicas == {}  # downloads alone (made-up ids) are not recorded


async def test_bulk_bytes_that_match_their_crcs_but_not_the_sha256_fall_back(learner_factory) -> None:
    """A bulk server that sends other bytes, with CRC-32s to match, is caught by the whole
    version's SHA-256 (announced over gRPC); the replica falls back to FetchWeights."""
    learner = await learner_factory(store={"bulk_chunk_bytes": 1 << 16})
    info = learner.store.publish(1, weights(1, 1 << 16))
    stored = learner.store.get(1)
    forged = bytearray(stored.data)
    forged[100] ^= 0xFF
    from puremesh.contract.bulk import crc32

    stored.chunk_crc32[:] = [crc32(forged[i : i + (1 << 16)]) for i in range(0, len(forged), 1 << 16)]
    learner.bulk.payload = lambda held, start, stop: bytes(forged[start:stop])
    before = tcp_bulk.BULK_FALLBACKS.labels("sha256")._value.get()
    fetched = await real_fetch(learner)
    assert torch.equal(fetched[0][1], weights(1, 1 << 16)[0][1])
    assert tcp_bulk.BULK_FALLBACKS.labels("sha256")._value.get() - before == 1
    assert info.sha256 == stored.info.sha256


async def test_replica_records_expire_and_are_bounded(learner_factory) -> None:
    learner = await learner_factory()
    book = learner.store._replicas  # (its limits are WeightStore arguments)
    book.ttl_s, book.max_records = 0.5, 10
    learner.store.publish(1, weights(1, 16))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{learner.host.port}") as channel:
        stub = weights_pb2_grpc.WeightServiceStub(channel)
        for i in range(50):  # made-up subscribers: each opens a stream, reads, goes away
            call = stub.WatchVersions(weights_pb2.WatchVersionsRequest(replica_id=f"fake-{i}"), timeout=5)
            assert (await call.read()).version == 1
            call.cancel()
        await asyncio.sleep(0.2)
        assert len(learner.store.replicas) <= 10
        await asyncio.sleep(0.6)
        assert learner.store.replicas == {}
