"""The service clients adapted to the learner's backends (trainer/backends.py), with bounded
fail-over across the endpoints of each service. The policy (which codes, what budget, when a
service counts as unreachable, what a grading failure becomes) is trainer/failover.py's."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from puremesh.contract.sampling import Sample, SamplingSpec
from puremesh.contract.verdict import Verdict
from puremesh.rpc.client import RetryPolicy, RpcError
from puremesh.rpc.errors import RETRYABLE_CODES
from puremesh.rpc.settings import ClientSecurity
from puremesh.services.prm.client import PrmClient, ScoredResponse, Steps
from puremesh.services.rollout.client import RolloutClient
from puremesh.services.verify.client import VerifyClient
from puremesh.trainer.backends import BackendError, StepScores
from puremesh.trainer.failover import GRADING_FAILURES, FailoverSettings, ServiceUnreachable

from .prm_tokens import PolicySteps, agree

log = logging.getLogger(__name__)
Result = TypeVar("Result")

# Codes after which a service counts as down (no answer, or none in time); RESOURCE_EXHAUSTED and
# ABORTED are answers of a live service.
DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Rollout also moves on after ABORTED: a replica that does not hold the learner's version yet.
ROLLOUT_CODES = RETRYABLE_CODES | {grpc.StatusCode.ABORTED}


class EndpointPool:
    """Round-robin over the clients of one service with bounded fail-over (trainer/failover.py):
    a call moves to the next endpoint only on `retryable` codes, pauses with backoff after each
    round, and gives up after `policy.call_budget_seconds`; ServiceUnreachable once the service
    has failed every attempt for `policy.unreachable_timeout_seconds`."""

    def __init__(
        self,
        name: str,
        clients: Sequence[Any],
        policy: FailoverSettings | None = None,
        retryable: frozenset[grpc.StatusCode] = RETRYABLE_CODES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not clients:
            raise ValueError(f"no {name} endpoints configured")
        self.name = name
        self.clients = list(clients)
        self.policy = policy or FailoverSettings()
        self.retryable = retryable
        self.clock = clock
        self.down_since: float | None = None  # start of the first failed attempt since a success
        self._next = itertools.cycle(range(len(self.clients)))

    @property
    def targets(self) -> str:
        return ", ".join(getattr(client, "target", "?") for client in self.clients)

    async def call(self, operation: Callable[[Any], Awaitable[Result]]) -> Result:
        began = self.clock()
        deadline = began + self.policy.call_budget_seconds
        for attempt in itertools.count():
            client = self.clients[next(self._next)]
            tried = self.clock()
            try:
                async with asyncio.timeout(max(0.0, deadline - tried)):
                    result = await operation(client)
            except TimeoutError:
                error = RpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "the call's budget ran out", client.target
                )
            except RpcError as failed:
                error = failed
            else:
                self.down_since = None
                return result
            self._check_down(error, tried)
            if error.code not in self.retryable:
                raise BackendError(
                    f"{self.name} at {error.target}: {error.code.name}: {error.details}"
                ) from error
            pause = self._pause(attempt)
            if self.clock() + pause >= deadline:
                raise BackendError(
                    f"{self.name}: no endpoint answered within the {self.policy.call_budget_seconds:.0f} s "
                    f"budget of a call; last {error.code.name}: {error.details}"
                ) from error
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    def _pause(self, attempt: int) -> float:
        """No pause before the next endpoint of a round; backoff after each full round."""
        rounds, position = divmod(attempt + 1, len(self.clients))
        if position:
            return 0.0
        return min(self.policy.max_backoff_seconds, self.policy.initial_backoff_seconds * 2 ** (rounds - 1))

    def _check_down(self, error: RpcError, tried: float) -> None:
        """ServiceUnreachable when every attempt has failed with a down code since
        `unreachable_timeout_seconds` (counted from the start of the first of them)."""
        if error.code not in DOWN_CODES:
            return
        if self.down_since is None:
            self.down_since = tried
        down_for = self.clock() - self.down_since
        if down_for > self.policy.unreachable_timeout_seconds:
            raise ServiceUnreachable(
                f"the {self.name} service ({self.targets}) has not answered for {down_for:.0f} s "
                f"(failover.unreachable_timeout_seconds = {self.policy.unreachable_timeout_seconds:.0f}); "
                f"last {error.code.name}: {error.details}"
            ) from error

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients), return_exceptions=True)


# One try per endpoint inside a client: the pool does the retrying and the moving on.
SINGLE_TRY = RetryPolicy(max_attempts=1)


class MeshRollout:
    """`application`: the Ray Serve application name when the targets are Ray Serve proxies.
    `run_id`: the learner run whose samples it asks for (rollout.proto GenerateRequest.run_id).
    `security` (here and in MeshScorer, MeshVerifier): TLS and the service's token file."""

    def __init__(
        self,
        targets: Sequence[str],
        timeout: float,
        application: str = "",
        policy: FailoverSettings | None = None,
        run_id: str = "",
        security: ClientSecurity | None = None,
    ) -> None:
        clients = [RolloutClient(t, timeout, SINGLE_TRY, application, security) for t in targets]
        self.pool = EndpointPool("rollout", clients, policy, retryable=ROLLOUT_CODES)
        self.run_id = run_id

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingSpec, min_policy_version: int
    ) -> list[Sample]:
        async def call(client: RolloutClient) -> list[Sample]:
            # A stream cut midway is retried whole elsewhere: partial samples are discarded.
            stream = client.generate(
                prompt_ids, sampling, min_policy_version=min_policy_version, run_id=self.run_id
            )
            return [sample async for sample in stream]

        return await self.pool.call(call)


class MeshScorer:
    """Scores through the PRM service; items that fail are scored once more (trainer/failover.py).
    Token ids are sent unless `check_tokenizer` found that the PRM's tokenizer differs from the
    policy's: then step texts (cli/prm_tokens.py)."""

    def __init__(
        self,
        targets: Sequence[str],
        timeout: float,
        application: str = "",
        policy: FailoverSettings | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        clients = [PrmClient(t, timeout, SINGLE_TRY, application, security) for t in targets]
        self.pool = EndpointPool("prm", clients, policy)
        self.texts: PolicySteps | None = None  # set when the PRM's tokenizer is not the policy's

    async def check_tokenizer(self, policy: PolicySteps) -> bool:
        """Compare the PRM's tokenizer with the policy's (once, at start); step texts from now on
        if they differ. Whether they agree."""
        identity = await self.pool.call(lambda client: client.describe_tokenizer())
        same = agree(policy, identity.fingerprint, self.pool.targets)
        self.texts = None if same else policy
        return same

    async def score(self, prompt_ids: list[int], responses: list[list[int]]) -> list[StepScores]:
        results = await self._score(prompt_ids, responses)
        failed = [i for i, r in enumerate(results) if r.error is not None]
        if failed:
            GRADING_FAILURES.labels("prm", "rescored").inc(len(failed))
            again = await self._score(prompt_ids, [responses[i] for i in failed])
            for index, result in zip(failed, again, strict=True):
                results[index] = result
        still = [r.error for r in results if r.error is not None]
        if still:
            GRADING_FAILURES.labels("prm", "failed").inc(len(still))
            raise BackendError(f"prm could not score {len(still)} response(s), twice: {still[0]}")
        if self.texts is None:
            return [StepScores([(s.token_start, s.token_end) for s in r.steps], r.scores) for r in results]
        spans = [self.texts.steps(r)[0] for r in responses]
        if any(len(s) != len(r.steps) for s, r in zip(spans, results, strict=True)):
            raise BackendError("prm returned another number of scores than the steps it was sent")
        return [StepScores(s, r.scores) for s, r in zip(spans, results, strict=True)]

    async def _score(self, prompt_ids: list[int], responses: list[list[int]]) -> list[ScoredResponse]:
        if self.texts is None:
            items: list = [(prompt_ids, r) for r in responses]
        else:
            prompt = self.texts.prompt_text(prompt_ids)
            items = [(prompt, Steps(tuple(self.texts.steps(r)[1]))) for r in responses]
        return await self.pool.call(lambda client: client.score(items))


class MeshVerifier:
    def __init__(
        self,
        targets: Sequence[str],
        timeout: float,
        application: str = "",
        policy: FailoverSettings | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        clients = [VerifyClient(t, timeout, SINGLE_TRY, application, security) for t in targets]
        self.pool = EndpointPool("verify", clients, policy)

    async def verify(self, responses: list[str], ground_truth: str | None) -> list[Verdict]:
        """One verdict per response; ERROR and TIMEOUT are counted (the collector treats them as
        no ground truth: trainer/failover.py)."""
        outcomes = await self.pool.call(lambda client: client.verify([(r, ground_truth) for r in responses]))
        for outcome in outcomes:
            if outcome.verdict in (Verdict.ERROR, Verdict.TIMEOUT):
                GRADING_FAILURES.labels("verify", outcome.verdict.value).inc()
        return [outcome.verdict for outcome in outcomes]
