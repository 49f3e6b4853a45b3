"""puremesh.rpc, the shared RPC layer: a real grpc.aio server on port 0 hosting a test servicer
of a real v1 service.

The test servicer isolates the host's behaviour (readiness, status table, draining, limits,
metrics); the real verify/prm/rollout servicers are exercised through the same host in their own
test files.
"""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from puremesh.rpc import errors
from puremesh.rpc.client import RetryPolicy, RpcError, call_unary, open_channel
from puremesh.rpc.server import ServiceDefinition, ServiceHost
from puremesh.rpc.settings import ServerSettings
from puremesh.verify.v1 import verify_pb2, verify_pb2_grpc

FULL_NAME = "puremesh.verify.v1.VerifyService"


class ScriptedVerify(verify_pb2_grpc.VerifyServiceServicer):
    """Behaves according to the first item's response text."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def Verify(self, request, context):
        self.calls += 1
        command = request.items[0].response if request.items else ""
        if command.startswith("raise:"):
            raise getattr(errors, command.split(":", 1)[1])("scripted failure")
        if command == "bug":
            raise KeyError("oops")
        if command == "wait":
            await self.release.wait()
        return verify_pb2.VerifyResponse(results=[verify_pb2.VerifyResult(extracted_answer=command)])


async def start_host(servicer, loaded: asyncio.Event | None = None, **server):
    async def load():
        if loaded is not None:
            await loaded.wait()

    definition = ServiceDefinition(
        "scripted", FULL_NAME, servicer, verify_pb2_grpc.add_VerifyServiceServicer_to_server, start=load
    )
    host = ServiceHost([definition], ServerSettings(**server))
    await host.start(wait_ready=False)
    loader = asyncio.create_task(host.load())
    return host, loader


def request(text: str) -> verify_pb2.VerifyRequest:
    return verify_pb2.VerifyRequest(items=[verify_pb2.VerifyItem(response=text)])


async def health_status(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


async def test_readiness_gates_calls_and_health():
    loaded = asyncio.Event()
    host, loader = await start_host(ScriptedVerify(), loaded)
    async with open_channel(host.target) as channel:
        stub = verify_pb2_grpc.VerifyServiceStub(channel)
        assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Verify(request("x"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        loaded.set()
        await loader
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await health_status(channel, FULL_NAME) == health_pb2.HealthCheckResponse.SERVING
        assert (await stub.Verify(request("hello"), timeout=5)).results[0].extracted_answer == "hello"
    await host.drain(grace=1)


@pytest.mark.parametrize(
    "error", sorted(errors.STATUS_TABLE, key=lambda e: e.__name__), ids=lambda e: e.__name__
)
async def test_every_row_of_the_status_table(error):
    host, loader = await start_host(ScriptedVerify())
    await loader
    async with open_channel(host.target) as channel:
        stub = verify_pb2_grpc.VerifyServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Verify(request(f"raise:{error.__name__}"), timeout=5)
        assert info.value.code() == errors.STATUS_TABLE[error]
        assert "scripted failure" in info.value.details()
    await host.drain(grace=1)


async def test_unexpected_exception_is_internal_never_unknown():
    host, loader = await start_host(ScriptedVerify())
    await loader
    async with open_channel(host.target) as channel:
        stub = verify_pb2_grpc.VerifyServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Verify(request("bug"), timeout=5)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "KeyError" in info.value.details()
        # the service keeps serving
        assert (await stub.Verify(request("ok"), timeout=5)).results[0].extracted_answer == "ok"
    await host.drain(grace=1)


async def test_malformed_utf8_is_invalid_argument_and_oversized_is_resource_exhausted():
    host, loader = await start_host(ScriptedVerify(), max_request_bytes=4096)
    await loader
    async with open_channel(host.target) as channel:
        raw = channel.unary_unary(f"/{FULL_NAME}/Verify")  # bytes in, bytes out
        # field 1 (items), length 3: an item whose field 1 (response) holds the bytes FF FE
        bad_item = b"\x0a\x02\xff\xfe"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\x0a" + bytes([len(bad_item)]) + bad_item, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub = verify_pb2_grpc.VerifyServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Verify(request("x" * 10_000), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await host.drain(grace=1)


async def test_concurrency_limit_is_resource_exhausted():
    servicer = ScriptedVerify()
    host, loader = await start_host(servicer, max_concurrent_rpcs=2)
    await loader
    async with open_channel(host.target) as channel:
        stub = verify_pb2_grpc.VerifyServiceStub(channel)
        waiting = [asyncio.ensure_future(stub.Verify(request("wait"), timeout=10)) for _ in range(2)]
        while host.in_flight < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Verify(request("x"), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        servicer.release.set()
        assert all(r.results[0].extracted_answer == "wait" for r in await asyncio.gather(*waiting))
    await host.drain(grace=1)


async def test_graceful_drain_finishes_in_flight_and_refuses_new_calls():
    servicer = ScriptedVerify()
    host, loader = await start_host(servicer)
    await loader
    async with open_channel(host.target) as channel:
        stub = verify_pb2_grpc.VerifyServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.Verify(request("wait"), timeout=10))
        while host.in_flight < 1:
            await asyncio.sleep(0.01)
        draining = asyncio.create_task(host.drain(grace=10))
        await asyncio.sleep(0.1)
        assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Verify(request("late"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not draining.done()
        servicer.release.set()
        assert (await in_flight).results[0].extracted_answer == "wait"
        await asyncio.wait_for(draining, 5)


async def test_metrics_endpoint_counts_calls_by_code():
    host, loader = await start_host(ScriptedVerify())
    await loader
    async with open_channel(host.target) as channel:
        stub = verify_pb2_grpc.VerifyServiceStub(channel)
        await stub.Verify(request("ok"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Verify(request("raise:InvalidArgument"), timeout=5)
    url = f"http://127.0.0.1:{host.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'puremesh_rpc_requests_total{code="OK",method="Verify",service="scripted"}' in text
    assert 'puremesh_rpc_errors_total{code="INVALID_ARGUMENT",method="Verify",service="scripted"}' in text
    assert "puremesh_rpc_duration_seconds_bucket{" in text
    assert 'puremesh_service_ready{service="scripted"} 1.0' in text
    await host.drain(grace=1)


async def test_client_retries_only_retryable_codes_and_gives_up():
    servicer = ScriptedVerify()
    host, loader = await start_host(servicer)
    await loader
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01)
    async with open_channel(host.target) as channel:
        stub = verify_pb2_grpc.VerifyServiceStub(channel)
        with pytest.raises(RpcError) as info:
            await call_unary(stub.Verify, request("raise:NotReady"), timeout=5, retry=retry)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and servicer.calls == 3
        with pytest.raises(RpcError) as info:
            await call_unary(stub.Verify, request("raise:InvalidArgument"), timeout=5, retry=retry)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and servicer.calls == 4
        with pytest.raises(RpcError) as info:
            await call_unary(stub.Verify, request("wait"), timeout=0.2, retry=retry)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and servicer.calls == 5
    servicer.release.set()
    await host.drain(grace=1)
