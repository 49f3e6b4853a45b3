"""The held-out evaluation: greedy accuracy of the rollout replicas' current policy, graded by the
verify service (through trainer.backends' protocols on the loop's Mesh), and every output kept:
`write_outputs` writes one JSON line per problem (question, answer, text, solved) into
OUT/heldout/step-N.jsonl, so that what a run learnt can be read, not only counted."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from puremesh.contract.sampling import SamplingSpec

from .data import Problem

EVAL_CONCURRENCY = 64
OUTPUTS_DIR = "heldout"  # under the run's out_dir


@dataclass(frozen=True)
class Output:
    question: str
    answer: str
    text: str
    solved: bool


async def evaluate(mesh, problems: list[Problem], encode, max_new_tokens: int, version: int):
    """Greedy accuracy on `problems` (the rollout replicas hold `version`): (accuracy, stderr,
    outputs), one Output per problem in order. `encode`: question -> prompt ids (the learner's
    prompt template)."""
    greedy = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    gate = asyncio.Semaphore(EVAL_CONCURRENCY)

    async def one(problem: Problem) -> Output:
        async with gate:
            [sample] = await mesh.rollout.generate(encode(problem.question), greedy, version)
            [verdict] = await mesh.verifier.verify([sample.text], problem.answer)
            return Output(problem.question, problem.answer, sample.text, bool(verdict.solved))

    outputs = await asyncio.gather(*(one(p) for p in problems))
    accuracy = sum(o.solved for o in outputs) / len(outputs)
    return accuracy, math.sqrt(accuracy * (1 - accuracy) / len(outputs)), list(outputs)


def outputs_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / OUTPUTS_DIR / f"step-{step:06d}.jsonl"


def write_outputs(out_dir: str | Path, step: int, outputs: list[Output]) -> Path:
    """OUT/heldout/step-N.jsonl: one line per output (written whole, then renamed into place)."""
    path = outputs_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(asdict(o)) + "\n" for o in outputs), encoding="utf-8")
    partial.replace(path)
    return path


def read_outputs(out_dir: str | Path, step: int) -> list[Output]:
    """The outputs `write_outputs` wrote for `step`."""
    lines = outputs_path(out_dir, step).read_text(encoding="utf-8").splitlines()
    return [Output(**json.loads(line)) for line in lines if line.strip()]


async def evaluate_kept(learner, mesh) -> tuple[float, float]:
    """`evaluate` on the learner's held-out problems at its current step and version, the
    outputs kept in its out_dir (`write_outputs`): (accuracy, stderr)."""
    settings = learner.settings
    accuracy, stderr, outputs = await evaluate(
        mesh, learner.heldout, learner.encode, settings.eval.max_new_tokens, learner.version
    )
    write_outputs(settings.out_dir, learner.step, outputs)
    return accuracy, stderr
