"""Server bootstrap shared by every service.

A ServiceHost runs one grpc.aio server holding one or more services, plus standard gRPC health
checking, server reflection and a Prometheus endpoint. Its life:

    start()  bind, serve health (NOT_SERVING) and reflection, then load and warm up the
             services; SERVING once every service is ready.
    drain()  health NOT_SERVING, new calls get UNAVAILABLE, in-flight calls get
             `drain_grace_seconds` to finish, then the services release their resources.

Every call to a hosted service passes one interceptor (rpc/interceptor.py): the caller's bearer
token first (UNAUTHENTICATED when missing or wrong), then readiness, draining and concurrency
limits, all before the request is parsed; domain errors map to status codes through
errors.STATUS_TABLE (anything unexpected becomes INTERNAL, never UNKNOWN); RPC metrics.

Admission before work (ServerSettings): gRPC takes at most `grpc_concurrency` calls and refuses
request bodies over `max_request_bytes` unread (RESOURCE_EXHAUSTED); the interceptor decides
whether a hosted service's call is admitted before its request is parsed (a refused call is
never parsed), and leaves `health_reserve_rpcs` calls for health checks, which therefore
answer under full load. Queue waits inside a service are bounded with `queue_budget`.

Security (ServerSettings' ServerSecurity fields; README "Security"): with tls_cert/tls_key the
port speaks TLS only (mTLS with tls_client_ca). Reflection needs the token, as the services do;
grpc.health.v1 answers without one (it tells only whether a service serves), and `health_port`
serves it alone in plaintext for Kubernetes' gRPC probes, which speak plaintext without metadata.
A non-loopback bind needs TLS and tokens, or `insecure` (auth.check_exposure).
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import metrics
from .auth import Authenticator, check_exposure, server_credentials
from .interceptor import HostInterceptor
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
        self.auth = Authenticator.from_settings(settings)  # SecurityError: an unusable token file
        self.health = health.aio.HealthServicer()
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._metrics: metrics.MetricsEndpoint | None = None
        self._stopped = asyncio.Event()

    @property
    def target(self) -> str:
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::", "[::]") else "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self, wait_ready: bool = True) -> None:
        """Bind and start serving; with wait_ready, also load the services before returning."""
        settings = self.settings
        check_exposure(settings.host, settings, "gRPC")
        credentials = server_credentials(settings)
        server = grpc.aio.server(
            interceptors=[HostInterceptor(self)],
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
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise OSError(f"cannot bind gRPC server to {address}: {error}") from error
        self.start_metrics()
        await self._set_health(NOT_SERVING)
        await server.start()
        self._server = server
        await self._start_health_port()
        log.info(
            "gRPC%s on %s, metrics on port %s; loading %s",
            " (TLS)" if credentials is not None else "",
            self.target,
            self.metrics_port,
            ", ".join(s.name for s in self.services.values()),
        )
        if wait_ready:
            await self.load()

    async def _start_health_port(self) -> None:
        """grpc.health.v1 alone, plaintext, on settings.health_port (unless None)."""
        if self.settings.health_port is None:
            return
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=8)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.settings.host}:{self.settings.health_port}"
        try:
            self.health_port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise OSError(f"cannot bind the health port to {address}: {error}") from error
        await server.start()
        self._health_server = server

    def start_metrics(self) -> None:
        """Serve /metrics on settings.metrics_port (unless None); start() does it."""
        if self.settings.metrics_port is not None and self._metrics is None:
            host = self.settings.metrics_bind_host
            self._metrics = metrics.start_metrics_endpoint(host, self.settings.metrics_port)
            self.metrics_port = self._metrics.port

    def handler(self, full_name: str, method: str, inner: Callable[..., Any], stream: bool = False):
        """`inner` (a servicer method) behind the same token check, admission, error mapping and
        metrics as a call through this host's gRPC server: for adapters that receive calls
        another way (Ray Serve, services/ray_serve.py). The result takes (request, context); the
        context needs `abort(code, details)` (raising), `time_remaining()` and
        `invocation_metadata()` (the caller's, with its token)."""
        interceptor = HostInterceptor(self)
        service = self.services[full_name]
        wrap = interceptor._wrap_stream if stream else interceptor._wrap_unary
        wrapped = wrap(service, method, inner)

        def behavior(request, context):
            return wrapped(interceptor.unauthenticated(context.invocation_metadata()) or request, context)

        return behavior

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
        if self._health_server is not None:
            await self._health_server.stop(0)
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


def queue_budget(context, cap_s: float) -> float:
    """Seconds a call may wait in a queue: what its deadline leaves (`context.time_remaining()`),
    at most `cap_s` (ServerSettings.max_queue_wait_seconds); 0 once the deadline passed."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is None or not math.isfinite(remaining):
        return cap_s
    return max(0.0, min(cap_s, remaining))
