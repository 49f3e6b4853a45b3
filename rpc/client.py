"""Client plumbing: channels, deadlines on every call, bounded retries with backoff, and
`ServiceClient`, the base of the rollout, PRM and verify clients.

Only codes in errors.RETRYABLE_CODES are retried. A server stream is retried only while it
has not delivered a message, so a caller never sees a message twice.

A service behind a Ray Serve gRPC proxy is named by the `application` metadata key on every
call (services/ray_serve.py); `call_metadata` builds it, none for a standalone server. With a
ClientSecurity (rpc/settings.py), the channel speaks TLS and every call carries the bearer token
of its token file (`authorization: Bearer <token>`, read again when the file changes; rpc/auth.py):
ServiceClient adds it to its call metadata; `open_channel(tokens=...)` adds it to every call on
the channel with an interceptor, for code that calls raw stubs (the weight fetcher).
"""

from __future__ import annotations

import abc
import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .auth import TokenSource, channel_credentials, channel_options, token_source
from .errors import RETRYABLE_CODES
from .settings import ClientSecurity

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


def call_metadata(application: str = "", tokens: TokenSource | None = None) -> Metadata | None:
    """The metadata of every call: ("application", name) for a Ray Serve proxy, and the bearer
    token of `tokens` (its file's current token); none for a plain standalone server."""
    entries: list[tuple[str, str]] = []
    if application:
        entries.append(("application", application))
    if tokens is not None:
        entries.append(("authorization", f"Bearer {tokens.token()}"))
    return tuple(entries) or None


class _Bearer:
    """Adds the current token of `tokens` to the metadata of every call."""

    def __init__(self, tokens: TokenSource) -> None:
        self.tokens = tokens

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        entry = ("authorization", f"Bearer {self.tokens.token()}")
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), entry))


# grpc.aio files an interceptor under its first interceptor type only: one class per call type.
class _BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


class _BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


def open_channel(
    target: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    security: ClientSecurity | None = None,
    options: list[tuple[str, Any]] | None = None,
    tokens: TokenSource | None = None,
) -> grpc.aio.Channel:
    """A channel to `target`: TLS when `security` asks for it (rpc/auth.py), else plaintext;
    with `tokens`, every call on it carries the token (module docstring)."""
    settings = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *channel_options(security),
        *(options or []),
    ]
    interceptors = [_BearerUnary(tokens), _BearerStream(tokens)] if tokens is not None else None
    credentials = channel_credentials(security)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=settings, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=settings, interceptors=interceptors)


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
    request = health_pb2.HealthCheckRequest(service=service)
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await call_unary(stub.Check, request, timeout=timeout, retry=retry, target=target)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        raise RpcError(grpc.StatusCode.UNAVAILABLE, f"{service} is {status}", target)


PROBE_TIMEOUT_S = 30.0


class ServiceClient(abc.ABC):
    """The base of the service clients: one channel to `target` and a stub on it, a deadline of
    `timeout` seconds per attempt and `retry` on every call, and the `application` metadata of a
    Ray Serve proxy (empty for a standalone server). `async with Client(target) as client: ...`

    A subclass names its service (SERVICE_NAME, the full proto name grpc.health is asked about),
    its generated stub class (STUB) and its default deadline (DEFAULT_TIMEOUT_S), and says how to
    probe it through a Ray Serve proxy (`_probe_application`). Its methods take and return plain
    values; the protobuf mapping lives beside it. `security`: TLS and the token file
    (rpc/settings.py ClientSecurity); None = plaintext, no token.
    """

    SERVICE_NAME: ClassVar[str]
    STUB: ClassVar[type[Any]]
    DEFAULT_TIMEOUT_S: ClassVar[float] = 60.0

    def __init__(
        self,
        target: str,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        application: str = "",
        security: ClientSecurity | None = None,
    ) -> None:
        self.target = target
        self.timeout = self.DEFAULT_TIMEOUT_S if timeout is None else timeout
        self.retry = retry or RetryPolicy()
        self.application = application
        self._tokens = token_source(security)  # SecurityError: an unreadable or empty token file
        self._channel = open_channel(target, security=security)
        self._stub = self.STUB(self._channel)

    @property
    def _metadata(self) -> Metadata | None:
        return call_metadata(self.application, self._tokens)

    @property
    def probe_timeout(self) -> float:
        """The deadline of a probe: the client's, at most PROBE_TIMEOUT_S."""
        return min(self.timeout, PROBE_TIMEOUT_S)

    async def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        """A unary call with this client's deadline (or `timeout`), retries and metadata."""
        return await call_unary(
            method,
            request,
            timeout=self.timeout if timeout is None else timeout,
            retry=self.retry,
            target=self.target,
            metadata=self._metadata,
        )

    def _server_stream(self, method: Callable[..., Any], request: Any) -> AsyncIterator[Any]:
        """A server stream with this client's deadline, retries (before the first message) and metadata."""
        return call_server_stream(
            method,
            request,
            timeout=self.timeout,
            retry=self.retry,
            target=self.target,
            metadata=self._metadata,
        )

    async def probe(self) -> str:
        """Check that the service answers; a one-line description, or RpcError.

        Standalone: grpc.health.v1 for SERVICE_NAME (UNAVAILABLE unless SERVING). Through a Ray
        Serve proxy, which answers no grpc.health: `_probe_application`, a real call that a
        replica answers only once it is ready.
        """
        if not self.application:
            timeout = self.probe_timeout
            await check_health(
                self._channel, self.SERVICE_NAME, timeout=timeout, retry=self.retry, target=self.target
            )
            return "SERVING"
        return await self._probe_application()

    @abc.abstractmethod
    async def _probe_application(self) -> str:
        """Probe through a Ray Serve proxy (see `probe`); a one-line description, or RpcError."""

    async def _probe_call(self, method: Callable[..., Any], request: Any) -> str:
        """A `_probe_application` that makes one light call (an empty request, for example)."""
        await self._unary(method, request, timeout=self.probe_timeout)
        return f"ready ({type(request).__name__.removesuffix('Request')} answered)"

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
