"""Admission before work (issue 12, point 5), on real services on loopback:

- a call that admission refuses is refused before its request is parsed, and the request
  memory a configuration allows is stated and checked (ServerSettings.request_memory_bytes);
- the PRM service tokenises off its event loop: health checks answer promptly while it is
  flooded with long texts;
- the verify service bounds the wait for a grading worker by the call's deadline and by
  max_queue_wait_seconds.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from puremesh.prm.v1 import prm_pb2, prm_pb2_grpc
from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import ServerSettings
from puremesh.services.prm.app import prm_service
from puremesh.services.prm.settings import PrmSettings
from puremesh.services.verify.app import verify_service
from puremesh.services.verify.settings import VerifySettings
from puremesh.verify.v1 import verify_pb2, verify_pb2_grpc

CALLS_PER_CLIENT = 1
# Measured 20-30 ms now on 2 cores; before the fix a health check took 3-12 s here.
HEALTH_LIMIT_S = 1.0
HANGS = "so \\boxed{9^{9^{9}}}"  # sympy starts computing it in full: runs to the item timeout


def test_the_request_memory_a_configuration_allows_is_checked() -> None:
    assert ServerSettings().grpc_concurrency * ServerSettings().max_request_bytes <= (
        ServerSettings().request_memory_bytes
    )
    with pytest.raises(ValidationError, match="exceeds request_memory_bytes"):
        ServerSettings(max_concurrent_rpcs=512, max_request_bytes=64 << 20)  # 32 GiB of requests


async def start(definition, **server) -> ServiceHost:
    host = ServiceHost([definition], ServerSettings(metrics_port=None, **server))
    await host.start()
    return host


async def health_latencies(target: str, stop: asyncio.Event) -> list[float]:
    """Health Check round trips every 50 ms until `stop` (each must answer SERVING)."""
    latencies = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            began = time.perf_counter()
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
            latencies.append(time.perf_counter() - began)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.sleep(0.05)
    return latencies


async def test_prm_health_answers_promptly_under_a_flood_of_long_texts(tiny_prm_dir) -> None:
    settings = PrmSettings(model_path=str(tiny_prm_dir), max_text_chars=400_000)
    host = await start(prm_service(settings), max_concurrent_rpcs=8)
    text = "12 + 34 = 46\n\n" * 16_000  # 224k characters per response, 2 per item
    request = prm_pb2.ScoreStepsRequest(
        items=[prm_pb2.ScoreItem(prompt_text="What is 12 + 34?", response_text=text) for _ in range(4)]
    )
    codes: list[grpc.StatusCode] = []
    try:
        async with grpc.aio.insecure_channel(
            host.target, options=[("grpc.max_send_message_length", 8 << 20)]
        ) as channel:
            stub = prm_pb2_grpc.PrmServiceStub(channel)

            async def client() -> None:
                for _ in range(CALLS_PER_CLIENT):
                    try:
                        await stub.ScoreSteps(request, timeout=60)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as error:
                        codes.append(error.code())

            stop = asyncio.Event()
            probe = asyncio.create_task(health_latencies(host.target, stop))
            await asyncio.gather(*(client() for _ in range(16)))  # twice the calls admitted at once
            stop.set()
            latencies = await probe
    finally:
        await host.drain(grace=1)
    assert (
        set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        and len(codes) == 16 * CALLS_PER_CLIENT
    )
    assert grpc.StatusCode.OK in codes
    print(f"slowest health check {max(latencies):.3f} s of {len(latencies)}")
    assert len(latencies) >= 10 and max(latencies) < HEALTH_LIMIT_S, (
        f"slowest health check {max(latencies):.2f} s"
    )


class _Blocking(verify_pb2_grpc.VerifyServiceServicer):
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.parsed = 0

    async def Verify(self, request, context):
        self.parsed += 1
        await self.release.wait()
        return verify_pb2.VerifyResponse()


async def test_a_refused_call_is_not_parsed() -> None:
    from puremesh.rpc.server import ServiceDefinition

    servicer = _Blocking()
    definition = ServiceDefinition(
        "verify",
        "puremesh.verify.v1.VerifyService",
        servicer,
        verify_pb2_grpc.add_VerifyServiceServicer_to_server,
    )
    host = await start(definition, max_concurrent_rpcs=2)
    await host.load()
    try:
        async with grpc.aio.insecure_channel(host.target) as channel:
            stub = verify_pb2_grpc.VerifyServiceStub(channel)
            held = [
                asyncio.ensure_future(stub.Verify(verify_pb2.VerifyRequest(), timeout=10)) for _ in range(2)
            ]
            while host.in_flight < 2:
                await asyncio.sleep(0.01)
            raw = channel.unary_unary("/puremesh.verify.v1.VerifyService/Verify")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw(b"\x0a\x02\xff\xfe-not-a-message", timeout=5)  # malformed: but refused first
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            servicer.release.set()
            await asyncio.gather(*held)
    finally:
        await host.drain(grace=1)
    assert servicer.parsed == 2


async def test_the_wait_for_a_grading_worker_is_bounded() -> None:
    settings = VerifySettings(
        workers=1,
        item_timeout_seconds=5.0,
        server=ServerSettings(metrics_port=None, max_queue_wait_seconds=0.5),
    )
    host = ServiceHost([verify_service(settings)], settings.server)
    await host.start()
    try:
        async with grpc.aio.insecure_channel(host.target) as channel:
            stub = verify_pb2_grpc.VerifyServiceStub(channel)
            item = verify_pb2.VerifyItem
            busy = asyncio.ensure_future(
                stub.Verify(
                    verify_pb2.VerifyRequest(items=[item(response=HANGS, ground_truth="1")]), timeout=30
                )
            )
            await asyncio.sleep(0.3)  # the only worker is busy for 2 s
            waiting = verify_pb2.VerifyRequest(items=[item(response="\\boxed{2}", ground_truth="2")])
            for deadline, code in (
                (0.3, grpc.StatusCode.DEADLINE_EXCEEDED),
                (30, grpc.StatusCode.RESOURCE_EXHAUSTED),
            ):
                began = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Verify(waiting, timeout=deadline)
                assert info.value.code() == code and time.monotonic() - began < 2
            reply = await busy
            assert reply.results[0].verdict == verify_pb2.VERDICT_TIMEOUT
    finally:
        await host.drain(grace=1)
