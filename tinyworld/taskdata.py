"""The tiny world's data files, the tokenizer's corpus and the arithmetic drills.

`build_task` writes TaskFiles from the problems of task.py and the solutions of solutions.py,
deterministic in its seed. The held-out problems are drawn first, with pairwise distinct
arithmetic contents, and no train problem shares a content with any of them (task.py's
docstring says what content means), so the held-out set measures solving, not recall.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puremesh.supervised.sft import Row
from puremesh.trainer.data import format_prompt

from .corpus import NEWLINE, apply_op, synthetic_corpus
from .solutions import task_solution
from .task import (
    ADD_OPERAND,
    DEFAULT_SHAPE,
    MUL_OPERANDS,
    TASK_MAX_VALUE,
    TASK_MIN_VALUE,
    TaskShape,
    task_problem,
    unique_problems,
)

TASK_CORPUS_SIZE = 3000  # task problems in the tokenizer's corpus (`task_corpus`)
CORPUS_SLIP_RATE = 0.5
CORPUS_ERROR_RATE = 0.1
CORPUS_PAD_RATE = 0.3
CORPUS_DRILL_FACTS = 4


@dataclass(frozen=True)
class TaskSpec:
    """What the data files are made of: the problems' shape, and how often the solutions of each
    file slip, err and pad (solutions.task_solution)."""

    sft_slip_rate: float
    sft_pad_rate: float
    prm_slip_rate: float
    prm_error_rate: float
    prm_pad_rate: float
    shape: TaskShape = DEFAULT_SHAPE


@dataclass(frozen=True)
class TaskFiles:
    train: Path  # question, answer (PPO prompts)
    heldout: Path  # question, answer (evaluation; contents disjoint from every other file)
    sft: Path  # prompt, solution, correct, pads (policy SFT)
    prm: Path  # prompt, steps, labels (PRM training, on the train questions)
    prm_heldout: Path  # prompt, steps, labels (PRM evaluation, on the held-out questions)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def build_task(out_dir: str | Path, n_train: int, n_heldout: int, seed: int, spec: TaskSpec) -> TaskFiles:
    """Write the task's data files into `out_dir` (see TaskFiles), deterministic in `seed`.

    sft.jsonl has one solution per train problem (carry steps slipped at `sft_slip_rate`, pads
    at `sft_pad_rate`); prm.jsonl one per train problem (slips, other errors and pads at the
    prm_ rates), prm_heldout.jsonl the same for the held-out problems.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"task:{seed}")
    heldout = unique_problems(rng, n_heldout, distinct_content=True, shape=spec.shape)
    train = unique_problems(rng, n_train, exclude={p.content for p in heldout}, shape=spec.shape)
    files = TaskFiles(*(out / f"{name}.jsonl" for name in ("train", "heldout", "sft", "prm", "prm_heldout")))
    _write_jsonl(files.train, ({"question": p.question, "answer": str(p.answer)} for p in train))
    _write_jsonl(files.heldout, ({"question": p.question, "answer": str(p.answer)} for p in heldout))
    sft_rng, prm_rng = random.Random(f"sft:{seed}"), random.Random(f"prm:{seed}")
    sft_rows = []
    for p in train:
        solution = task_solution(p, sft_rng, slip_rate=spec.sft_slip_rate, pad_rate=spec.sft_pad_rate)
        sft_rows.append(
            {
                "prompt": format_prompt(p.question),
                "solution": solution.text,
                "correct": solution.correct,
                "pads": solution.pads,
            }
        )
    _write_jsonl(files.sft, sft_rows)
    for path, problems in ((files.prm, train), (files.prm_heldout, heldout)):
        rows = []
        for p in problems:
            solution = task_solution(
                p,
                prm_rng,
                slip_rate=spec.prm_slip_rate,
                error_rate=spec.prm_error_rate,
                pad_rate=spec.prm_pad_rate,
            )
            rows.append(
                {
                    "prompt": format_prompt(p.question),
                    "steps": list(solution.steps),
                    "labels": list(solution.labels),
                }
            )
        _write_jsonl(path, rows)
    return files


def task_corpus(seed: int, size: int = TASK_CORPUS_SIZE) -> list[str]:
    """Texts the tiny world's tokenizer learns its merges from: prompts and solutions of the
    task (with every kind of error and pad), drills, and the older `synthetic_corpus`."""
    rng = random.Random(f"corpus:{seed}")
    texts = list(synthetic_corpus())
    for _ in range(size):
        problem = task_problem(rng)
        solution = task_solution(
            problem, rng, slip_rate=CORPUS_SLIP_RATE, error_rate=CORPUS_ERROR_RATE, pad_rate=CORPUS_PAD_RATE
        )
        texts.append(format_prompt(problem.question) + solution.text)
        drill = arithmetic_drill(rng, CORPUS_DRILL_FACTS)
        texts.append(NEWLINE.join(left + right for left, right in drill))
    return texts


def arithmetic_drill(
    rng: random.Random, facts: int, shape: TaskShape = DEFAULT_SHAPE
) -> list[tuple[str, str]]:
    """`facts` random (left side, result) pairs of the task's arithmetic, always right, e.g.
    ("17 + 5 =", " 22"): the policy's SFT mixes such drills in to learn the tables faster."""
    out = []
    while len(out) < facts:
        value, op = rng.randint(TASK_MIN_VALUE, TASK_MAX_VALUE), rng.choice(shape.weights)
        operand = rng.choice(MUL_OPERANDS) if op == "*" else rng.randint(*ADD_OPERAND)
        result = apply_op(value, op, operand)
        if TASK_MIN_VALUE <= result <= TASK_MAX_VALUE:
            out.append((f"{value} {op} {operand} =", f" {result}"))
    return out


def drill_rows(
    tokenizer: Any, rng: random.Random, count: int, facts: int, shape: TaskShape = DEFAULT_SHAPE
) -> list[Row]:
    """`count` SFT rows of `facts` arithmetic drills each, one per line, loss on the results only."""
    newline = tokenizer.encode(NEWLINE, add_special_tokens=False)
    rows = []
    for _ in range(count):
        ids: list[int] = []
        mask: list[int] = []
        for left, right in arithmetic_drill(rng, facts, shape):
            left_ids = tokenizer.encode(left, add_special_tokens=False)
            right_ids = tokenizer.encode(right, add_special_tokens=False) + newline
            ids += left_ids + right_ids
            mask += [0] * len(left_ids) + [1] * len(right_ids)
        rows.append((ids, mask))
    return rows
