"""rpc/client.py's ServiceClient, the one base of the rollout, PRM and verify clients, against a
real grpc.aio server on port 0 (rpc.server.ServiceHost) hosting a recording VerifyService.

The recording servicer isolates what the base does (metadata, deadlines, retries, probe, close);
the real servicers behind each client are exercised in test_{rollout,prm,verify}_service.py.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from puremesh.contract.services import SERVICES, ServiceName
from puremesh.contract.verdict import Verdict
from puremesh.rpc import errors
from puremesh.rpc.client import NO_RETRY, PROBE_TIMEOUT_S, RetryPolicy, RpcError, ServiceClient
from puremesh.rpc.server import ServiceDefinition, ServiceHost
from puremesh.rpc.settings import ServerSettings
from puremesh.services.prm.client import PrmClient
from puremesh.services.rollout.client import RolloutClient
from puremesh.services.verify.client import VerifyClient
from puremesh.verify.v1 import verify_pb2, verify_pb2_grpc

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


class RecordingVerify(verify_pb2_grpc.VerifyServiceServicer):
    """Records each call's metadata and deadline; fails the first `failures` calls with `error`."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], float | None]] = []
        self.failures = 0
        self.error: type[errors.ServiceError] = errors.NotReady

    async def Verify(self, request, context):
        self.calls.append((dict(context.invocation_metadata()), context.time_remaining()))
        if len(self.calls) <= self.failures:
            raise self.error("scripted failure")
        correct = verify_pb2.VERDICT_CORRECT
        return verify_pb2.VerifyResponse(
            results=[
                verify_pb2.VerifyResult(verdict=correct, extracted_answer=i.response) for i in request.items
            ]
        )


@pytest.fixture
async def host():
    servicer = RecordingVerify()
    loaded = asyncio.Event()

    async def load() -> None:
        await loaded.wait()

    definition = ServiceDefinition(
        "verify",
        VerifyClient.SERVICE_NAME,
        servicer,
        verify_pb2_grpc.add_VerifyServiceServicer_to_server,
        start=load,
    )
    host = ServiceHost([definition], ServerSettings(metrics_port=None))
    await host.start(wait_ready=False)
    loader = asyncio.create_task(host.load())
    host.servicer, host.loaded, host.loader = servicer, loaded, loader
    yield host
    loaded.set()
    await loader
    await host.drain(grace=1)


async def ready(host) -> None:
    host.loaded.set()
    await host.loader


async def test_the_three_clients_share_the_base_and_its_signature() -> None:
    expected = {RolloutClient: (ServiceName.ROLLOUT, 600.0), PrmClient: (ServiceName.PRM, 60.0)}
    expected[VerifyClient] = (ServiceName.VERIFY, 60.0)
    for cls, (name, default_timeout) in expected.items():
        assert issubclass(cls, ServiceClient)
        assert SERVICES[name].proto_service == cls.SERVICE_NAME
        client = cls("127.0.0.1:1", 7.5, NO_RETRY, "app")  # positional, as the callers pass it
        assert (client.target, client.timeout, client.retry, client.application) == (
            "127.0.0.1:1",
            7.5,
            NO_RETRY,
            "app",
        )
        defaults = cls("127.0.0.1:1")
        assert defaults.timeout == default_timeout and defaults.retry == RetryPolicy()
        assert defaults.application == ""
        await client.close()
        await defaults.close()


async def test_probe_standalone_asks_grpc_health(host) -> None:
    async with VerifyClient(host.target, 5, NO_RETRY) as client:
        with pytest.raises(RpcError) as info:
            await client.probe()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "NOT_SERVING" in info.value.details
        await ready(host)
        assert await client.probe() == "SERVING"
    assert host.servicer.calls == []  # grpc.health only: no Verify call


async def test_probe_through_a_proxy_makes_a_light_call_with_the_application_metadata(host) -> None:
    async with VerifyClient(host.target, 300, NO_RETRY, "verify") as client:
        with pytest.raises(RpcError) as info:
            await client.probe()  # the host is still loading: the call itself is refused
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        await ready(host)
        assert await client.probe() == "ready (Verify answered)"
    [(metadata, remaining)] = host.servicer.calls
    assert metadata["application"] == "verify"
    # the probe's deadline (not the client's 300 s), give or take the clocks' rounding
    assert remaining is not None and 0 < remaining < PROBE_TIMEOUT_S + 1


async def test_calls_carry_the_deadline_and_map_replies_to_contract_values(host) -> None:
    await ready(host)
    async with VerifyClient(host.target, 5, NO_RETRY) as client:
        outcomes = await client.verify([("a", "1"), ("b", None)])
    assert [(o.verdict, o.answer, o.solved) for o in outcomes] == [
        (Verdict.CORRECT, "a", True),
        (Verdict.CORRECT, "b", True),
    ]
    [(metadata, remaining)] = host.servicer.calls
    assert "application" not in metadata  # a standalone server gets no application key
    assert remaining is not None and 0 < remaining < 5 + 1


async def test_retries_are_bounded_and_only_for_retryable_codes(host) -> None:
    await ready(host)
    servicer = host.servicer
    servicer.failures = 2
    async with VerifyClient(host.target, 5, FAST_RETRY) as client:
        assert [o.verdict for o in await client.verify([("x", "1")])] == [Verdict.CORRECT]
    assert len(servicer.calls) == 3  # two UNAVAILABLE, then the answer

    servicer.calls.clear()
    servicer.failures = 5
    async with VerifyClient(host.target, 5, FAST_RETRY) as client:
        with pytest.raises(RpcError) as info:
            await client.verify([("x", "1")])
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.target == host.target
    assert len(servicer.calls) == 3  # max_attempts counts the first try

    servicer.calls.clear()
    servicer.error = errors.InvalidArgument
    async with VerifyClient(host.target, 5, FAST_RETRY) as client:
        with pytest.raises(RpcError) as info:
            await client.verify([("x", "1")])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(servicer.calls) == 1  # not retryable: one try


async def test_the_context_manager_closes_the_channel(host) -> None:
    await ready(host)
    async with VerifyClient(host.target, 5, NO_RETRY) as client:
        assert isinstance(client, VerifyClient)
        await client.verify([("x", "1")])
    assert client._channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN
