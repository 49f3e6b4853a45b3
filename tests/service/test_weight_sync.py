"""Weight sync over real servers on port 0: the learner's weight side (weightsync.store,
servicer, bulk_server) in a ServiceHost, with or without its bulk data plane, rollout replicas
(hf engine, tiny policy) following it with a WeightSubscriber.

Tests may import both sides; the learner is wired here (weightsync_learner.py) as the
composition root (cli/learner.py) wires it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import types
from collections.abc import Callable

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForCausalLM
from weightsync_learner import Learner
from weightsync_learner import start_learner as start

from puremesh.rollout.v1 import rollout_pb2, rollout_pb2_grpc
from puremesh.rpc.client import RetryPolicy
from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import ServerSettings
from puremesh.services.rollout.app import rollout_service
from puremesh.services.rollout.engine import SamplingSpec
from puremesh.services.rollout.hf_engine import HfEngine
from puremesh.services.rollout.settings import RolloutSettings
from puremesh.weights.v1 import weights_pb2, weights_pb2_grpc
from puremesh.weightsync import tcp_bulk, transport
from puremesh.weightsync.fetcher import WeightFetcher
from puremesh.weightsync.servicer import announcement
from puremesh.weightsync.subscriber import WeightSubscriber
from puremesh.weightsync.transport import Announcement, FetchOptions

CHUNK_BYTES = 64 << 10  # the tiny policy (~2 MB) spans a few dozen chunks
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.02, max_backoff_s=0.2)
PROMPT = "Question: Tom has 5 apples. Tom gets 3 more. How many apples does Tom have now?\n"
GREEDY = SamplingSpec(n=1, temperature=0.0, max_new_tokens=16)


@pytest.fixture
async def start_learner():
    started: list[Learner] = []

    async def start_one(port: int = 0, bulk: bool = False) -> Learner:
        learner = await start(port=port, chunk_bytes=CHUNK_BYTES, bulk=bulk)
        started.append(learner)
        return learner

    yield start_one
    for learner in started:
        await learner.stop()


def subscriber_of(engine, target: str, replica_id: str = "replica-1") -> WeightSubscriber:
    return WeightSubscriber(engine, WeightFetcher(target, replica_id, FetchOptions(retry=FAST_RETRY)))


@pytest.fixture(scope="module")
def reference_model(tiny_policy_dir):
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_policy_dir), local_files_only=True, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def policy_versions(reference_model) -> Callable[[int], list[tuple[str, torch.Tensor]]]:
    """version -> the policy's weights perturbed with noise seeded by the version."""
    base = [(name, p.detach().clone()) for name, p in reference_model.named_parameters()]

    def weights(version: int) -> list[tuple[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(version)
        return [(name, t + 0.1 * torch.randn(t.shape, generator=generator)) for name, t in base]

    return weights


@pytest.fixture
async def engine(tiny_policy_dir):
    engine = HfEngine(tiny_policy_dir, dtype="float32", max_model_len=256)
    await engine.start()
    yield engine
    await engine.close()


async def greedy(engine) -> list[int]:
    [sample] = [s async for s in engine.generate(engine.tokenize(PROMPT), GREEDY)]
    return sample.token_ids


def transformers_greedy(model, engine, weights: list[tuple[str, torch.Tensor]]) -> list[int]:
    """Greedy tokens of the transformers model holding `weights` (restored afterwards)."""
    params = dict(model.named_parameters())
    saved = {name: p.detach().clone() for name, p in params.items()}
    prompt = torch.tensor([engine.tokenize(PROMPT)])
    try:
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=GREEDY.max_new_tokens,
                eos_token_id=engine.eos_token_id,
                pad_token_id=engine.eos_token_id,
            )
    finally:
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
    return out[0, prompt.shape[1] :].tolist()


async def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_replica_follows_versions_and_matches_transformers(
    start_learner, engine, reference_model, policy_versions
) -> None:
    learner = await start_learner()
    subscriber = subscriber_of(engine, learner.target)
    swapped: list[int] = []
    subscriber.on_version = swapped.append
    before = await greedy(engine)
    subscriber.start()
    await wait_until(lambda: learner.store.replicas.get("replica-1", None) is not None)
    assert learner.store.replicas["replica-1"].version == 0
    assert learner.store.replicas["replica-1"].watching

    learner.store.publish(1, policy_versions(1))
    learner.store.publish(2, policy_versions(2))
    await wait_until(lambda: engine.policy_version == 2)
    after = await greedy(engine)
    assert after == transformers_greedy(reference_model, engine, policy_versions(2))
    assert after != before
    assert swapped[-1] == 2 and len(swapped) <= 2  # the newest only, when both came during a swap

    states = await learner.store.wait_for_replicas(2, ["replica-1"], timeout=10)
    assert states["replica-1"].version == 2 and states["replica-1"].watching
    assert (await learner.store.wait_for_replicas(2, 1, timeout=10)).keys() == {"replica-1"}
    with pytest.raises(TimeoutError, match="replica-2"):
        await learner.store.wait_for_replicas(2, ["replica-1", "replica-2"], timeout=0.1)

    learner.store.publish(3, policy_versions(3))
    await learner.store.wait_for_replicas(3, ["replica-1"], timeout=10)
    await wait_until(lambda: engine.policy_version == 3)
    await subscriber.stop()
    await wait_until(lambda: not learner.store.replicas["replica-1"].watching)
    assert learner.store.replicas["replica-1"].version == 3


async def test_corrupted_chunk_is_refetched_and_the_load_succeeds(
    start_learner, engine, reference_model, policy_versions, monkeypatch
) -> None:
    learner = await start_learner()
    produce = learner.servicer.chunk
    sent: list[int] = []

    def flip_once(stored, index, chunk_bytes, with_manifest):
        chunk = produce(stored, index, chunk_bytes, with_manifest)
        sent.append(index)
        if index == 3 and sent.count(3) == 1:
            data = bytearray(chunk.data)
            data[len(data) // 2] ^= 0x01
            chunk = dataclasses.replace(chunk, data=bytes(data))
        return chunk

    monkeypatch.setattr(learner.servicer, "chunk", flip_once)
    info = learner.store.publish(1, policy_versions(1))
    retries = transport.CHUNK_RETRIES._value.get()
    subscriber = subscriber_of(engine, learner.target)
    try:
        assert await subscriber.fetch(Announcement.from_proto(announcement(info))) == 1
    finally:
        await subscriber.stop()
    assert sent == [*range(info.total_chunks), 3]  # all chunks, then only the bad one
    assert transport.CHUNK_RETRIES._value.get() - retries == 1
    assert await greedy(engine) == transformers_greedy(reference_model, engine, policy_versions(1))


async def status_and_health(target: str) -> list[tuple[int, bool]]:
    """(policy_version, SERVING) observed at the replica until it reports SERVING."""
    seen = []
    async with grpc.aio.insecure_channel(target) as channel:
        rollout = rollout_pb2_grpc.RolloutServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        async with asyncio.timeout(60):
            while not seen or not seen[-1][1]:
                serving = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                status = await rollout.GetStatus(rollout_pb2.GetStatusRequest(), timeout=5)
                seen.append((status.policy_version, serving.status == health_pb2.HealthCheckResponse.SERVING))
                await asyncio.sleep(0.01)
    return seen


async def start_replica(tiny_policy_dir, learner: Learner, replica_id: str, **settings) -> ServiceHost:
    config = RolloutSettings(
        model_path=str(tiny_policy_dir),
        dtype="float32",
        replica_id=replica_id,
        weights_target=learner.target,
        server=ServerSettings(metrics_port=None),
        **settings,
    )
    host = ServiceHost([rollout_service(config)], config.server)
    await host.start(wait_ready=False)
    return host


async def test_late_replica_pulls_the_current_version_before_serving(
    start_learner, tiny_policy_dir, policy_versions
) -> None:
    learner = await start_learner()
    learner.store.publish(1, policy_versions(1))
    learner.store.publish(2, policy_versions(2))
    host = await start_replica(tiny_policy_dir, learner, "late")
    try:
        loading = asyncio.create_task(host.load())
        seen = await status_and_health(host.target)
        await loading
        assert seen[-1] == (2, True)
        assert all(version == 2 for version, serving in seen if serving)
        assert learner.store.replicas["late"].version == 2
        # then it follows the learner
        learner.store.publish(3, policy_versions(3))
        await learner.store.wait_for_replicas(3, ["late"], timeout=20)
        engine = host.services["puremesh.rollout.v1.RolloutService"].servicer.engine
        await wait_until(lambda: engine.policy_version == 3)
    finally:
        await host.drain(grace=1)


async def test_replica_of_a_learner_that_has_published_nothing_starts_at_version_zero(
    start_learner, tiny_policy_dir, policy_versions
) -> None:
    learner = await start_learner()
    host = await start_replica(tiny_policy_dir, learner, "early")
    try:
        await host.load()
        engine = host.services["puremesh.rollout.v1.RolloutService"].servicer.engine
        assert host.ready and engine.policy_version == 0
        learner.store.publish(1, policy_versions(1))
        await wait_until(lambda: engine.policy_version == 1)
    finally:
        await host.drain(grace=1)


async def test_sync_once_gives_up_on_an_unreachable_learner(unused_tcp_port) -> None:
    engine = types.SimpleNamespace(policy_version=0)
    subscriber = subscriber_of(engine, f"127.0.0.1:{unused_tcp_port}")
    try:
        with pytest.raises(TimeoutError, match="could not pull the current version"):
            await subscriber.sync_once(timeout=0.5)
    finally:
        await subscriber.stop()


async def test_subscriber_reconnects_to_a_restarted_learner(start_learner, engine, policy_versions) -> None:
    first = await start_learner()
    port = first.host.port
    subscriber = subscriber_of(engine, first.target)
    subscriber.start()
    try:
        first.store.publish(1, policy_versions(1))
        await wait_until(lambda: engine.policy_version == 1)
        await first.stop()
        await asyncio.sleep(0.3)  # the subscriber finds nobody for a while
        second = await start_learner(port=port)
        await wait_until(lambda: second.store.replicas.get("replica-1") is not None)
        state = second.store.replicas["replica-1"]
        assert state.reported == 1 and state.version == 0  # what it reports is never trusted
        second.store.publish(2, policy_versions(2))
        await wait_until(lambda: engine.policy_version == 2)
        assert (await second.store.wait_for_replicas(2, 1, timeout=10)).keys() == {"replica-1"}
    finally:
        await subscriber.stop()


async def test_status_codes_and_chunking_via_raw_stubs(start_learner) -> None:
    learner = await start_learner()
    weights = [("a", torch.arange(1000, dtype=torch.float32)), ("b", torch.ones(3, dtype=torch.bfloat16))]
    async with grpc.aio.insecure_channel(learner.target) as channel:
        stub = weights_pb2_grpc.WeightServiceStub(channel)

        async def fetch(**fields) -> list[weights_pb2.WeightChunk]:
            request = weights_pb2.FetchWeightsRequest(**{"replica_id": "raw", **fields})
            return [chunk async for chunk in stub.FetchWeights(request, timeout=10)]

        async def code_of(call) -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [m async for m in call]
            return info.value.code()

        watch = weights_pb2.WatchVersionsRequest
        assert await code_of(stub.WatchVersions(watch(current_version=0), timeout=5)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert await code_of(stub.FetchWeights(weights_pb2.FetchWeightsRequest(version=1), timeout=5)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert await code_of(_fetch_call(stub, version=1)) == grpc.StatusCode.NOT_FOUND

        # a watcher that lags behind several publishes hears only the newest
        stream = stub.WatchVersions(watch(replica_id="raw", current_version=0), timeout=10)
        info = learner.store.publish(1, weights)
        first = await stream.read()
        assert first == announcement(info) and first.total_bytes == 4006 and first.total_chunks == 1
        learner.store.publish(2, weights)
        learner.store.publish(3, weights)
        assert (await stream.read()).version == 3
        stream.cancel()
        # announced at once when the replica is behind; nothing when it is current
        stream = stub.WatchVersions(watch(replica_id="raw", current_version=2), timeout=10)
        assert (await stream.read()).version == 3
        stream.cancel()
        stream = stub.WatchVersions(watch(replica_id="raw", current_version=3), timeout=10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.read(), 0.2)
        stream.cancel()

        chunks = await fetch(version=3, max_chunk_bytes=1000)
        assert [c.index for c in chunks] == [0, 1, 2, 3, 4] and {c.total_chunks for c in chunks} == {5}
        assert [len(c.data) for c in chunks] == [1000, 1000, 1000, 1000, 6]
        assert [c.offset for c in chunks] == [0, 1000, 2000, 3000, 4000]
        assert [len(c.manifest) for c in chunks] == [2, 0, 0, 0, 0]
        assert chunks[0].manifest[1] == weights_pb2.TensorSpec(
            name="b", dtype="bfloat16", shape=[3], offset=4000, nbytes=6
        )
        subset = await fetch(version=3, max_chunk_bytes=1000, chunk_indices=[4, 1, 4])
        assert [c.index for c in subset] == [1, 4] and len(subset[0].manifest) == 2
        assert [c.data for c in subset] == [chunks[1].data, chunks[4].data]
        clamped = await fetch(version=3, max_chunk_bytes=1 << 30)
        assert len(clamped) == 1 and clamped[0].total_chunks == 1
        assert await code_of(_fetch_call(stub, version=3, max_chunk_bytes=1000, chunk_indices=[5])) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert await code_of(_fetch_call(stub, version=1)) == grpc.StatusCode.NOT_FOUND  # evicted
        # a subscriber holds a version only once it confirms it after a complete transfer
        assert learner.store.replicas["raw"].version == 0
        confirm = weights_pb2.ConfirmVersionRequest
        sha = learner.store.get(3).info.sha256
        for bad in (
            confirm(replica_id="raw", version=3, sha256="0" * 64),  # not the version's SHA-256
            confirm(replica_id="raw", version=3, sha256=sha, run_id="another-run"),
            confirm(replica_id="made-up", version=3, sha256=sha),  # never subscribed
            confirm(version=3, sha256=sha),  # no replica id
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ConfirmVersion(bad, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ConfirmVersion(confirm(replica_id="raw", version=1, sha256=sha), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        reply = await stub.ConfirmVersion(confirm(replica_id="raw", version=3, sha256=sha), timeout=5)
        assert reply.current_version == 3 and learner.store.replicas["raw"].version == 3
        # a spoofed current_version beyond the representable range is refused
        assert await code_of(stub.WatchVersions(watch(replica_id="raw", current_version=2**64 - 1))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )

        learner.servicer.max_fetches = learner.servicer.max_watchers = 0  # overload
        assert await code_of(_fetch_call(stub, version=3)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await code_of(stub.WatchVersions(watch(replica_id="raw"), timeout=5)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        learner.store.close()
        assert await code_of(stub.WatchVersions(watch(replica_id="raw"), timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert await code_of(_fetch_call(stub, version=3)) == grpc.StatusCode.UNAVAILABLE


def _fetch_call(stub, **fields):
    return stub.FetchWeights(weights_pb2.FetchWeightsRequest(replica_id="raw", **fields), timeout=5)


async def test_replica_follows_versions_over_the_bulk_data_plane(
    start_learner, engine, reference_model, policy_versions
) -> None:
    learner = await start_learner(bulk=True)
    subscriber = subscriber_of(engine, learner.target)
    fallbacks = sum(s.value for m in tcp_bulk.BULK_FALLBACKS.collect() for s in m.samples)
    subscriber.start()
    try:
        learner.store.publish(1, policy_versions(1))
        await wait_until(lambda: engine.policy_version == 1)
        learner.store.publish(2, policy_versions(2))
        states = await learner.store.wait_for_replicas(2, ["replica-1"], timeout=20)
        assert states["replica-1"].version == 2  # recorded by the bulk server
        await wait_until(lambda: engine.policy_version == 2)
        assert await greedy(engine) == transformers_greedy(reference_model, engine, policy_versions(2))
    finally:
        await subscriber.stop()
    assert learner.fetched_chunks == []  # not one FetchWeights chunk
    assert sum(s.value for m in tcp_bulk.BULK_FALLBACKS.collect() for s in m.samples) == fallbacks


async def test_replica_settings_choose_the_path(start_learner, tiny_policy_dir, policy_versions) -> None:
    learner = await start_learner(bulk=True)
    info = learner.store.publish(1, policy_versions(1))
    for replica_id, bulk in (("bulk", True), ("grpc", False)):
        learner.fetched_chunks.clear()
        host = await start_replica(tiny_policy_dir, learner, replica_id, weights_bulk=bulk)
        try:
            await host.load()
            engine = host.services["puremesh.rollout.v1.RolloutService"].servicer.engine
            assert host.ready and engine.policy_version == 1
        finally:
            await host.drain(grace=1)
        assert learner.fetched_chunks == ([] if bulk else list(range(info.total_chunks))), replica_id


async def test_closed_bulk_port_falls_back_to_fetchweights(
    start_learner, engine, reference_model, policy_versions
) -> None:
    learner = await start_learner(bulk=True)
    subscriber = subscriber_of(engine, learner.target)
    before = tcp_bulk.BULK_FALLBACKS.labels("connect")._value.get()
    subscriber.start()
    try:
        learner.bulk.close()  # the announcements still offer the port
        info = learner.store.publish(1, policy_versions(1))
        await wait_until(lambda: engine.policy_version == 1)
        assert await greedy(engine) == transformers_greedy(reference_model, engine, policy_versions(1))
    finally:
        await subscriber.stop()
    assert learner.fetched_chunks == list(range(info.total_chunks))
    assert tcp_bulk.BULK_FALLBACKS.labels("connect")._value.get() - before == 1


async def test_watch_streams_end_unavailable_at_shutdown_without_tracebacks(start_learner, caplog) -> None:
    """The servicer raises NotReady inside WatchVersions after it sent announcements; the host's
    interceptor ends each stream with UNAVAILABLE, also for clients that cancel at that moment,
    and logs no error."""
    learner = await start_learner()
    learner.store.publish(1, [("w", torch.ones(4))])
    async with grpc.aio.insecure_channel(learner.target) as channel:
        stub = weights_pb2_grpc.WeightServiceStub(channel)
        streams = [
            stub.WatchVersions(weights_pb2.WatchVersionsRequest(replica_id=f"r{i}"), timeout=10)
            for i in range(8)
        ]
        for stream in streams:
            assert (await stream.read()).version == 1
        with caplog.at_level(logging.DEBUG):
            learner.store.close()
            for stream in streams[4:]:  # gone while the learner shuts down
                stream.cancel()
            for stream in streams[:4]:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stream.read()
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error.value.details() == "the learner is shutting down"
            await wait_until(lambda: learner.host.in_flight == 0)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []
    assert learner.servicer.watchers == 0
    assert not any(state.watching for state in learner.store.replicas.values())
