"""The service clients adapted to the learner's backends (trainer/backends.py), with fail-over
across the endpoints of each service."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from puremesh.contract.sampling import Sample, SamplingSpec
from puremesh.contract.verdict import Verdict
from puremesh.rpc.client import RetryPolicy, RpcError
from puremesh.services.prm.client import PrmClient
from puremesh.services.rollout.client import RolloutClient
from puremesh.services.verify.client import VerifyClient
from puremesh.trainer.backends import BackendError, StepScores

log = logging.getLogger(__name__)
Client = TypeVar("Client")
Result = TypeVar("Result")

# Codes after which the same request may succeed on another endpoint (or the same one later).
FAILOVER_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,  # a rollout replica still swapping in the requested version
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)


class EndpointPool:
    """Round-robin over the clients of one service; a call that fails with a fail-over code
    moves to the next endpoint, with backoff, for up to `max_rounds` passes over all of them."""

    def __init__(
        self, name: str, clients: Sequence[Any], max_rounds: int = 20, backoff_s: float = 0.2
    ) -> None:
        if not clients:
            raise ValueError(f"no {name} endpoints configured")
        self.name = name
        self.clients = list(clients)
        self.max_rounds = max_rounds
        self.backoff_s = backoff_s
        self._next = itertools.cycle(range(len(self.clients)))

    async def call(self, operation: Callable[[Any], Awaitable[Result]]) -> Result:
        attempts = self.max_rounds * len(self.clients)
        last: RpcError | None = None
        for attempt in range(attempts):
            client = self.clients[next(self._next)]
            try:
                return await operation(client)
            except RpcError as error:
                if error.code not in FAILOVER_CODES:
                    raise BackendError(
                        f"{self.name} at {error.target}: {error.code.name}: {error.details}"
                    ) from error
                last = error
            if (attempt + 1) % len(self.clients) == 0:
                await asyncio.sleep(min(2.0, self.backoff_s * (1 + attempt // len(self.clients))))
        assert last is not None
        raise BackendError(f"{self.name}: every endpoint failed; last {last.code.name}: {last.details}")

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients), return_exceptions=True)


# One try per endpoint inside a client: the pool does the retrying and the moving on.
SINGLE_TRY = RetryPolicy(max_attempts=1)


class MeshRollout:
    """`application`: the Ray Serve application name when the targets are Ray Serve proxies."""

    def __init__(self, targets: Sequence[str], timeout: float, application: str = "") -> None:
        clients = [RolloutClient(t, timeout, SINGLE_TRY, application) for t in targets]
        self.pool = EndpointPool("rollout", clients)

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingSpec, min_policy_version: int
    ) -> list[Sample]:
        async def call(client: RolloutClient) -> list[Sample]:
            # A stream cut midway is retried whole elsewhere: partial samples are discarded.
            stream = client.generate(prompt_ids, sampling, min_policy_version=min_policy_version)
            return [sample async for sample in stream]

        return await self.pool.call(call)


class MeshScorer:
    def __init__(self, targets: Sequence[str], timeout: float, application: str = "") -> None:
        self.pool = EndpointPool("prm", [PrmClient(t, timeout, SINGLE_TRY, application) for t in targets])

    async def score(self, prompt_ids: list[int], responses: list[list[int]]) -> list[StepScores]:
        results = await self.pool.call(lambda client: client.score([(prompt_ids, r) for r in responses]))
        failed = [r.error for r in results if r.error is not None]
        if failed:
            raise BackendError(f"prm could not score {len(failed)} response(s): {failed[0]}")
        return [StepScores([(s.token_start, s.token_end) for s in r.steps], r.scores) for r in results]


class MeshVerifier:
    def __init__(self, targets: Sequence[str], timeout: float, application: str = "") -> None:
        self.pool = EndpointPool(
            "verify", [VerifyClient(t, timeout, SINGLE_TRY, application) for t in targets]
        )

    async def verify(self, responses: list[str], ground_truth: str | None) -> list[Verdict]:
        outcomes = await self.pool.call(lambda client: client.verify([(r, ground_truth) for r in responses]))
        return [outcome.verdict for outcome in outcomes]
