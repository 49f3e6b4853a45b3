"""Python client of VerifyService: verdicts (contract/verdict.py) out, deadlines and bounded
retries (rpc/client.py's ServiceClient)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from puremesh.contract.services import SERVICES, ServiceName
from puremesh.contract.verdict import Verdict
from puremesh.rpc.client import ServiceClient
from puremesh.verify.v1 import verify_pb2, verify_pb2_grpc

from .wire import verdict_from_proto


@dataclass(frozen=True)
class VerifyOutcome:
    """One item's verdict and extracted answer; `error` says why when the verdict is ERROR."""

    verdict: Verdict
    answer: str
    error: str | None = None

    @property
    def solved(self) -> bool:
        return self.verdict.solved


class VerifyClient(ServiceClient):
    """`async with VerifyClient("host:port") as client: await client.verify([(text, gt)])`.

    `application`: the Ray Serve application behind a Ray Serve gRPC proxy at `target` (sent as
    `application` metadata on every call); empty for a standalone server.
    """

    SERVICE_NAME = SERVICES[ServiceName.VERIFY].proto_service
    STUB = verify_pb2_grpc.VerifyServiceStub

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
        reply = await self._unary(self._stub.Verify, request)
        return [
            VerifyOutcome(Verdict.ERROR, "", result.error.message)
            if result.HasField("error")
            else VerifyOutcome(verdict_from_proto(result.verdict), result.extracted_answer)
            for result in reply.results
        ]

    async def _probe_application(self) -> str:
        """An empty Verify call, which a replica answers once its grading pool runs."""
        return await self._probe_call(self._stub.Verify, verify_pb2.VerifyRequest())
