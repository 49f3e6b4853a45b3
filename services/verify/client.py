"""Python client of VerifyService: plain values in and out, deadlines and bounded retries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from puremesh.rpc.client import (
    RetryPolicy,
    call_metadata,
    call_unary,
    open_channel,
    probe_service,
)
from puremesh.verify.v1 import verify_pb2, verify_pb2_grpc

SERVICE_NAME = "puremesh.verify.v1.VerifyService"
VERDICT_NAMES = {
    verify_pb2.VERDICT_CORRECT: "correct",
    verify_pb2.VERDICT_INCORRECT: "incorrect",
    verify_pb2.VERDICT_NO_ANSWER: "no_answer",
    verify_pb2.VERDICT_NO_GROUND_TRUTH: "no_ground_truth",
    verify_pb2.VERDICT_TIMEOUT: "timeout",
}


@dataclass(frozen=True)
class VerifyOutcome:
    """verdict: correct | incorrect | no_answer | no_ground_truth | timeout | error."""

    verdict: str
    answer: str
    error: str | None = None

    @property
    def solved(self) -> bool:
        return self.verdict == "correct"


class VerifyClient:
    """`async with VerifyClient("host:port") as client: await client.verify([(text, gt)])`.

    `application`: the Ray Serve application behind a Ray Serve gRPC proxy at `target` (sent as
    `application` metadata on every call); empty for a standalone server.
    """

    def __init__(
        self, target: str, timeout: float = 60.0, retry: RetryPolicy | None = None, application: str = ""
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.application = application
        self._metadata = call_metadata(application)
        self._channel = open_channel(target)
        self._stub = verify_pb2_grpc.VerifyServiceStub(self._channel)

    async def verify(self, items: Sequence[tuple[str, str | None]]) -> list[VerifyOutcome]:
        """Grade (response, ground_truth) pairs; ground_truth None or "" means none."""
        request = verify_pb2.VerifyRequest(
            items=[
                verify_pb2.VerifyItem(response=response, ground_truth=truth)
                if truth is not None
                else verify_pb2.VerifyItem(response=response)
                for response, truth in items
            ]
        )
        reply = await call_unary(
            self._stub.Verify,
            request,
            timeout=self.timeout,
            retry=self.retry,
            target=self.target,
            metadata=self._metadata,
        )
        return [
            VerifyOutcome("error", "", result.error.message)
            if result.HasField("error")
            else VerifyOutcome(VERDICT_NAMES.get(result.verdict, "error"), result.extracted_answer)
            for result in reply.results
        ]

    async def probe(self) -> str:
        """Check that the service answers; a one-line description, or RpcError. Standalone:
        grpc.health.v1. Through a Ray Serve proxy (which answers no grpc.health): an empty
        Verify call, which a replica answers once its grading pool runs."""
        return await probe_service(
            self._channel,
            SERVICE_NAME,
            self._stub.Verify,
            verify_pb2.VerifyRequest(),
            application=self.application,
            timeout=self.timeout,
            retry=self.retry,
            target=self.target,
        )

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> VerifyClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
