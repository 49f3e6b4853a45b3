"""The collector: keeps prompt groups in flight and queues scored, verified groups.

Each group runs as one task: generate n samples (rollout), then score their steps (PRM) and
verify their answers (verify) concurrently. Finished groups wait in a queue. With
max_staleness = 0 the collector launches exactly the groups one step needs, so training is
synchronous and on-policy; with max_staleness = s > 0 it keeps `groups_in_flight` groups
generating while the learner updates, and drops groups more than s versions old.

Only the learner run's own samples are trained on: a group with a sample of another run, or of
a version newer than the learner's (negative staleness), is discarded, counted, and its prompt
tried again. Failures follow trainer/failover.py: a failed group is retried from its prompt up
to `max_group_attempts`, then dropped and counted; retried prompts go before new ones; a
service that stays unreachable stops training (`collect` raises ServiceUnreachable). Every
prompt and sample is written to the ledger (ledger.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from puremesh.contract.sampling import Sample, SamplingSpec
from puremesh.contract.verdict import Verdict

from . import metrics
from .backends import AnswerVerifier, BackendError, RolloutBackend, StepScorer
from .data import Problem, ProblemStream
from .failover import FailoverSettings, ServiceUnreachable
from .ledger import Key, Ledger

log = logging.getLogger(__name__)
# Verdicts of items the grader could not grade: no ground truth for that response (failover.py).
UNGRADED = frozenset({Verdict.ERROR, Verdict.TIMEOUT})


@dataclass
class ScoredGroup:
    """One prompt's responses with everything credit assignment needs."""

    problem: Problem
    prompt_ids: list[int]
    samples: list[Sample]
    steps: list[tuple[list[tuple[int, int]], list[float]]]  # per response: (spans, scores)
    verdicts: list[Verdict]
    timings: dict[str, float] = field(default_factory=dict)
    key: Key = (0, 0)  # the prompt's draw position (ledger.py)
    attempt: int = 1

    @property
    def policy_version(self) -> int:
        return min(sample.policy_version for sample in self.samples)

    @property
    def has_ground_truth(self) -> bool:
        return self.problem.answer is not None

    @property
    def ground_truth(self) -> list[bool]:
        """Per response: the problem has an answer and the grader could grade this response."""
        return [self.has_ground_truth and verdict not in UNGRADED for verdict in self.verdicts]

    @property
    def solved(self) -> list[bool]:
        return [verdict.solved for verdict in self.verdicts]


@dataclass
class CollectStats:
    dropped_stale: int = 0
    failed_groups: int = 0
    retried_groups: int = 0
    dropped_other_run: int = 0  # groups with a sample of another run or of a future version
    staleness: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Prompt:
    problem: Problem
    key: Key
    attempt: int = 1
    pause_s: float = 0.0  # before a retried attempt starts: retries never spin


class Collector:
    def __init__(
        self,
        rollout: RolloutBackend,
        scorer: StepScorer,
        verifier: AnswerVerifier,
        problems: ProblemStream,
        encode: Callable[[str], list[int]],  # question -> prompt ids
        sampling: SamplingSpec,
        *,
        groups_in_flight: int,
        max_staleness: int,
        run_id: str = "",
        ledger: Ledger | None = None,
        failover: FailoverSettings | None = None,
    ) -> None:
        self.rollout, self.scorer, self.verifier = rollout, scorer, verifier
        self.problems = problems
        self.encode = encode
        self.sampling = sampling
        self.groups_in_flight = groups_in_flight
        self.max_staleness = max_staleness
        self.run_id = run_id
        self.ledger = ledger
        policy = failover or FailoverSettings()
        self.max_attempts = policy.max_group_attempts
        self.backoff = (policy.initial_backoff_seconds, policy.max_backoff_seconds)
        self.version = 0  # the learner's current policy version
        self._ready: asyncio.Queue[ScoredGroup | None] = asyncio.Queue()
        self._tasks: dict[asyncio.Task, _Prompt] = {}
        self._running = 0  # groups launched whose result is not queued yet
        self._retry: list[_Prompt] = []
        self._fatal: BaseException | None = None
        self.stats = CollectStats()

    async def collect(self, groups: int, version: int) -> tuple[list[ScoredGroup], CollectStats]:
        """The next `groups` usable groups for a learner at policy `version`."""
        self.version = version
        self.stats = CollectStats()
        if self.ledger is not None:
            self.ledger.step += 1
        out: list[ScoredGroup] = []
        while len(out) < groups:
            self._top_up(groups - len(out))
            group = await self._ready.get()
            if self._fatal is not None:
                raise self._fatal
            if group is not None and self._usable(group):
                self.stats.staleness.append(version - group.policy_version)
                self._note("used", group.key, attempt=group.attempt, version=version)
                out.append(group)
        if self.max_staleness > 0:
            self._fill()  # keep generating while the learner updates
        return out, self.stats

    def _top_up(self, missing: int) -> None:
        if self.max_staleness == 0:
            # Synchronous: launch exactly what this step still lacks, nothing more.
            pending = self._running + self._ready.qsize()
            for _ in range(max(0, min(missing - pending, self.groups_in_flight - self._running))):
                self._launch()
        else:
            self._fill()

    def _usable(self, group: ScoredGroup) -> bool:
        """Whether to train on `group`; if not, it is discarded (ledger) and counted."""
        version = self.version
        if any(not self._of_this_run(s) or s.policy_version > version for s in group.samples):
            self.stats.dropped_other_run += 1
            metrics.DROPPED_SAMPLES.labels("other_run").inc(len(group.samples))
            self._note("discarded", group.key, attempt=group.attempt, reason="other_run")
            prompt = _Prompt(group.problem, group.key, group.attempt)
            if not self._requeue(prompt, "a sample of another run or a newer version"):
                self._note("abandoned", group.key, reason="other_run")
            return False
        if version - group.policy_version > self.max_staleness:
            self.stats.dropped_stale += 1
            self._note("discarded", group.key, attempt=group.attempt, reason="stale")
            self._note("abandoned", group.key, reason="stale")
            return False
        return True

    def _of_this_run(self, sample: Sample) -> bool:
        """A sample of the learner's run, or of the weights from disk (version 0, no run): the
        policy a fresh run starts from."""
        return sample.run_id == self.run_id or (sample.run_id == "" and sample.policy_version == 0)

    async def close(self) -> None:
        """Cancel the groups in flight; they and the finished groups nobody took are given up."""
        for task in self._tasks:
            task.cancel()
        ended = [prompt.key for prompt in self._tasks.values()]
        while not self._ready.empty():
            group = self._ready.get_nowait()
            if group is not None:
                self._note("discarded", group.key, attempt=group.attempt, reason="run ended")
                ended.append(group.key)
        for key in ended:
            self._note("abandoned", key, reason="run ended")
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.ledger is not None:
            self.ledger.close()

    def _fill(self) -> None:
        while self._running < self.groups_in_flight:
            self._launch()

    def _launch(self) -> None:
        if self._retry:
            prompt = self._retry.pop(0)
        else:
            key = self.problems.position
            prompt = _Prompt(self.problems.next_batch(1)[0], key)
            self._note("drawn", key)
        self._running += 1
        task = asyncio.create_task(self._run(prompt))
        self._tasks[task] = prompt
        task.add_done_callback(lambda done: self._tasks.pop(done, None))

    async def _run(self, prompt: _Prompt) -> None:
        try:
            await asyncio.sleep(prompt.pause_s)
            group = await self._group(prompt)
        except ServiceUnreachable as error:
            self._stop(error)
        except BackendError as error:
            self._fail(prompt, f"{error}")
        except Exception as error:
            log.exception("unexpected failure in a group")
            self._fail(prompt, f"{type(error).__name__}: {error}", final=True)
        else:
            self._finish(group)

    def _finish(self, group: ScoredGroup | None) -> None:
        self._running -= 1
        self._ready.put_nowait(group)

    def _stop(self, error: ServiceUnreachable) -> None:
        """A service stayed unreachable: `collect` raises `error` (training stops)."""
        if self._fatal is None:
            log.error("%s; stopping training", error)
            self._fatal = error
        self._finish(None)

    def _fail(self, prompt: _Prompt, reason: str, final: bool = False) -> None:
        if not self._requeue(prompt, reason, final):
            log.error("group failed %d times (%s); prompt dropped", prompt.attempt, reason)
            self.stats.failed_groups += 1
            self._note("abandoned", prompt.key, reason="failed")
        self._finish(None)

    def _requeue(self, prompt: _Prompt, reason: str, final: bool = False) -> bool:
        """Retry `prompt`'s group unless it had its attempts; whether it was requeued."""
        if final or prompt.attempt >= self.max_attempts:
            return False
        log.warning("group failed (%s); its prompt will be retried (attempt %d)", reason, prompt.attempt + 1)
        pause = min(self.backoff[1], self.backoff[0] * 2 ** (prompt.attempt - 1))
        self._retry.append(_Prompt(prompt.problem, prompt.key, prompt.attempt + 1, pause))
        self.stats.retried_groups += 1
        return True

    def _note(self, event: str, key: Key, **fields) -> None:
        if self.ledger is not None:
            self.ledger.write(event, key, **fields)

    async def _group(self, prompt: _Prompt) -> ScoredGroup:
        problem = prompt.problem
        prompt_ids = self.encode(problem.question)  # the prompt template rendered and tokenised
        began = time.perf_counter()
        # On-policy runs ask for the learner's version; stale-tolerant runs accept older replicas.
        min_version = max(0, self.version - self.max_staleness)
        samples = await self.rollout.generate(prompt_ids, self.sampling, min_version)
        generated = time.perf_counter()
        self._note(
            "generated",
            prompt.key,
            attempt=prompt.attempt,
            samples=[[s.sample_index, s.policy_version, s.run_id] for s in samples],
        )
        try:
            (steps, score_s), (verdicts, verify_s) = await asyncio.gather(
                _timed(self.scorer.score(prompt_ids, [s.token_ids for s in samples])),
                _timed(self.verifier.verify([s.text for s in samples], problem.answer)),
            )
        except BaseException as error:
            reason = type(error).__name__ if isinstance(error, Exception) else "cancelled"
            self._note("discarded", prompt.key, attempt=prompt.attempt, reason=reason)
            raise
        return ScoredGroup(
            problem=problem,
            prompt_ids=prompt_ids,
            samples=samples,
            steps=[(s.spans, s.scores) for s in steps],
            verdicts=verdicts,
            timings={"generate": generated - began, "score": score_s, "verify": verify_s},
            key=prompt.key,
            attempt=prompt.attempt,
        )


async def _timed(work):
    began = time.perf_counter()
    result = await work
    return result, time.perf_counter() - began
