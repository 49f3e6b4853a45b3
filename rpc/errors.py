"""Domain errors and the one table that maps them to gRPC status codes (ARCHITECTURE.md rule 4).

Servicers raise these; the server interceptor turns them into the status below. Anything else
that escapes a handler becomes INTERNAL (logged with its traceback): nothing leaves as UNKNOWN.
Per-item problems in batch calls are not raised: they become an ItemError on that item.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base of the errors a servicer may raise; `code` is filled from STATUS_TABLE."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """Malformed input: missing or out-of-range fields, oversized batches, undecodable text."""


class NotFound(ServiceError):
    """An unknown version (weights no longer retained, or never published)."""


class NotReady(ServiceError):
    """The service is loading, warming up or draining."""


class Overloaded(ServiceError):
    """Too much work in flight: retry later, elsewhere."""


class StaleWeights(ServiceError):
    """The replica's policy version is older than the caller requires."""


class DeadlineExceeded(ServiceError):
    """The work could not finish within the caller's deadline."""


class Unauthenticated(ServiceError):
    """No bearer token, or one the server does not accept (rpc/auth.py); the message never holds
    the token."""


class Internal(ServiceError):
    """A bug or an engine failure; the message says which."""


STATUS_TABLE: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StaleWeights: grpc.StatusCode.ABORTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Internal: grpc.StatusCode.INTERNAL,
}
for _error, _code in STATUS_TABLE.items():
    _error.code = _code

# Codes a client may retry: the call did no harm and may succeed on another try or replica.
RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
