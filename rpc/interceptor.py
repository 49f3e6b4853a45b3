"""The one interceptor of every ServiceHost (rpc/server.py): for each call to a hosted service,
the caller's bearer token (rpc/auth.py), then readiness, draining and the concurrency limit,
all decided before the request is parsed; then the mapping of domain errors to status codes
through errors.STATUS_TABLE (anything unexpected becomes INTERNAL, never UNKNOWN) and the RPC
metrics. Reflection needs the token too; grpc.health.v1 does not (rpc/server.py's docstring).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from . import metrics
from .errors import ServiceError, Unauthenticated

if TYPE_CHECKING:
    from .server import ServiceDefinition, ServiceHost

log = logging.getLogger(__name__)


class HostInterceptor(grpc.aio.ServerInterceptor):
    """Token check, readiness, draining, concurrency limit, error mapping and RPC metrics."""

    def __init__(self, host: ServiceHost) -> None:
        self.host = host

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        _, service_name, method = handler_call_details.method.split("/")
        service = self.host.services.get(service_name)
        if handler is None:
            return handler
        if service is None:
            if service_name.startswith(REFLECTION_PREFIX):  # as the services: a token first
                refused = self.unauthenticated(handler_call_details.invocation_metadata)
                return _refusing(refused) if refused is not None else handler
            return handler
        refused = self.unauthenticated(handler_call_details.invocation_metadata)
        deserializer = _admitting(self, service, method, handler.request_deserializer, refused)
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

    def unauthenticated(self, metadata) -> Refused | None:
        """The refusal of a call whose metadata holds no accepted token, or None."""
        error = self.host.auth.refusal(metadata)
        if error is None:
            return None
        reason = "missing" if error.message.startswith("missing") else "invalid"
        metrics.RPC_UNAUTHENTICATED.labels(reason).inc()
        return Refused(Unauthenticated.code, error.message)

    def refusal(self, service: ServiceDefinition, method: str) -> Refused | None:
        """Why a call to `method` would be refused now (draining, loading, overload), or None."""
        host = self.host
        if host.draining:
            return Refused(grpc.StatusCode.UNAVAILABLE, f"{service.name} is shutting down")
        if not host.ready and method not in service.always_available:
            return Refused(grpc.StatusCode.UNAVAILABLE, f"{service.name} is not ready (loading)")
        if host.in_flight >= host.settings.max_concurrent_rpcs:
            return Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{service.name} is overloaded ({host.in_flight} calls in flight)",
            )
        return None

    async def _admit(self, service: ServiceDefinition, method: str, request) -> None:
        if isinstance(request, Refused):  # decided before parsing (see _admitting)
            raise request
        refused = self.refusal(service, method)
        if refused is not None:
            raise refused

    def _wrap_unary(self, service: ServiceDefinition, method: str, inner):
        async def behavior(request, context):
            async with CallScope(self, service, method, context, request):
                return await inner(request, context)

        return behavior

    def _wrap_stream(self, service: ServiceDefinition, method: str, inner):
        """A server stream: an async generator, or a coroutine that writes with context.write
        (e.g. FetchWeights, which bounds each write by a deadline)."""
        if inspect.iscoroutinefunction(inner):
            return self._wrap_unary(service, method, inner)

        async def behavior(request, context) -> AsyncIterator[Any]:
            async with CallScope(self, service, method, context, request):
                async for message in inner(request, context):
                    yield message

        return behavior


class Refused(Exception):
    """A call refused by admission; also stands in for its request when it was refused before
    parsing, or when the request could not be parsed (e.g. a string field holding invalid
    UTF-8: INVALID_ARGUMENT instead of grpc's generic failure)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


REFLECTION_PREFIX = "grpc.reflection."


def _refusing(refused: Refused):
    """A bidi-stream handler (reflection's) that only refuses."""

    async def refuse(requests, context):
        await context.abort(refused.code, refused.message)

    return grpc.stream_stream_rpc_method_handler(refuse)


def _admitting(
    interceptor: HostInterceptor,
    service: ServiceDefinition,
    method: str,
    deserializer,
    unauthenticated: Refused | None = None,
):
    """`deserializer` behind the token check and admission: a call that would be refused is
    not parsed."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        if unauthenticated is not None:
            return unauthenticated
        refused = interceptor.refusal(service, method)
        if refused is not None:
            return refused
        try:
            return deserializer(data)
        except Exception as error:
            return Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {type(error).__name__}: {error}"
            )

    return parse


class CallScope:
    """Accounting and error mapping for one call."""

    def __init__(
        self, interceptor: HostInterceptor, service: ServiceDefinition, method: str, context, request
    ):
        self.interceptor, self.service, self.method, self.context = interceptor, service, method, context
        self.request = request
        self.code = grpc.StatusCode.OK
        self.admitted = False

    async def __aenter__(self) -> CallScope:
        self.began = time.perf_counter()
        try:
            await self.interceptor._admit(self.service, self.method, self.request)
        except Refused as refused:
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
