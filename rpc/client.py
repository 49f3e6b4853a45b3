"""Client plumbing: channels, deadlines on every call, bounded retries with backoff.

Only codes in errors.RETRYABLE_CODES are retried. A server stream is retried only while it
has not delivered a message, so a caller never sees a message twice.

A service behind a Ray Serve gRPC proxy is named by the `application` metadata key on every
call (services/ray_serve.py); `call_metadata` builds it, none for a standalone server.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from .errors import RETRYABLE_CODES

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """max_attempts counts the first try; backoff grows by `multiplier` up to `max_backoff_s`,
    with full jitter."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    retryable: frozenset[grpc.StatusCode] = RETRYABLE_CODES

    def backoff(self, attempt: int) -> float:
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt)
        return random.uniform(0, cap)


NO_RETRY = RetryPolicy(max_attempts=1)


class RpcError(Exception):
    """A call that failed for good: `code` is the final gRPC status, `details` its message."""

    def __init__(self, code: grpc.StatusCode, details: str, target: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.target = code, details, target


Metadata = tuple[tuple[str, str], ...]


def call_metadata(application: str = "") -> Metadata | None:
    """The metadata of every call: ("application", name) for a Ray Serve proxy, else none."""
    return (("application", application),) if application else None


def open_channel(target: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )


def _as_rpc_error(error: grpc.aio.AioRpcError, target: str) -> RpcError:
    return RpcError(error.code(), error.details() or "", target)


async def call_unary(
    method: Callable[..., Any],
    request: Any,
    *,
    timeout: float,
    retry: RetryPolicy,
    target: str = "",
    metadata: Metadata | None = None,
) -> Any:
    """Call a unary RPC with a deadline of `timeout` seconds per attempt and bounded retries."""
    for attempt in range(retry.max_attempts):
        try:
            return await method(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            if error.code() not in retry.retryable or attempt + 1 == retry.max_attempts:
                raise _as_rpc_error(error, target) from error
        await asyncio.sleep(retry.backoff(attempt))
    raise AssertionError("unreachable")


async def call_server_stream(
    method: Callable[..., Any],
    request: Any,
    *,
    timeout: float,
    retry: RetryPolicy,
    target: str = "",
    metadata: Metadata | None = None,
) -> AsyncIterator[Any]:
    """Iterate a server stream with a deadline; retried only before the first message."""
    for attempt in range(retry.max_attempts):
        received = False
        try:
            async for message in method(request, timeout=timeout, metadata=metadata):
                received = True
                yield message
            return
        except grpc.aio.AioRpcError as error:
            if received or error.code() not in retry.retryable or attempt + 1 == retry.max_attempts:
                raise _as_rpc_error(error, target) from error
        await asyncio.sleep(retry.backoff(attempt))


async def check_health(
    channel: grpc.aio.Channel, service: str, *, timeout: float, retry: RetryPolicy, target: str = ""
) -> None:
    """grpc.health.v1 Check of `service` (its full proto name). RpcError unless SERVING: UNAVAILABLE
    for NOT_SERVING (a standalone server loading or draining), or the call's own error."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    request = health_pb2.HealthCheckRequest(service=service)
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await call_unary(stub.Check, request, timeout=timeout, retry=retry, target=target)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        raise RpcError(grpc.StatusCode.UNAVAILABLE, f"{service} is {status}", target)


PROBE_TIMEOUT_S = 30.0


async def probe_service(
    channel: grpc.aio.Channel,
    service: str,
    light_call: Callable[..., Any],
    request: Any,
    *,
    application: str,
    timeout: float,
    retry: RetryPolicy,
    target: str = "",
) -> str:
    """Check that a service answers; a one-line description, or RpcError.

    Standalone: grpc.health.v1 for `service`. Through a Ray Serve proxy, which answers no
    grpc.health: `light_call(request)` with the `application` metadata, a real call that a replica
    answers only once it is ready (an empty request, for example).
    """
    timeout = min(timeout, PROBE_TIMEOUT_S)
    if not application:
        await check_health(channel, service, timeout=timeout, retry=retry, target=target)
        return "SERVING"
    await call_unary(
        light_call,
        request,
        timeout=timeout,
        retry=retry,
        target=target,
        metadata=call_metadata(application),
    )
    return f"ready ({type(request).__name__.removesuffix('Request')} answered)"
