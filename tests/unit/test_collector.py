"""The collector in isolation (test doubles for the services; the integration tests run the same
path against the real mesh): synchronous and stale-tolerant collection, retries, no sample twice."""

from __future__ import annotations

import asyncio

import pytest

from puremesh.contract.sampling import FinishReason, Sample, SamplingSpec
from puremesh.contract.verdict import Verdict
from puremesh.trainer.backends import BackendError, StepScores
from puremesh.trainer.collector import Collector
from puremesh.trainer.data import Problem, ProblemStream


class FakeRollout:
    def __init__(self, fail_first: int = 0) -> None:
        self.version = 0
        self.calls = 0
        self.fail_first = fail_first
        self.prompts: list[tuple[int, ...]] = []

    async def generate(self, prompt_ids, sampling, min_policy_version):
        self.calls += 1
        call = self.calls
        await asyncio.sleep(0.001)
        if call <= self.fail_first:
            raise BackendError("rollout: every endpoint failed")
        self.prompts.append(tuple(prompt_ids))
        return [
            Sample(
                sample_index=i,
                token_ids=[1, 2, 3],
                logprobs=[-0.1] * 3,
                finish_reason=FinishReason.STOP,
                policy_version=self.version,
                prompt_token_count=len(prompt_ids),
                text=f"\\boxed{{{i}}}",
            )
            for i in range(sampling.n)
        ]


class FakeScorer:
    async def score(self, prompt_ids, responses):
        return [StepScores([(0, len(r))], [0.5]) for r in responses]


class FakeVerifier:
    async def verify(self, responses, ground_truth):
        return [
            Verdict.CORRECT if ground_truth and ground_truth in r else Verdict.INCORRECT for r in responses
        ]


def collector(rollout, max_staleness=0, in_flight=4, problems=20):
    stream = ProblemStream([Problem(f"q{i}", str(i % 2)) for i in range(problems)], seed=0)
    return Collector(
        rollout,
        FakeScorer(),
        FakeVerifier(),
        stream,
        lambda text: [ord(c) for c in text],
        SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8),
        groups_in_flight=in_flight,
        max_staleness=max_staleness,
    )


async def test_synchronous_collection_launches_exactly_what_a_step_needs():
    rollout = FakeRollout()
    c = collector(rollout)
    groups, stats = await c.collect(4, version=0)
    assert len(groups) == 4 and rollout.calls == 4 and c._running == 0
    assert all(len(g.samples) == 2 and g.verdicts for g in groups)
    # Sample i says \boxed{i}; a problem's answer is its index mod 2: exactly one sample solves it.
    assert all(g.solved == [g.problem.answer == str(i) for i in range(2)] for g in groups)
    assert stats.dropped_stale == 0 and stats.staleness == [0] * 4
    groups, _ = await c.collect(3, version=0)
    assert rollout.calls == 7 and len(set(rollout.prompts)) == 7  # no prompt used twice


async def test_failed_groups_are_retried_and_then_dropped():
    rollout = FakeRollout(fail_first=2)
    c = collector(rollout)
    groups, stats = await c.collect(4, version=0)
    assert len(groups) == 4 and stats.retried_groups == 2 and stats.failed_groups == 0
    # the failed prompts came back: every prompt that produced a group is distinct
    assert len({tuple(g.prompt_ids) for g in groups}) == 4
    assert rollout.calls == 6


async def test_stale_groups_are_dropped_and_counted():
    rollout = FakeRollout()
    c = collector(rollout, max_staleness=1, in_flight=4)
    groups, _ = await c.collect(2, version=0)
    assert len(groups) == 2
    await asyncio.sleep(0.05)  # groups keep generating (version 0) while the "learner" updates
    rollout.version = 2
    groups, stats = await c.collect(4, version=2)
    assert stats.dropped_stale >= 1
    assert all(2 - g.policy_version <= 1 for g in groups)
    await c.close()


@pytest.mark.parametrize("staleness", [0, 1])
async def test_close_cancels_in_flight_groups(staleness):
    c = collector(FakeRollout(), max_staleness=staleness)
    await c.collect(1, version=0)
    await c.close()
    assert not c._tasks
