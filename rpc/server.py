"""Server bootstrap shared by every service.

A ServiceHost runs one grpc.aio server holding one or more services, plus standard gRPC health
checking, server reflection and a Prometheus endpoint. Its life:

    start()  bind, serve health (NOT_SERVING) and reflection, then load and warm up the
             services; SERVING once every service is ready.
    drain()  health NOT_SERVING, new calls get UNAVAILABLE, in-flight calls get
             `drain_grace_seconds` to finish, then the services release their resources.

Every call to a hosted service passes one interceptor that applies readiness, draining and
concurrency limits, maps domain errors to status codes through errors.STATUS_TABLE (anything
unexpected becomes INTERNAL, never UNKNOWN) and records the RPC metrics.

Admission before work (ServerSettings): gRPC takes at most `grpc_concurrency` calls and refuses
request bodies over `max_request_bytes` unread (RESOURCE_EXHAUSTED); the interceptor decides
whether a hosted service's call is admitted before its request is parsed (a refused call is
never parsed), and leaves `health_reserve_rpcs` calls for health checks, which therefore
answer under full load. Queue waits inside a service are bounded with `queue_budget`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import metrics
from .errors import ServiceError
from .settings import ServerSettings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class ServiceDefinition:
    """One gRPC service to host.

    name: short name used in metric labels and logs ("prm").
    full_name: the proto service name ("puremesh.prm.v1.PrmService").
    add_to_server: the generated add_<Service>Servicer_to_server function.
    start / stop: load and warm up / release resources; the service is SERVING only after
        start() returns.
    always_available: methods answered while the service is not ready (e.g. GetStatus).
    """

    name: str
    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    start: Callable[[], Awaitable[None]] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
    always_available: frozenset[str] = field(default_factory=frozenset)


class ServiceHost:
    """Runs services on one port; see the module docstring for the life cycle."""

    def __init__(self, services: list[ServiceDefinition], settings: ServerSettings) -> None:
        self.services = {s.full_name: s for s in services}
        self.settings = settings
        self.health = health.aio.HealthServicer()
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics: metrics.MetricsEndpoint | None = None
        self._stopped = asyncio.Event()

    @property
    def target(self) -> str:
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::", "[::]") else "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self, wait_ready: bool = True) -> None:
        """Bind and start serving; with wait_ready, also load the services before returning."""
        settings = self.settings
        server = grpc.aio.server(
            interceptors=[_HostInterceptor(self)],
            options=[
                ("grpc.max_receive_message_length", settings.max_request_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=settings.grpc_concurrency,
        )
        for service in self.services.values():
            service.add_to_server(service.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise OSError(f"cannot bind gRPC server to {address}: {error}") from error
        self.start_metrics()
        await self._set_health(NOT_SERVING)
        await server.start()
        self._server = server
        log.info(
            "gRPC on %s, metrics on port %s; loading %s",
            self.target,
            self.metrics_port,
            ", ".join(s.name for s in self.services.values()),
        )
        if wait_ready:
            await self.load()

    def start_metrics(self) -> None:
        """Serve /metrics on settings.metrics_port (unless None); start() does it."""
        if self.settings.metrics_port is not None and self._metrics is None:
            host = self.settings.metrics_bind_host
            self._metrics = metrics.start_metrics_endpoint(host, self.settings.metrics_port)
            self.metrics_port = self._metrics.port

    def handler(self, full_name: str, method: str, inner: Callable[..., Any], stream: bool = False):
        """`inner` (a servicer method) behind the same admission, error mapping and metrics as a
        call through this host's gRPC server: for adapters that receive calls another way (Ray
        Serve, services/ray_serve.py). The result takes (request, context); the context
        needs `abort(code, details)` (raising) and `time_remaining()`."""
        interceptor = _HostInterceptor(self)
        service = self.services[full_name]
        if stream:
            return interceptor._wrap_stream(service, method, inner)
        return interceptor._wrap_unary(service, method, inner)

    async def load(self) -> None:
        """Load and warm up every service, then report SERVING."""
        for service in self.services.values():
            if service.start is not None:
                began = time.perf_counter()
                await service.start()
                log.info("%s ready in %.1f s", service.name, time.perf_counter() - began)
        if not self.draining:
            self.ready = True
            await self._set_health(SERVING)

    async def drain(self, grace: float | None = None) -> None:
        """Stop gracefully: NOT_SERVING, refuse new calls, let in-flight calls finish."""
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        self.ready = False
        await self.health.enter_graceful_shutdown()
        for service in self.services.values():
            metrics.SERVICE_READY.labels(service.name).set(0)
        grace = self.settings.drain_grace_seconds if grace is None else grace
        log.info("draining: %d call(s) in flight, grace %.1f s", self.in_flight, grace)
        await asyncio.sleep(self.settings.drain_delay_seconds)
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._server is not None:
            await self._server.stop(max(0.0, deadline - time.monotonic()))
        for service in self.services.values():
            if service.stop is not None:
                try:
                    await service.stop()
                except Exception:
                    log.exception("%s: error while stopping", service.name)
        if self._metrics is not None:
            self._metrics.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run_until_signal(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(stop.wait())
        stopped = asyncio.create_task(self._stopped.wait())
        await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("signal received")
            await self.drain()
        waiter.cancel()

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        for service in self.services.values():
            await self.health.set(service.full_name, status)
            metrics.SERVICE_READY.labels(service.name).set(1 if status == SERVING else 0)


class _HostInterceptor(grpc.aio.ServerInterceptor):
    """Readiness, draining, concurrency limit, error mapping and RPC metrics."""

    def __init__(self, host: ServiceHost) -> None:
        self.host = host

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        _, service_name, method = handler_call_details.method.split("/")
        service = self.host.services.get(service_name)
        if handler is None or service is None:
            return handler
        deserializer = _admitting(self, service, method, handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(service, method, handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(service, method, handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def refusal(self, service: ServiceDefinition, method: str) -> _Refused | None:
        """Why a call to `method` would be refused now (draining, loading, overload), or None."""
        host = self.host
        if host.draining:
            return _Refused(grpc.StatusCode.UNAVAILABLE, f"{service.name} is shutting down")
        if not host.ready and method not in service.always_available:
            return _Refused(grpc.StatusCode.UNAVAILABLE, f"{service.name} is not ready (loading)")
        if host.in_flight >= host.settings.max_concurrent_rpcs:
            return _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{service.name} is overloaded ({host.in_flight} calls in flight)",
            )
        return None

    async def _admit(self, service: ServiceDefinition, method: str, request) -> None:
        if isinstance(request, _Refused):  # decided before parsing (see _admitting)
            raise request
        refused = self.refusal(service, method)
        if refused is not None:
            raise refused

    def _wrap_unary(self, service: ServiceDefinition, method: str, inner):
        async def behavior(request, context):
            async with _CallScope(self, service, method, context, request):
                return await inner(request, context)

        return behavior

    def _wrap_stream(self, service: ServiceDefinition, method: str, inner):
        """A server stream: an async generator, or a coroutine that writes with context.write
        (e.g. FetchWeights, which bounds each write by a deadline)."""
        if inspect.iscoroutinefunction(inner):
            return self._wrap_unary(service, method, inner)

        async def behavior(request, context) -> AsyncIterator[Any]:
            async with _CallScope(self, service, method, context, request):
                async for message in inner(request, context):
                    yield message

        return behavior


class _Refused(Exception):
    """A call refused by admission; also stands in for its request when it was refused before
    parsing, or when the request could not be parsed (e.g. a string field holding invalid
    UTF-8: INVALID_ARGUMENT instead of grpc's generic failure)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _admitting(interceptor: _HostInterceptor, service: ServiceDefinition, method: str, deserializer):
    """`deserializer` behind admission: a call that would be refused is not parsed."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        refused = interceptor.refusal(service, method)
        if refused is not None:
            return refused
        try:
            return deserializer(data)
        except Exception as error:
            return _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {type(error).__name__}: {error}"
            )

    return parse


def queue_budget(context, cap_s: float) -> float:
    """Seconds a call may wait in a queue: what its deadline leaves (`context.time_remaining()`),
    at most `cap_s` (ServerSettings.max_queue_wait_seconds); 0 once the deadline passed."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is None or not math.isfinite(remaining):
        return cap_s
    return max(0.0, min(cap_s, remaining))


class _CallScope:
    """Accounting and error mapping for one call."""

    def __init__(
        self, interceptor: _HostInterceptor, service: ServiceDefinition, method: str, context, request
    ):
        self.interceptor, self.service, self.method, self.context = interceptor, service, method, context
        self.request = request
        self.code = grpc.StatusCode.OK
        self.admitted = False

    async def __aenter__(self) -> _CallScope:
        self.began = time.perf_counter()
        try:
            await self.interceptor._admit(self.service, self.method, self.request)
        except _Refused as refused:
            self._record(refused.code)
            await self.context.abort(refused.code, refused.message)
        self.admitted = True
        self.interceptor.host.in_flight += 1
        metrics.RPC_IN_FLIGHT.labels(self.service.name, self.method).inc()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if self.admitted:
            self.interceptor.host.in_flight -= 1
            metrics.RPC_IN_FLIGHT.labels(self.service.name, self.method).dec()
        if exc_type is None:
            self._record(self.code)
            return False
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            expired = self.context.time_remaining() is not None and self.context.time_remaining() <= 0
            self._record(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
            return False
        if isinstance(exc, grpc.aio.AbortError):
            self._record(_code_of(self.context))
            return False
        if isinstance(exc, ServiceError):
            code, message = exc.code, exc.message
        else:
            log.error("%s/%s failed", self.service.name, self.method, exc_info=(exc_type, exc, tb))
            code, message = grpc.StatusCode.INTERNAL, f"internal error ({exc_type.__name__}): {exc}"
        self._record(code)
        await self.context.abort(code, message)
        return False

    def _record(self, code: grpc.StatusCode) -> None:
        labels = (self.service.name, self.method, code.name)
        metrics.RPC_REQUESTS.labels(*labels).inc()
        if code != grpc.StatusCode.OK:
            metrics.RPC_ERRORS.labels(*labels).inc()
        if self.admitted:
            metrics.RPC_DURATION.labels(self.service.name, self.method).observe(
                time.perf_counter() - self.began
            )


def _code_of(context) -> grpc.StatusCode:
    try:
        return context.code() or grpc.StatusCode.UNKNOWN
    except Exception:
        return grpc.StatusCode.UNKNOWN
