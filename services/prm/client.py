"""Python client of PrmService: plain values in and out, deadlines and bounded retries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from puremesh.common.v1 import common_pb2
from puremesh.prm.v1 import prm_pb2, prm_pb2_grpc
from puremesh.rpc.client import (
    RetryPolicy,
    call_metadata,
    call_unary,
    open_channel,
    probe_service,
)

SERVICE_NAME = "puremesh.prm.v1.PrmService"
Text = str
TokenIds = Sequence[int]


@dataclass(frozen=True)
class StepScore:
    score: float
    token_start: int
    token_end: int
    text: str


@dataclass(frozen=True)
class ScoredResponse:
    """One item's steps, or its error (then `steps` is empty)."""

    steps: list[StepScore]
    error: str | None = None

    @property
    def scores(self) -> list[float]:
        return [step.score for step in self.steps]


def _item(prompt: Text | TokenIds, response: Text | TokenIds) -> prm_pb2.ScoreItem:
    item = prm_pb2.ScoreItem()
    if isinstance(prompt, str):
        item.prompt_text = prompt
    else:
        item.prompt_token_ids.CopyFrom(common_pb2.TokenIds(ids=list(prompt)))
    if isinstance(response, str):
        item.response_text = response
    else:
        item.response_token_ids.CopyFrom(common_pb2.TokenIds(ids=list(response)))
    return item


class PrmClient:
    """`async with PrmClient("host:port") as prm: await prm.score([(prompt, response)])`.

    Prompts and responses are text (tokenised by the server) or token ids. `application`: the
    Ray Serve application behind a Ray Serve gRPC proxy at `target` (sent as `application`
    metadata on every call); empty for a standalone server.
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
        self._stub = prm_pb2_grpc.PrmServiceStub(self._channel)

    async def score(self, items: Sequence[tuple[Text | TokenIds, Text | TokenIds]]) -> list[ScoredResponse]:
        request = prm_pb2.ScoreStepsRequest(items=[_item(p, r) for p, r in items])
        reply = await call_unary(
            self._stub.ScoreSteps,
            request,
            timeout=self.timeout,
            retry=self.retry,
            target=self.target,
            metadata=self._metadata,
        )
        return [
            ScoredResponse([], result.error.message)
            if result.HasField("error")
            else ScoredResponse(
                [StepScore(s.score, s.token_start, s.token_end, s.text) for s in result.steps]
            )
            for result in reply.results
        ]

    async def probe(self) -> str:
        """Check that the service answers; a one-line description, or RpcError. Standalone:
        grpc.health.v1. Through a Ray Serve proxy (which answers no grpc.health): an empty
        ScoreSteps call, which a replica answers only once its PRM is loaded."""
        return await probe_service(
            self._channel,
            SERVICE_NAME,
            self._stub.ScoreSteps,
            prm_pb2.ScoreStepsRequest(),
            application=self.application,
            timeout=self.timeout,
            retry=self.retry,
            target=self.target,
        )

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> PrmClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
