"""The learner's failure policy, written once (README points here), and its settings.

Calls. Every service call (cli/adapters.py `EndpointPool`) has a deadline per attempt
(`endpoints.call_timeout_seconds`) and a total budget across attempts (`call_budget_seconds`).
It moves to the next endpoint, with backoff, only on codes after which the same request may
succeed elsewhere or later: UNAVAILABLE and RESOURCE_EXHAUSTED, and for rollout ABORTED (a
replica that does not hold the learner's run and version yet). DEADLINE_EXCEEDED and CANCELLED
are not retried: a hung service would cost a deadline per attempt. A service whose every
attempt fails with UNAVAILABLE or DEADLINE_EXCEEDED for `unreachable_timeout_seconds` (no
success in between) stops training with `ServiceUnreachable`, one line naming the service and
its endpoints. The launcher (cli/launcher.py) restarts a local service that died well within
that time, so a crash costs a few retries, not a prompt.

Groups. A group (one prompt's samples, scores and verdicts, trainer/collector.py) whose call
failed for good is retried from its prompt, after the retries its calls already made, up to
`max_group_attempts` in all; then it is dropped and counted
(`puremesh_learner_dropped_samples_total{reason="failed"}`). Retrying from the prompt rather
than from the samples keeps every group on one policy version; the bound keeps one poisonous
prompt from costing more than a few attempts. A failed prompt is retried before any new prompt
is drawn, and a stopped service stops training, so an outage never burns the prompt stream.

Grading failures are not rewards:
- verify: an item the grader could not grade (ERROR, TIMEOUT) counts as having no ground
  truth: its response gets a verifiable reward of 0, exactly like a prompt without an answer,
  never -1 (`puremesh_learner_grading_failures_total{service="verify"}`);
- PRM: a response whose steps could not be scored is scored again, alone, in one more call;
  if that fails too, its group fails (and is retried as above): PURE's returns need every
  step's score, and dropping the response would bias its group's baseline towards the responses
  the PRM could score (`puremesh_learner_grading_failures_total{service="prm"}`).
"""

from __future__ import annotations

from prometheus_client import Counter
from pydantic import Field

from puremesh.rpc.settings import FrozenSettings

from .backends import BackendError

GRADING_FAILURES = Counter(
    "puremesh_learner_grading_failures_total",
    "Items a grading service could not grade (never turned into rewards; see trainer/failover.py)",
    ["service", "kind"],  # verify: error | timeout; prm: rescored | failed
)


class FailoverSettings(FrozenSettings):
    """`learner.endpoints.failover`: the bounds of the policy above."""

    call_budget_seconds: float = Field(
        900.0, gt=0, description="total time of one service call across its attempts and endpoints"
    )
    unreachable_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="a service whose every attempt fails (UNAVAILABLE or DEADLINE_EXCEEDED) this long "
        "stops training with one error naming it",
    )
    initial_backoff_seconds: float = Field(0.2, gt=0, description="first pause after a failed round")
    max_backoff_seconds: float = Field(5.0, gt=0, description="longest pause between rounds")
    max_group_attempts: int = Field(
        3, ge=1, description="attempts of one prompt's group before it is dropped"
    )


class ServiceUnreachable(BackendError):
    """A service answered nothing but failures for unreachable_timeout_seconds: training stops."""
