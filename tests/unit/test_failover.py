"""The failure policy of trainer/failover.py: bounded fail-over in cli/adapters.py (against real
gRPC servers and a dead port on loopback), and the collector's side with test doubles for the
services (tests/robustness/test_chaos.py runs the same paths against the real mesh): retries up
to a bound, samples of another run, grading failures that are not rewards, a service that stays
down stopping training without burning prompts, and the ledger that accounts for it all."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest

from puremesh.cli.adapters import EndpointPool, MeshScorer, MeshVerifier
from puremesh.contract.sampling import FinishReason, Sample, SamplingSpec
from puremesh.contract.verdict import Verdict
from puremesh.rpc.errors import InvalidArgument
from puremesh.rpc.server import ServiceDefinition, ServiceHost
from puremesh.rpc.settings import ServerSettings
from puremesh.services.verify.client import VerifyClient
from puremesh.trainer.algo.advantages import verifiable_advantage
from puremesh.trainer.backends import BackendError, StepScores
from puremesh.trainer.collector import Collector
from puremesh.trainer.data import Problem, ProblemStream, format_prompt
from puremesh.trainer.failover import FailoverSettings, ServiceUnreachable
from puremesh.trainer.ledger import Ledger, audit
from puremesh.trainer.update import build_experience
from puremesh.verify.v1 import verify_pb2_grpc

FAST = FailoverSettings(
    call_budget_seconds=2.0,
    unreachable_timeout_seconds=0.6,
    initial_backoff_seconds=0.05,
    max_backoff_seconds=0.1,
    max_group_attempts=3,
)


def dead_target() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


class Scripted(verify_pb2_grpc.VerifyServiceServicer):
    """A verify servicer that fails as told: `mode` "invalid" or "hang"."""

    def __init__(self, mode: str) -> None:
        self.mode, self.calls = mode, 0

    async def Verify(self, request, context):
        self.calls += 1
        if self.mode == "hang":
            await asyncio.sleep(5)
        raise InvalidArgument("no")


@pytest.fixture
async def scripted():
    hosts = []

    async def start(mode: str) -> tuple[str, Scripted]:
        servicer = Scripted(mode)
        definition = ServiceDefinition(
            "verify",
            "puremesh.verify.v1.VerifyService",
            servicer,
            verify_pb2_grpc.add_VerifyServiceServicer_to_server,
        )
        host = ServiceHost([definition], ServerSettings(metrics_port=None))
        await host.start()
        hosts.append(host)
        return host.target, servicer

    yield start
    for host in hosts:
        await host.drain(grace=0)


async def test_a_service_that_stays_down_stops_with_one_error_naming_it() -> None:
    verifier = MeshVerifier([dead_target(), dead_target()], timeout=1.0, policy=FAST)
    began = time.monotonic()
    with pytest.raises(ServiceUnreachable, match=r"the verify service \(127.0.0.1:\d+, 127.0.0.1:\d+\)"):
        for _ in range(10):
            try:
                await verifier.verify(["x"], "1")
            except ServiceUnreachable:
                raise
            except BackendError:
                continue
    assert time.monotonic() - began < 3 * FAST.call_budget_seconds
    await verifier.pool.close()


async def test_non_retryable_codes_fail_at_once_and_deadlines_are_not_retried(scripted) -> None:
    target, servicer = await scripted("invalid")
    pool = EndpointPool("verify", [VerifyClient(target, 5.0)], FAST)
    with pytest.raises(BackendError, match="INVALID_ARGUMENT"):
        await pool.call(lambda client: client.verify([("x", "1")]))
    assert servicer.calls == 1
    target, servicer = await scripted("hang")
    pool = EndpointPool(
        "verify", [VerifyClient(target, 0.3)], FAST.model_copy(update={"unreachable_timeout_seconds": 60})
    )
    with pytest.raises(BackendError, match="DEADLINE_EXCEEDED"):
        await pool.call(lambda client: client.verify([("x", "1")]))
    assert servicer.calls == 1  # a hung service is not asked again within the call


async def test_a_call_never_outlives_its_budget() -> None:
    pool = EndpointPool(
        "verify",
        [VerifyClient(dead_target(), 1.0)],
        FAST.model_copy(update={"unreachable_timeout_seconds": 60}),
    )
    began = time.monotonic()
    with pytest.raises(BackendError, match="budget"):
        await pool.call(lambda client: client.verify([("x", "1")]))
    assert FAST.call_budget_seconds * 0.8 < time.monotonic() - began < FAST.call_budget_seconds + 1


# ---------------------------------------------------------------------- the collector's side


class Rollout:
    """Samples of version `version` and run `run`; fails every call for the prompt `poison`."""

    def __init__(self, run: str = "run-a", poison: str = "") -> None:
        self.version, self.run, self.poison, self.calls = 0, run, poison, 0

    async def generate(self, prompt_ids, sampling, min_policy_version):
        self.calls += 1
        await asyncio.sleep(0.001)
        if self.poison and f"Question: {self.poison}\n" in "".join(map(chr, prompt_ids)):
            raise BackendError("rollout: this prompt fails")
        return [
            Sample(
                i,
                [1, 2],
                [-0.1, -0.1],
                FinishReason.STOP,
                self.version,
                len(prompt_ids),
                f"\\boxed{{{i}}}",
                self.run,
            )
            for i in range(sampling.n)
        ]


class Scorer:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    async def score(self, prompt_ids, responses):
        if self.error is not None:
            raise self.error
        return [StepScores([(0, len(r))], [0.5]) for r in responses]


class Verifier:
    def __init__(self, verdicts=(Verdict.CORRECT, Verdict.ERROR)) -> None:
        self.verdicts = verdicts

    async def verify(self, responses, ground_truth):
        return list(self.verdicts)[: len(responses)]


def make(rollout, scorer=None, verifier=None, ledger=None, problems=20) -> Collector:
    stream = ProblemStream([Problem(f"q{i}", str(i % 2)) for i in range(problems)], seed=0)
    return Collector(
        rollout, scorer or Scorer(), verifier or Verifier(), stream,
        lambda q: [ord(c) for c in format_prompt(q)],
        SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8),
        groups_in_flight=4, max_staleness=0, run_id="run-a", ledger=ledger, failover=FAST,
    )  # fmt: skip


async def test_samples_of_another_run_or_a_newer_version_are_never_trained_on(tmp_path) -> None:
    ledger = Ledger.open(tmp_path, None)
    rollout = Rollout(run="run-old")
    collector = make(rollout, ledger=ledger)
    task = asyncio.create_task(collector.collect(2, version=0))
    await asyncio.sleep(0.05)
    assert not task.done() and collector.stats.dropped_other_run >= 2  # an old run's replicas
    rollout.run = "run-a"
    rollout.version = 3  # newer than the learner: negative staleness
    await asyncio.sleep(0.05)
    assert not task.done()
    rollout.version = 0
    groups, _ = await task
    assert all(s.run_id == "run-a" and s.policy_version == 0 for g in groups for s in g.samples)
    await collector.close()
    result = audit(ledger.path, "run-a")
    assert result.samples_lost == result.samples_used_twice == result.wrong_versions == 0
    assert result.samples_used == 4 and result.samples_dropped >= 8


async def test_grading_failures_are_no_ground_truth_not_rewards() -> None:
    verifier = Verifier((Verdict.CORRECT, Verdict.TIMEOUT))
    collector = make(Rollout(), verifier=verifier)
    [group], _ = await collector.collect(1, version=0)
    assert group.has_ground_truth and group.ground_truth == [True, False]
    assert group.solved == [True, False]
    await collector.close()
    # what the update sees: the timed-out response has no ground truth (VR 0), not a wrong answer
    experience = build_experience([group], pad_id=0, version=0)
    assert experience.has_ground_truth.tolist() == [True, False]
    assert verifiable_advantage(
        experience.solved, experience.has_ground_truth, experience.group_index
    ).tolist() == [
        0.0,
        0.0,
    ]


async def test_failed_groups_are_retried_then_dropped_and_counted(tmp_path) -> None:
    ledger = Ledger.open(tmp_path, None)
    first = ProblemStream([Problem(f"q{i}", str(i % 2)) for i in range(20)], seed=0).next_batch(1)[0]
    collector = make(Rollout(poison=first.question), ledger=ledger)  # the first prompt always fails
    groups, stats = await collector.collect(3, version=0)
    assert len(groups) == 3 and stats.failed_groups == 1 and stats.retried_groups == 2
    await collector.close()
    result = audit(ledger.path, "run-a")
    assert result.prompts_abandoned == 1 and result.prompts_used == 3 and not result.prompts_lost


async def test_an_unreachable_service_stops_training_without_burning_prompts() -> None:
    collector = make(Rollout(), scorer=Scorer(ServiceUnreachable("the prm service (x) has not answered")))
    with pytest.raises(ServiceUnreachable, match="prm service"):
        await collector.collect(4, version=0)
    assert collector.problems.position == (0, 4)  # the step's four prompts, no more
    await collector.close()


async def test_the_scorer_rescores_failed_items_once(monkeypatch) -> None:
    from puremesh.services.prm.client import ScoredResponse, StepScore

    scorer = MeshScorer([dead_target()], timeout=1.0, policy=FAST)
    replies = [
        [ScoredResponse([StepScore(0.5, 0, 2, "a")]), ScoredResponse([], "forward pass failed")],
        [ScoredResponse([StepScore(0.1, 0, 2, "b")])],
    ]
    calls = []

    async def call(operation):
        calls.append(operation)
        return list(replies[len(calls) - 1])

    monkeypatch.setattr(scorer.pool, "call", call)
    scores = await scorer.score([1], [[1, 2], [3, 4]])
    assert [s.scores for s in scores] == [[0.5], [0.1]] and len(calls) == 2
    replies[1] = [ScoredResponse([], "still failing")]
    calls.clear()
    with pytest.raises(BackendError, match="twice"):
        await scorer.score([1], [[1, 2], [3, 4]])
    await scorer.pool.close()


def test_the_ledger_rolls_back_to_the_checkpoint(tmp_path) -> None:
    ledger = Ledger.open(tmp_path, None)
    for step in (1, 2, 3):
        ledger.step = step
        ledger.write("drawn", (0, step))
        ledger.write("generated", (0, step), attempt=1, samples=[[0, step - 1, "r"]])
        ledger.write("used", (0, step), attempt=1, version=step - 1)
    ledger.close()
    resumed = Ledger.open(tmp_path, 2)  # the checkpoint of step 2: step 3 is done again
    resumed.close()
    result = audit(resumed.path, "r")
    assert result.groups_per_step == {1: 1, 2: 1} and result.samples_used == 2
    assert (tmp_path / "ledger.rolled-back.jsonl").read_text().count('"step": 3') == 3
    Ledger.open(tmp_path, None).close()  # a fresh run keeps the old ledger aside
    assert (tmp_path / "ledger.1.jsonl").exists() and (tmp_path / "ledger.jsonl").read_text() == ""


def test_codes_the_pool_retries_are_only_the_retryable_ones() -> None:
    from puremesh.cli.adapters import DOWN_CODES, ROLLOUT_CODES

    assert grpc.StatusCode.DEADLINE_EXCEEDED not in ROLLOUT_CODES
    assert grpc.StatusCode.CANCELLED not in ROLLOUT_CODES
    assert {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    } == ROLLOUT_CODES
    assert {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED} == DOWN_CODES
