"""The collector: keeps prompt groups in flight and queues scored, verified groups.

Each group runs as one task: generate n samples (rollout), then score their steps (PRM) and
verify their answers (verify) concurrently. Finished groups wait in a queue. With
max_staleness = 0 the collector launches exactly the groups one step needs, so training is
synchronous and on-policy; with max_staleness = s > 0 it keeps `groups_in_flight` groups
generating while the learner updates, and drops groups more than s versions old.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from puremesh.contract.sampling import Sample, SamplingSpec
from puremesh.contract.verdict import Verdict

from .backends import AnswerVerifier, BackendError, RolloutBackend, StepScorer
from .data import Problem, ProblemStream, format_prompt

log = logging.getLogger(__name__)
MAX_ATTEMPTS_PER_PROBLEM = 3


@dataclass
class ScoredGroup:
    """One prompt's responses with everything credit assignment needs."""

    problem: Problem
    prompt_ids: list[int]
    samples: list[Sample]
    steps: list[tuple[list[tuple[int, int]], list[float]]]  # per response: (spans, scores)
    verdicts: list[Verdict]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def policy_version(self) -> int:
        return min(sample.policy_version for sample in self.samples)

    @property
    def has_ground_truth(self) -> bool:
        return self.problem.answer is not None

    @property
    def solved(self) -> list[bool]:
        return [verdict.solved for verdict in self.verdicts]


@dataclass
class CollectStats:
    dropped_stale: int = 0
    failed_groups: int = 0
    retried_groups: int = 0
    staleness: list[int] = field(default_factory=list)


class Collector:
    def __init__(
        self,
        rollout: RolloutBackend,
        scorer: StepScorer,
        verifier: AnswerVerifier,
        problems: ProblemStream,
        encode: Callable[[str], list[int]],
        sampling: SamplingSpec,
        *,
        groups_in_flight: int,
        max_staleness: int,
    ) -> None:
        self.rollout, self.scorer, self.verifier = rollout, scorer, verifier
        self.problems = problems
        self.encode = encode
        self.sampling = sampling
        self.groups_in_flight = groups_in_flight
        self.max_staleness = max_staleness
        self.version = 0  # the learner's current policy version
        self._ready: asyncio.Queue[ScoredGroup | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._running = 0  # groups launched whose result is not queued yet
        self._retry: list[tuple[Problem, int]] = []
        self.stats = CollectStats()

    async def collect(self, groups: int, version: int) -> tuple[list[ScoredGroup], CollectStats]:
        """The next `groups` usable groups for a learner at policy `version`."""
        self.version = version
        self.stats = CollectStats()
        out: list[ScoredGroup] = []
        while len(out) < groups:
            if self.max_staleness == 0:
                # Synchronous: launch exactly what this step still lacks, nothing more.
                pending = self._running + self._ready.qsize()
                missing = groups - len(out) - pending
                for _ in range(max(0, min(missing, self.groups_in_flight - self._running))):
                    self._launch()
            else:
                self._fill()
            group = await self._ready.get()
            if group is None:  # a group failed for good; its problem was requeued or dropped
                continue
            staleness = version - group.policy_version
            if staleness > self.max_staleness:
                self.stats.dropped_stale += 1
                continue
            self.stats.staleness.append(staleness)
            out.append(group)
        if self.max_staleness > 0:
            self._fill()  # keep generating while the learner updates
        return out, self.stats

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _fill(self) -> None:
        while self._running < self.groups_in_flight:
            self._launch()

    def _launch(self) -> None:
        problem, attempt = self._retry.pop(0) if self._retry else (self.problems.next_batch(1)[0], 1)
        self._running += 1
        task = asyncio.create_task(self._run(problem, attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, problem: Problem, attempt: int) -> None:
        try:
            await self._finish(await self._group(problem))
        except BackendError as error:
            await self._fail(problem, attempt, f"{error}")
        except Exception as error:
            log.exception("unexpected failure in a group")
            await self._fail(problem, MAX_ATTEMPTS_PER_PROBLEM, f"{type(error).__name__}: {error}")

    async def _finish(self, group: ScoredGroup | None) -> None:
        self._running -= 1
        self._ready.put_nowait(group)

    async def _fail(self, problem: Problem, attempt: int, reason: str) -> None:
        if attempt < MAX_ATTEMPTS_PER_PROBLEM:
            log.warning("group failed (%s); its prompt will be retried (attempt %d)", reason, attempt + 1)
            self._retry.append((problem, attempt + 1))
            self.stats.retried_groups += 1
        else:
            log.error("group failed %d times (%s); prompt dropped", attempt, reason)
            self.stats.failed_groups += 1
        await self._finish(None)

    async def _group(self, problem: Problem) -> ScoredGroup:
        prompt_ids = self.encode(format_prompt(problem.question))
        began = time.perf_counter()
        # On-policy runs ask for the learner's version; stale-tolerant runs accept older replicas.
        min_version = max(0, self.version - self.max_staleness)
        samples = await self.rollout.generate(prompt_ids, self.sampling, min_version)
        generated = time.perf_counter()

        async def score():
            began = time.perf_counter()
            result = await self.scorer.score(prompt_ids, [s.token_ids for s in samples])
            return result, time.perf_counter() - began

        async def verify():
            began = time.perf_counter()
            result = await self.verifier.verify([s.text for s in samples], problem.answer)
            return result, time.perf_counter() - began

        (steps, score_seconds), (verdicts, verify_seconds) = await asyncio.gather(score(), verify())
        return ScoredGroup(
            problem=problem,
            prompt_ids=prompt_ids,
            samples=samples,
            steps=[(s.spans, s.scores) for s in steps],
            verdicts=verdicts,
            timings={"generate": generated - began, "score": score_seconds, "verify": verify_seconds},
        )
