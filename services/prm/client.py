"""Python client of PrmService: plain values in and out, deadlines and bounded retries
(rpc/client.py's ServiceClient)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from puremesh.common.v1 import common_pb2
from puremesh.contract.services import SERVICES, ServiceName
from puremesh.prm.v1 import prm_pb2, prm_pb2_grpc
from puremesh.rpc.client import ServiceClient

Text = str
TokenIds = Sequence[int]


@dataclass(frozen=True)
class Steps:
    """A response given as the texts of its steps (prm.proto StepTexts): what a client whose
    tokenizer differs from the PRM's sends; the server scores exactly one score per step."""

    texts: tuple[str, ...]


@dataclass(frozen=True)
class TokenizerIdentity:
    """The PRM's tokenizer and layout (prm.proto TokenizerIdentity)."""

    fingerprint: str
    vocab_size: int
    step_tag: str
    readout: str


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


def _item(prompt: Text | TokenIds, response: Text | TokenIds | Steps) -> prm_pb2.ScoreItem:
    item = prm_pb2.ScoreItem()
    if isinstance(prompt, str):
        item.prompt_text = prompt
    else:
        item.prompt_token_ids.CopyFrom(common_pb2.TokenIds(ids=list(prompt)))
    if isinstance(response, str):
        item.response_text = response
    elif isinstance(response, Steps):
        item.response_steps.CopyFrom(prm_pb2.StepTexts(steps=list(response.texts)))
    else:
        item.response_token_ids.CopyFrom(common_pb2.TokenIds(ids=list(response)))
    return item


class PrmClient(ServiceClient):
    """`async with PrmClient("host:port") as prm: await prm.score([(prompt, response)])`.

    Prompts and responses are text (tokenised by the server) or token ids; a response may also
    be `Steps`, the texts of its steps. `application`: the
    Ray Serve application behind a Ray Serve gRPC proxy at `target` (sent as `application`
    metadata on every call); empty for a standalone server.
    """

    SERVICE_NAME = SERVICES[ServiceName.PRM].proto_service
    STUB = prm_pb2_grpc.PrmServiceStub

    async def score(
        self, items: Sequence[tuple[Text | TokenIds, Text | TokenIds | Steps]]
    ) -> list[ScoredResponse]:
        request = prm_pb2.ScoreStepsRequest(items=[_item(p, r) for p, r in items])
        reply = await self._unary(self._stub.ScoreSteps, request)
        return [
            ScoredResponse([], result.error.message)
            if result.HasField("error")
            else ScoredResponse(
                [StepScore(s.score, s.token_start, s.token_end, s.text) for s in result.steps]
            )
            for result in reply.results
        ]

    async def describe_tokenizer(self) -> TokenizerIdentity:
        """The identity of the PRM's tokenizer and its layout."""
        reply = await self._unary(self._stub.DescribeTokenizer, prm_pb2.DescribeTokenizerRequest())
        return TokenizerIdentity(reply.fingerprint, reply.vocab_size, reply.step_tag, reply.readout)

    async def _probe_application(self) -> str:
        """An empty ScoreSteps call, which a replica answers only once its PRM is loaded."""
        return await self._probe_call(self._stub.ScoreSteps, prm_pb2.ScoreStepsRequest())
