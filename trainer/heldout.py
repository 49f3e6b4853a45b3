"""The held-out evaluation: greedy accuracy of the rollout replicas' current policy, graded by the
verify service (through trainer.backends' protocols on the loop's Mesh)."""

from __future__ import annotations

import asyncio
import math

from puremesh.contract.sampling import SamplingSpec

from .data import Problem

EVAL_CONCURRENCY = 64


async def evaluate(mesh, problems: list[Problem], encode, max_new_tokens: int, version: int):
    """Greedy accuracy on `problems` (the rollout replicas hold `version`): (accuracy, stderr).
    `encode`: question -> prompt ids (the learner's prompt template)."""
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    gate = asyncio.Semaphore(EVAL_CONCURRENCY)

    async def one(problem: Problem) -> bool:
        async with gate:
            [sample] = await mesh.rollout.generate(encode(problem.question), greedy, version)
            [verdict] = await mesh.verifier.verify([sample.text], problem.answer)
            return verdict.solved

    correct = await asyncio.gather(*(one(p) for p in problems))
    accuracy = sum(correct) / len(correct)
    return accuracy, math.sqrt(accuracy * (1 - accuracy) / len(correct))
