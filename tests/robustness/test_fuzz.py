"""Fuzzing every RPC of every service and of the WeightService (issue 12, point 7), on loopback.

The rollout (hf engine), PRM and verify services and the learner's WeightService (with one
published version) run in one ServiceHost on port 0, with small request limits so that valid
calls stay cheap. For each RPC, CASES requests generated from its descriptor (fuzzwire.py, a
fixed seed per RPC) go out as raw bytes, 16 at a time:

- a request protobuf parses (well-formed) never gets UNKNOWN or INTERNAL;
- one it cannot parse gets INVALID_ARGUMENT (or RESOURCE_EXHAUSTED when it is refused unread);
- nothing crashes, and every service's health is SERVING afterwards.
"""

from __future__ import annotations

import asyncio
import collections

import grpc
import pytest
import pytest_asyncio
import torch
from fuzzwire import Generator
from grpc_health.v1 import health_pb2, health_pb2_grpc

from puremesh.common.v1 import common_pb2
from puremesh.prm.v1 import prm_pb2
from puremesh.rollout.v1 import rollout_pb2
from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import ServerSettings
from puremesh.services.prm.app import prm_service
from puremesh.services.prm.settings import PrmSettings
from puremesh.services.rollout.app import rollout_service
from puremesh.services.rollout.settings import RolloutSettings
from puremesh.services.verify.app import verify_service
from puremesh.services.verify.settings import VerifySettings
from puremesh.verify.v1 import verify_pb2
from puremesh.weights.v1 import weights_pb2
from puremesh.weightsync.servicer import WeightServicer, weight_service
from puremesh.weightsync.store import WeightStore

CASES = 1000
CONCURRENCY = 16
STREAM_MESSAGES = 8
STREAM_WAIT_S = 0.3
CALL_TIMEOUT_S = 20
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
UNPARSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
RUN_ID = "fuzz-run"
WEIGHTS = [("w", torch.arange(8192, dtype=torch.float32))]
# (full method, request message, server streaming, a valid request to mutate)
RPCS = [
    (
        "/puremesh.rollout.v1.RolloutService/Generate",
        rollout_pb2.GenerateRequest,
        True,
        rollout_pb2.GenerateRequest(
            prompt_token_ids=common_pb2.TokenIds(ids=[5, 6, 7]),
            sampling=rollout_pb2.SamplingParams(n=2, temperature=1.0, max_new_tokens=4),
        ),
    ),
    ("/puremesh.rollout.v1.RolloutService/GetStatus", rollout_pb2.GetStatusRequest, False, None),
    (
        "/puremesh.prm.v1.PrmService/ScoreSteps",
        prm_pb2.ScoreStepsRequest,
        False,
        prm_pb2.ScoreStepsRequest(
            items=[
                prm_pb2.ScoreItem(prompt_text="What is 1 + 1?", response_text="1 + 1 = 2\n\nSo \\boxed{2}")
            ]
        ),
    ),
    (
        "/puremesh.verify.v1.VerifyService/Verify",
        verify_pb2.VerifyRequest,
        False,
        verify_pb2.VerifyRequest(items=[verify_pb2.VerifyItem(response="so \\boxed{2}", ground_truth="2")]),
    ),
    (
        "/puremesh.weights.v1.WeightService/WatchVersions",
        weights_pb2.WatchVersionsRequest,
        True,
        weights_pb2.WatchVersionsRequest(replica_id="fuzz", run_id=RUN_ID),
    ),
    (
        "/puremesh.weights.v1.WeightService/FetchWeights",
        weights_pb2.FetchWeightsRequest,
        True,
        weights_pb2.FetchWeightsRequest(version=1, replica_id="fuzz"),
    ),
    (
        "/puremesh.weights.v1.WeightService/DescribeVersion",
        weights_pb2.DescribeVersionRequest,
        False,
        weights_pb2.DescribeVersionRequest(version=1, replica_id="fuzz"),
    ),
    (
        "/puremesh.weights.v1.WeightService/ConfirmVersion",
        weights_pb2.ConfirmVersionRequest,
        False,
        weights_pb2.ConfirmVersionRequest(replica_id="fuzz", run_id=RUN_ID, version=1),  # + the SHA-256
    ),
]
SERVICES = sorted({method.split("/")[1] for method, *_ in RPCS})
TALLY: dict[str, collections.Counter] = {}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tiny_policy_dir, tiny_prm_dir):
    server = ServerSettings(metrics_port=None, max_queue_wait_seconds=5.0)
    store = WeightStore(chunk_bytes=16 << 10, bulk_chunk_bytes=16 << 10, run_id=RUN_ID)
    store.publish(1, WEIGHTS)
    definitions = [
        rollout_service(
            RolloutSettings(
                model_path=str(tiny_policy_dir), dtype="float32", max_n=4, max_new_tokens=8, server=server
            )
        ),
        prm_service(
            PrmSettings(model_path=str(tiny_prm_dir), max_items=8, max_text_chars=8192, server=server)
        ),
        verify_service(VerifySettings(workers=1, item_timeout_seconds=1.0, max_items=16, server=server)),
        weight_service(WeightServicer(store)),
    ]
    host = ServiceHost(definitions, server)
    await host.start()
    yield host
    store.close()
    await host.drain(grace=1)
    for method, tally in TALLY.items():
        print(
            f"\nfuzz {method.rsplit('/', 1)[1]}: {sum(tally.values())} cases, {dict(sorted(tally.items()))}"
        )


async def send(
    channel: grpc.aio.Channel, method: str, data: bytes, streaming: bool, well_formed: bool
) -> grpc.StatusCode:
    """The call's status; a stream of a well-formed request is read for a few messages (an open
    WatchVersions stream sends what it has at once), then cancelled: its status so far is OK. A
    request that does not parse must end its stream with an error, so that stream is waited for
    (up to the call's deadline): a busy machine's slow refusal is not mistaken for an OK."""
    wait = STREAM_WAIT_S if well_formed else CALL_TIMEOUT_S
    try:
        if not streaming:
            await channel.unary_unary(method)(data, timeout=CALL_TIMEOUT_S)
            return grpc.StatusCode.OK
        call = channel.unary_stream(method)(data, timeout=CALL_TIMEOUT_S)
        for _ in range(STREAM_MESSAGES):
            try:
                message = await asyncio.wait_for(call.read(), wait)
            except TimeoutError:
                break
            if message is grpc.aio.EOF:
                return await call.code()
        call.cancel()
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        return error.code()


def parses(message_type, data: bytes) -> bool:
    try:
        message_type.FromString(data)
    except Exception:
        return False
    return True


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("method", "message_type", "streaming", "seed"), RPCS, ids=[m.rsplit("/", 1)[1] for m, *_ in RPCS]
)
async def test_no_generated_request_gets_unknown_or_internal(
    mesh, method, message_type, streaming, seed
) -> None:
    if isinstance(seed, weights_pb2.ConfirmVersionRequest):
        seed.sha256 = mesh.services["puremesh.weights.v1.WeightService"].servicer.store.get(1).info.sha256
    generator = Generator(seed=sum(map(ord, method)))  # fixed per RPC
    valid = seed.SerializeToString() if seed is not None else b""
    cases = [generator.case(message_type.DESCRIPTOR, valid) for _ in range(CASES)]
    tally: collections.Counter = collections.Counter()
    wrong: list[tuple[str, bool, bytes]] = []
    gate = asyncio.Semaphore(CONCURRENCY)
    async with grpc.aio.insecure_channel(
        mesh.target,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    ) as channel:

        async def one(data: bytes) -> None:
            async with gate:
                well_formed = parses(message_type, data)
                code = await send(channel, method, data, streaming, well_formed)
            tally[(code.name, well_formed)] += 1
            if code in NEVER or (not well_formed and code not in UNPARSED):
                wrong.append((code.name, well_formed, data[:200]))

        await asyncio.gather(*(one(case.data) for case in cases))
    TALLY[method] = tally
    assert sum(tally.values()) == CASES
    assert sum(n for (_, ok), n in tally.items() if ok) >= CASES // 2, tally  # mostly messages
    assert not wrong, f"{len(wrong)} bad answers, e.g. {wrong[:3]}; all: {dict(tally)}"


@pytest.mark.asyncio(loop_scope="module")
async def test_every_service_serves_after_the_fuzzing(mesh) -> None:
    assert len(TALLY) == len(RPCS), "runs after the fuzz tests"
    async with grpc.aio.insecure_channel(mesh.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in SERVICES:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    assert mesh.in_flight == 0
