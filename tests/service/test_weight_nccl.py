"""TRANSPORT_NCCL on CPU (weightsync/nccl.py, nccl_sender.py, nccl_group.py): the registry and
the replica's choice, the learner's announcement, OpenNcclGroup / SendNccl status codes, the
fallback to the bulk port and the timeouts, over real servers on port 0.

NCCL itself needs CUDA: the groups here run on `LoopbackNccl`, a test double in which both ranks
live in this process and each piece passes through a queue (the communicator contract of
nccl_group.py). The same paths over real NCCL on two GPUs are tests/gpu/test_gpu_paths.py.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from typing import ClassVar

import grpc
import pytest
import torch
from weightsync_learner import start_learner

from puremesh.cli.learner import weight_servicer, weight_store
from puremesh.rpc.client import RetryPolicy
from puremesh.services.rollout.hf_engine import HfEngine
from puremesh.trainer.settings import WeightServerSettings
from puremesh.weights.v1 import weights_pb2, weights_pb2_grpc
from puremesh.weightsync import nccl, nccl_sender
from puremesh.weightsync.fetcher import WeightFetcher
from puremesh.weightsync.grpc_stream import GrpcStreamTransport
from puremesh.weightsync.nccl import NcclTransport
from puremesh.weightsync.nccl_group import VllmNccl
from puremesh.weightsync.nccl_sender import NcclSender
from puremesh.weightsync.subscriber import WeightSubscriber
from puremesh.weightsync.tcp_bulk import TcpBulkTransport
from puremesh.weightsync.transport import Announcement, FetchOptions

CHUNK_BYTES = 64 << 10
PIECE_BYTES = 256 << 10  # the tiny policy (~2 MB) crosses in several pieces
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.02, max_backoff_s=0.1)
SHORT_SETUP_S = 0.3


class _LoopbackComm:
    """Both ranks of one group in this process: the sender's pieces go through a queue."""

    def __init__(self, pipe: queue.Queue, rank: int, stall: threading.Event | None) -> None:
        self.pipe, self.rank, self.stall = pipe, rank, stall
        self.aborted = threading.Event()

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        if self.stall is not None:  # a peer that stopped: wait until aborted
            self.aborted.wait()
            raise RuntimeError("NCCL communicator aborted")
        if self.rank == src:
            self.pipe.put(tensor.clone())
            return
        while not self.aborted.is_set():
            try:
                tensor.copy_(self.pipe.get(timeout=0.05))
                if self.corrupt:
                    tensor[0] ^= 0xFF
                return
            except queue.Empty:
                continue
        raise RuntimeError("NCCL communicator aborted")

    def synchronize(self) -> None:
        pass

    corrupt = False  # the receiver flips the first byte of every piece (a bad link)

    def destroy(self) -> None:
        self.aborted.set()


class LoopbackNccl:
    """An NcclBackend whose groups live in this process (module docstring). `joins=False`: this
    end never joins (a rendezvous that never completes); `stall=True`: its broadcasts hang."""

    groups: ClassVar[dict[bytes, tuple[threading.Barrier, queue.Queue]]] = {}
    lock = threading.Lock()

    def __init__(self, joins: bool = True, stall: bool = False, corrupt: bool = False) -> None:
        self.joins, self.stall = joins, threading.Event() if stall else None
        self.corrupt = corrupt
        self.released = threading.Event()

    def unavailable(self) -> str | None:
        return None

    def unique_id(self) -> bytes:
        return os.urandom(128)

    def join(self, unique_id: bytes, rank: int, world_size: int, device: torch.device) -> _LoopbackComm:
        if not self.joins:
            self.released.wait()
            raise RuntimeError("never joined")
        with self.lock:
            barrier, pipe = self.groups.setdefault(unique_id, (threading.Barrier(world_size), queue.Queue()))
        barrier.wait(timeout=30)
        comm = _LoopbackComm(pipe, rank, self.stall)
        comm.corrupt = self.corrupt
        return comm


@pytest.fixture
async def learners():
    started = []

    async def start(backend=None, *, bulk: bool = True, **limits) -> object:
        def sender(store):
            options = {"setup_timeout_s": 5.0, "chunk_bytes": PIECE_BYTES, **limits}
            return NcclSender(store, backend, "cpu", **options)

        learner = await start_learner(chunk_bytes=CHUNK_BYTES, bulk=bulk, nccl=sender if backend else None)
        started.append(learner)
        return learner

    yield start
    for learner in started:
        await learner.stop()


@pytest.fixture
async def engine(tiny_policy_dir):
    engine = HfEngine(tiny_policy_dir, dtype="float32", max_model_len=256)
    await engine.start()
    yield engine
    await engine.close()


def versions(engine_weights: dict[str, torch.Tensor], version: int) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(version)
    return [(name, t + 0.1 * torch.randn(t.shape, generator=generator)) for name, t in engine_weights.items()]


def base_weights(tiny_policy_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_policy_dir), local_files_only=True, dtype=torch.float32
    )
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def fetcher_of(target: str, backend=None, replica_id: str = "replica-1", **options) -> WeightFetcher:
    fetcher = WeightFetcher(target, replica_id, FetchOptions(retry=FAST_RETRY, nccl_device="cpu", **options))
    if weights_pb2.TRANSPORT_NCCL in fetcher.transports:
        fetcher.transports[weights_pb2.TRANSPORT_NCCL] = NcclTransport(
            fetcher.link, backend or LoopbackNccl()
        )
    return fetcher


def counter(metric, label: str) -> float:
    return metric.labels(label)._value.get()


async def test_registry_and_the_replicas_choice() -> None:
    nccl_announced = Announcement(1, 8, 1, 1, "0" * 64, transport=weights_pb2.TRANSPORT_NCCL, bulk_port=7)
    async with WeightFetcher("127.0.0.1:1", "r") as fetcher:
        assert isinstance(fetcher.transports[weights_pb2.TRANSPORT_NCCL], NcclTransport)
        assert fetcher.transport_for(nccl_announced) is fetcher.transports[weights_pb2.TRANSPORT_NCCL]
        assert isinstance(fetcher.transports[weights_pb2.TRANSPORT_NCCL].fallback, TcpBulkTransport)
    async with WeightFetcher("127.0.0.1:1", "r", FetchOptions(nccl=False)) as fetcher:
        assert weights_pb2.TRANSPORT_NCCL not in fetcher.transports
        assert isinstance(fetcher.transport_for(nccl_announced), TcpBulkTransport)  # the announced bulk port
    async with WeightFetcher("127.0.0.1:1", "r", FetchOptions(nccl=False, bulk=False)) as fetcher:
        assert isinstance(fetcher.transport_for(nccl_announced), GrpcStreamTransport)
    async with WeightFetcher("127.0.0.1:1", "r", FetchOptions(bulk=False)) as fetcher:
        assert isinstance(fetcher.transports[weights_pb2.TRANSPORT_NCCL].fallback, GrpcStreamTransport)


async def test_learner_announces_nccl_and_keeps_its_bulk_port(learners, tiny_policy_dir) -> None:
    learner = await learners(LoopbackNccl())
    learner.store.publish(1, versions(base_weights(tiny_policy_dir), 1))
    async with WeightFetcher(learner.target, "r") as fetcher:
        announced = await fetcher.current(0)
    assert announced is not None and announced.transport == weights_pb2.TRANSPORT_NCCL
    assert announced.bulk_port == learner.bulk.port and announced.run_id == learner.store.run_id


async def test_open_and_send_status_codes(learners, tiny_policy_dir) -> None:
    plain = await learners(None)
    refusing = await learners(VllmNccl()) if not torch.cuda.is_available() else None
    loopback = await learners(LoopbackNccl(), max_groups=1)
    loopback.store.publish(1, versions(base_weights(tiny_policy_dir), 1))

    async def call(learner, method: str, request):
        async with grpc.aio.insecure_channel(learner.target) as channel:
            stub = weights_pb2_grpc.WeightServiceStub(channel)
            try:
                return await getattr(stub, method)(request, timeout=10)
            except grpc.aio.AioRpcError as error:
                return error.code(), error.details()

    opening = weights_pb2.OpenNcclGroupRequest
    code, details = await call(plain, "OpenNcclGroup", opening(replica_id="r"))
    assert code == grpc.StatusCode.UNAVAILABLE and "learner.weights.nccl is off" in details
    if refusing is not None:  # the real backend on a machine without CUDA
        code, details = await call(refusing, "OpenNcclGroup", opening(replica_id="r"))
        assert code == grpc.StatusCode.UNAVAILABLE and "no CUDA device" in details
    run = loopback.store.run_id
    for bad in (opening(replica_id=""), opening(replica_id="r", run_id="other")):
        assert (await call(loopback, "OpenNcclGroup", bad))[0] == grpc.StatusCode.INVALID_ARGUMENT
    ghost = await call(loopback, "OpenNcclGroup", opening(replica_id="ghost", run_id=run))  # never watches
    assert ghost.group_id >= 1
    expired = counter(nccl_sender.GROUP_EVENTS, "expired")
    async with grpc.aio.insecure_channel(loopback.target) as channel:  # "r" watches meanwhile
        watch = weights_pb2_grpc.WeightServiceStub(channel).WatchVersions(
            weights_pb2.WatchVersionsRequest(replica_id="r", run_id=run, current_version=1)
        )
        await watch.initial_metadata()
        group = await call(loopback, "OpenNcclGroup", opening(replica_id="r", run_id=run))
        assert counter(nccl_sender.GROUP_EVENTS, "expired") == expired + 1  # the full table let "ghost" go
        assert (group.world_size, group.rank, group.chunk_bytes) == (2, 1, PIECE_BYTES)
        assert len(group.nccl_unique_id) == 128
        code, details = await call(loopback, "OpenNcclGroup", opening(replica_id="s", run_id=run))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # max_groups=1, held by a watching replica
        watch.cancel()

    sending = weights_pb2.SendNcclRequest
    unknown_group = sending(replica_id="r", group_id=group.group_id + 1, version=1, run_id=run)
    unknown_version = sending(replica_id="r", group_id=group.group_id, version=9, run_id=run)
    for bad in (unknown_group, unknown_version):
        assert (await call(loopback, "SendNccl", bad))[0] == grpc.StatusCode.NOT_FOUND


async def test_replica_follows_versions_over_nccl(learners, engine, tiny_policy_dir) -> None:
    base = base_weights(tiny_policy_dir)
    learner = await learners(LoopbackNccl())
    fetcher = fetcher_of(learner.target)
    subscriber = WeightSubscriber(engine, fetcher)
    opened = counter(nccl_sender.GROUP_EVENTS, "opened")
    sent = nccl_sender.NCCL_SENT_BYTES._value.get()
    try:
        for version in (1, 2):
            published = versions(base, version)
            learner.store.publish(version, published)
            assert await subscriber.sync_once(10) == version
            held = dict(engine._model.named_parameters())
            for name, tensor in published:
                assert torch.equal(held[name].detach(), tensor), name
            states = await learner.store.wait_for_replicas(version, ["replica-1"], timeout=10)
            assert states["replica-1"].version == version  # confirmed: the transfer counted in full
    finally:
        await subscriber.stop()
    assert counter(nccl_sender.GROUP_EVENTS, "opened") == opened + 1  # one group for both versions
    total = learner.store.get(2).info.total_bytes
    assert nccl_sender.NCCL_SENT_BYTES._value.get() == sent + 2 * total
    assert learner.fetched_chunks == []  # nothing through FetchWeights


async def test_rendezvous_that_never_completes_falls_back_to_the_bulk_port(learners, tiny_policy_dir) -> None:
    base = base_weights(tiny_policy_dir)
    learner = await learners(LoopbackNccl(), setup_timeout_s=SHORT_SETUP_S)
    silent = LoopbackNccl(joins=False)  # this replica never joins
    fetcher = fetcher_of(learner.target, silent)
    fallbacks = counter(nccl.NCCL_FALLBACKS, "setup_timeout")
    dropped = counter(nccl_sender.GROUP_EVENTS, "setup_timeout")
    try:
        published = versions(base, 1)
        learner.store.publish(1, published)
        announced = await fetcher.current(0)
        began = time.monotonic()
        fetched = await fetcher.download(announced)
        assert time.monotonic() - began < SHORT_SETUP_S + 3
        assert fetched.buffer is not fetcher.transports[weights_pb2.TRANSPORT_NCCL]._device_buffer
        assert [name for name, _ in fetched.tensors()] == [name for name, _ in published]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fetched.tensors(), published, strict=True))
        assert counter(nccl.NCCL_FALLBACKS, "setup_timeout") == fallbacks + 1
        for _ in range(100):  # the learner's watcher drops its end too
            if counter(nccl_sender.GROUP_EVENTS, "setup_timeout") == dropped + 1:
                break
            await asyncio.sleep(0.05)
        assert counter(nccl_sender.GROUP_EVENTS, "setup_timeout") == dropped + 1
        assert not learner.nccl._groups
        # NCCL rests after a failed setup: the next download goes straight to the bulk port
        transport = fetcher.transports[weights_pb2.TRANSPORT_NCCL]
        assert transport.resumes_at > time.monotonic()
        await fetcher.download(announced)
        assert counter(nccl.NCCL_FALLBACKS, "setup_timeout") == fallbacks + 1
    finally:
        silent.released.set()
        await fetcher.close()


async def test_learner_refusing_nccl_falls_back(learners, tiny_policy_dir) -> None:
    """A learner that announces NCCL but cannot open a group (its GPU is gone): the replica
    receives over the bulk port, or FetchWeights without one."""
    base = base_weights(tiny_policy_dir)
    for bulk in (True, False):
        learner = await learners(LoopbackNccl(), bulk=bulk)
        learner.nccl.backend = _Unavailable()
        learner.store.publish(1, versions(base, 1))
        refused = counter(nccl.NCCL_FALLBACKS, "refused")
        async with fetcher_of(learner.target, bulk=bulk) as fetcher:
            fetched = await fetcher.download(await fetcher.current(0))
        assert fetched.sha256 == learner.store.get(1).info.sha256
        assert counter(nccl.NCCL_FALLBACKS, "refused") == refused + 1


class _Unavailable(LoopbackNccl):
    def unavailable(self) -> str | None:
        return "the GPU fell off the bus"


async def test_learner_never_hangs_on_a_dead_peer(learners, tiny_policy_dir) -> None:
    """The replica joined, then stopped: the learner's send ends within its deadline with
    DEADLINE_EXCEEDED, the group is destroyed, and its id is unknown afterwards."""
    learner = await learners(LoopbackNccl(stall=True), setup_timeout_s=SHORT_SETUP_S)
    learner.store.publish(1, versions(base_weights(tiny_policy_dir), 1))
    run = learner.store.run_id
    async with grpc.aio.insecure_channel(learner.target) as channel:
        stub = weights_pb2_grpc.WeightServiceStub(channel)
        group = await stub.OpenNcclGroup(weights_pb2.OpenNcclGroupRequest(replica_id="r", run_id=run))
        peer = threading.Thread(
            target=LoopbackNccl().join, args=(group.nccl_unique_id, 1, 2, torch.device("cpu")), daemon=True
        )
        peer.start()
        request = weights_pb2.SendNcclRequest(replica_id="r", group_id=group.group_id, version=1, run_id=run)
        timeouts = counter(nccl_sender.GROUP_EVENTS, "transfer_timeout")
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.SendNccl(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - began < SHORT_SETUP_S + 3  # the deadline: setup + bytes at the min rate
        assert counter(nccl_sender.GROUP_EVENTS, "transfer_timeout") == timeouts + 1
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.SendNccl(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bytes_that_fail_the_sha256_fall_back_and_a_reopen_replaces_the_group(
    learners, tiny_policy_dir
) -> None:
    learner = await learners(LoopbackNccl())
    published = versions(base_weights(tiny_policy_dir), 1)
    learner.store.publish(1, published)
    mismatches = counter(nccl.NCCL_FALLBACKS, "sha256")
    replaced = counter(nccl_sender.GROUP_EVENTS, "replaced")
    async with fetcher_of(learner.target, LoopbackNccl(corrupt=True)) as fetcher:
        fetched = await fetcher.download(await fetcher.current(0))
        # the bulk port's buffer: the bytes received over NCCL were refused
        assert fetched.buffer is not fetcher.transports[weights_pb2.TRANSPORT_NCCL]._device_buffer
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fetched.tensors(), published, strict=True))
    assert counter(nccl.NCCL_FALLBACKS, "sha256") == mismatches + 1
    # the same replica id again (a restarted replica): its new group replaces the old one
    async with fetcher_of(learner.target) as fetcher:
        fetched = await fetcher.download(await fetcher.current(0))
        assert fetched.buffer is fetcher.transports[weights_pb2.TRANSPORT_NCCL]._device_buffer  # over NCCL
    assert counter(nccl_sender.GROUP_EVENTS, "replaced") == replaced + 1
    assert list(learner.nccl._groups) == ["replica-1"]


async def test_the_learner_offers_nccl_only_where_it_can_run(tiny_policy_dir, caplog) -> None:
    """cli/learner.py: learner.weights.nccl on a machine without CUDA is warned and not announced."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    weights = WeightServerSettings(nccl=True)
    store, bulk = weight_store(weights)
    try:
        assert weight_servicer(store, weights).nccl is None
        info = store.publish(1, versions(base_weights(tiny_policy_dir), 1))
        assert info.transport == weights_pb2.TRANSPORT_TCP_BULK
        assert "learner.weights.nccl: no CUDA device" in caplog.text
    finally:
        store.close()
        bulk.close()
