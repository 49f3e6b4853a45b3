"""What the learner needs from the mesh, as plain-Python protocols over the contract's values
(contract/sampling.py: SamplingSpec and Sample; contract/verdict.py: Verdict).

trainer/ never imports services/ (ARCHITECTURE.md rule 2): the composition root (cli/adapters.py)
adapts the services' gRPC clients to these protocols, including fail-over between endpoints.
Tests may plug in doubles to isolate the learner; the integration tests use the real mesh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from puremesh.contract.sampling import Sample, SamplingSpec
from puremesh.contract.verdict import Verdict


@dataclass(frozen=True)
class StepScores:
    """PRM result for one response: half-open token spans of its steps and one score per step."""

    spans: list[tuple[int, int]]
    scores: list[float]


class BackendError(Exception):
    """A call failed on every endpoint it was tried on (after bounded retries)."""


class RolloutBackend(Protocol):
    async def generate(
        self, prompt_ids: list[int], sampling: SamplingSpec, min_policy_version: int
    ) -> list[Sample]:
        """All n samples of one prompt, from one policy version >= min_policy_version."""
        ...


class StepScorer(Protocol):
    async def score(self, prompt_ids: list[int], responses: list[list[int]]) -> list[StepScores]:
        """Per-step PRM scores of each response (token ids in the policy's vocabulary)."""
        ...


class AnswerVerifier(Protocol):
    async def verify(self, responses: list[str], ground_truth: str | None) -> list[Verdict]:
        """One verdict per response (Verdict.ERROR for a response that could not be graded)."""
        ...
