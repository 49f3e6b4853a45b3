"""The tiny world's task: chained arithmetic word problems, and solutions with one systematic flaw.

A problem: "Maya has 17 apples. First, she buys 5 more. Second, she gives away 3. Third, she
doubles them. How many apples does she have now?" (2 to 4 operations: +2..9, -2..9, x2 / x3;
every value stays in [10, 99]). Its solution, one operation per step, steps separated by "\\n\\n":

    First, she buys 5 more: 17 + 5 = 22

    Second, she gives away 3: 22 - 3 = 19

    Third, she doubles them: 19 * 2 = 38

    The answer is \\boxed{38}

The flaw: a FORGOTTEN CARRY. In an addition whose units digits sum to 10 or more ("carry
steps", e.g. 17 + 5), a flawed solution writes the result 10 too small (17 + 5 = 12) and goes
on consistently from that wrong value. The policy's SFT data has every carry step slipped with
probability `sft_slip_rate` (> 0.5), independently, and every other step right. So the SFT'd
policy *knows* the right carry (it is the minority continuation, reachable by sampling) but its
greedy decoding prefers the slip: greedy is right on about the problems that have no carry
step (about 43% of them) and wrong on the others. The choice is made at one token (the tens
digit of the result), the same feature decides it in every problem, and the PRM marks the slip
as a wrong step: RL that rewards correct steps only has to push one shared probability below
one half to flip greedy outputs on every carry problem.

Step labels (for the PRM): "first error" labelling, as in PRM800K / Math-Shepherd: a step is
labelled 1 iff it and every step before it are right; the first wrong step and every later
step (the final answer step included) are labelled 0, even when a later step's arithmetic is
right on the wrong value. The PRM's data adds other errors at a small rate (ErrorKind: an
arithmetic error of +-1..9, a wrong operand, a wrongly carried-over value, a wrong boxed
answer), so that it does not learn "only carries can be wrong".

`build_task` writes the data files (TaskFiles); everything is deterministic in its seed.
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puremesh.contract.steps import STEP_SEPARATOR
from puremesh.supervised.sft import Row
from puremesh.trainer.data import Problem, format_prompt

from .corpus import NEWLINE, OBJECTS, apply_op, synthetic_corpus

PRONOUNS = {
    "Tom": "He", "Anna": "She", "Lena": "She", "Ravi": "He", "Maya": "She", "Omar": "He",
    "Sara": "She", "Ken": "He", "Ines": "She", "Paul": "He", "Grace": "She", "Hugo": "He",
    "Priya": "She", "Felix": "He", "Chloe": "She", "Mateo": "He", "Yuki": "She", "Nadia": "She",
    "Oscar": "He", "Zoe": "She",
}  # fmt: skip
ADD_PHRASES = ("buys {c} more", "finds {c} more", "gets {c} more")
SUB_PHRASES = ("gives away {c}", "loses {c}", "sells {c}")
MUL_PHRASES = {2: "doubles them", 3: "triples them"}
ORDINALS = ("First", "Second", "Third", "Fourth")  # events of a question, and its steps
TASK_MIN_VALUE = 10  # every value of a correct solution is a two-digit number
TASK_MAX_VALUE = 99
TASK_START = (10, 30)  # the first value is drawn from this range
OPERATION_COUNT = (2, len(ORDINALS))  # operations per problem, both ends included
ADD_OPERAND = (2, 9)  # the operands of additions and subtractions
MUL_OPERANDS = tuple(MUL_PHRASES)
CARRY = 10  # what a forgotten carry takes off the result
ARITHMETIC_OFFSET = (1, 9)  # the size of each ErrorKind's error
OPERAND_OFFSET = (1, 3)
CARRIED_OFFSET = (1, 5)
ANSWER_OFFSET = (1, 9)
TASK_CORPUS_SIZE = 3000  # task problems in the tokenizer's corpus (`task_corpus`)
CORPUS_SLIP_RATE = 0.5
CORPUS_ERROR_RATE = 0.1
CORPUS_DRILL_FACTS = 4


class ErrorKind(enum.Enum):
    """The errors of the PRM's data besides the forgotten carry."""

    ARITHMETIC = "arithmetic"  # the result off by 1..9
    OPERAND = "operand"  # a wrong operand, computed right
    CARRIED = "carried"  # the previous result copied wrongly, computed right
    ANSWER = "answer"  # a wrong boxed answer


STEP_ERRORS = (ErrorKind.ARITHMETIC, ErrorKind.OPERAND, ErrorKind.CARRIED)


@dataclass(frozen=True)
class Operation:
    op: str  # "+", "-" or "*"
    operand: int
    phrase: str  # "buys 5 more"


@dataclass(frozen=True)
class TaskProblem:
    name: str
    thing: str
    start: int
    operations: tuple[Operation, ...]

    @property
    def pronoun(self) -> str:
        return PRONOUNS[self.name]

    @property
    def question(self) -> str:
        events = " ".join(
            f"{ORDINALS[k]}, {self.pronoun.lower()} {o.phrase}." for k, o in enumerate(self.operations)
        )
        return (
            f"{self.name} has {self.start} {self.thing}. {events} "
            f"How many {self.thing} does {self.pronoun.lower()} have now?"
        )

    @property
    def answer(self) -> int:
        value = self.start
        for o in self.operations:
            value = apply_op(value, o.op, o.operand)
        return value

    def carry_steps(self) -> int:
        """How many of the correct solution's steps are carry steps (where the policy slips)."""
        value, count = self.start, 0
        for o in self.operations:
            count += is_carry_step(value, o.op, o.operand)
            value = apply_op(value, o.op, o.operand)
        return count

    def to_problem(self) -> Problem:
        return Problem(question=self.question, answer=str(self.answer))


@dataclass(frozen=True)
class TaskSolution:
    steps: tuple[str, ...]
    labels: tuple[int, ...]  # first-error labels, one per step (the answer step included)

    @property
    def text(self) -> str:
        return STEP_SEPARATOR.join(self.steps)

    @property
    def correct(self) -> bool:
        return all(self.labels)


def is_carry_step(value: int, op: str, operand: int) -> bool:
    """An addition whose units digits carry: where the flawed policy forgets the carry."""
    return op == "+" and value % 10 + operand >= 10


def task_problem(rng: random.Random) -> TaskProblem:
    """One random problem (OPERATION_COUNT operations, every value in [TASK_MIN_VALUE, TASK_MAX_VALUE])."""
    name, thing = rng.choice(sorted(PRONOUNS)), rng.choice(OBJECTS)
    start = value = rng.randint(*TASK_START)
    operations: list[Operation] = []
    count = rng.randint(*OPERATION_COUNT)
    # Every phrasing at most once per problem: each event reads differently from the others.
    unused = {"+": list(ADD_PHRASES), "-": list(SUB_PHRASES), "*": list(MUL_PHRASES.values())}
    while len(operations) < count:
        op = rng.choice("++--*")
        if not unused[op]:
            continue
        template = rng.choice(unused[op])
        operand = (3 if "triples" in template else 2) if op == "*" else rng.randint(*ADD_OPERAND)
        new = apply_op(value, op, operand)
        if TASK_MIN_VALUE <= new <= TASK_MAX_VALUE:
            unused[op].remove(template)
            operations.append(Operation(op, operand, template.format(c=operand)))
            value = new
    return TaskProblem(name, thing, start, tuple(operations))


def step_text(k: int, pronoun: str, phrase: str, value: int, op: str, operand: int, result: int) -> str:
    """Step k (1-based): the question's k-th event restated, then its arithmetic."""
    return f"{ORDINALS[k - 1]}, {pronoun.lower()} {phrase}: {value} {op} {operand} = {result}"


def answer_text(value: int) -> str:
    return f"The answer is \\boxed{{{value}}}"


def _offset(rng: random.Random, low: int, high: int, base: int) -> int:
    """base + a non-zero offset in [-high, -low] U [low, high], never below min(base, 0)."""
    while True:
        out = base + rng.choice((-1, 1)) * rng.randint(low, high)
        if out >= min(base, 0):
            return out


def task_solution(
    problem: TaskProblem, rng: random.Random, *, slip_rate: float = 0.0, error_rate: float = 0.0
) -> TaskSolution:
    """A solution of `problem`: each carry step slips (forgotten carry) with probability
    `slip_rate`; each other step gets one of STEP_ERRORS, and the answer step a wrong answer,
    with probability `error_rate`. Later steps continue consistently from whatever was written.
    Labels: first-error labelling (see the module docstring)."""
    steps: list[str] = []
    labels: list[int] = []
    value, ok = problem.start, True
    for k, o in enumerate(problem.operations, start=1):
        shown_value, operand = value, o.operand
        result = apply_op(value, o.op, operand)
        wrong = False
        if is_carry_step(value, o.op, operand) and rng.random() < slip_rate:
            result, wrong = result - CARRY, True
        elif rng.random() < error_rate:
            kind = rng.choice(STEP_ERRORS)
            if kind is ErrorKind.ARITHMETIC:
                result = _offset(rng, *ARITHMETIC_OFFSET, result)
            elif kind is ErrorKind.OPERAND:
                operand = _offset(rng, *OPERAND_OFFSET, operand)
                result = apply_op(value, o.op, operand)
            else:  # CARRIED: the previous result copied wrongly
                shown_value = _offset(rng, *CARRIED_OFFSET, value)
                result = apply_op(shown_value, o.op, operand)
            wrong = result != apply_op(value, o.op, o.operand) or (operand, shown_value) != (o.operand, value)
        ok = ok and not wrong
        steps.append(step_text(k, problem.pronoun, o.phrase, shown_value, o.op, operand, result))
        labels.append(int(ok))
        value = result
    answer = value
    if rng.random() < error_rate:
        answer = _offset(rng, *ANSWER_OFFSET, value)
        ok = False
    steps.append(answer_text(answer))
    labels.append(int(ok))
    return TaskSolution(tuple(steps), tuple(labels))


def arithmetic_drill(rng: random.Random, facts: int) -> list[tuple[str, str]]:
    """`facts` random (left side, result) pairs of the task's arithmetic, always right, e.g.
    ("17 + 5 =", " 22"): the policy's SFT mixes such drills in to learn the tables faster."""
    out = []
    while len(out) < facts:
        value, op = rng.randint(TASK_MIN_VALUE, TASK_MAX_VALUE), rng.choice("++--*")
        operand = rng.choice(MUL_OPERANDS) if op == "*" else rng.randint(*ADD_OPERAND)
        result = apply_op(value, op, operand)
        if TASK_MIN_VALUE <= result <= TASK_MAX_VALUE:
            out.append((f"{value} {op} {operand} =", f" {result}"))
    return out


def unique_problems(rng: random.Random, count: int, exclude: set[str] | None = None) -> list[TaskProblem]:
    """`count` problems with pairwise distinct questions, none of them in `exclude`."""
    seen = set(exclude or ())
    out = []
    while len(out) < count:
        problem = task_problem(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            out.append(problem)
    return out


@dataclass(frozen=True)
class TaskFiles:
    train: Path  # question, answer (PPO prompts)
    heldout: Path  # question, answer (evaluation; questions disjoint from every other file)
    sft: Path  # prompt, solution, correct (policy SFT)
    prm: Path  # prompt, steps, labels (PRM training, on the train questions)
    prm_heldout: Path  # prompt, steps, labels (PRM evaluation, on the held-out questions)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def build_task(
    out_dir: str | Path,
    n_train: int,
    n_heldout: int,
    seed: int,
    *,
    sft_slip_rate: float,
    prm_slip_rate: float,
    prm_error_rate: float,
) -> TaskFiles:
    """Write the task's data files into `out_dir` (see TaskFiles), deterministic in `seed`.

    Held-out questions are drawn first and every train question differs from all of them.
    sft.jsonl has one solution per train problem (carry steps slipped with `sft_slip_rate`);
    prm.jsonl one solution per train problem (slips at `prm_slip_rate`, other errors at
    `prm_error_rate`), prm_heldout.jsonl the same for the held-out problems.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"task:{seed}")
    heldout = unique_problems(rng, n_heldout)
    train = unique_problems(rng, n_train, exclude={p.question for p in heldout})
    files = TaskFiles(*(out / f"{name}.jsonl" for name in ("train", "heldout", "sft", "prm", "prm_heldout")))
    _write_jsonl(files.train, ({"question": p.question, "answer": str(p.answer)} for p in train))
    _write_jsonl(files.heldout, ({"question": p.question, "answer": str(p.answer)} for p in heldout))
    sft_rng, prm_rng = random.Random(f"sft:{seed}"), random.Random(f"prm:{seed}")
    sft_rows = []
    for p in train:
        solution = task_solution(p, sft_rng, slip_rate=sft_slip_rate)
        sft_rows.append(
            {"prompt": format_prompt(p.question), "solution": solution.text, "correct": solution.correct}
        )
    _write_jsonl(files.sft, sft_rows)
    for path, problems in ((files.prm, train), (files.prm_heldout, heldout)):
        rows = []
        for p in problems:
            solution = task_solution(p, prm_rng, slip_rate=prm_slip_rate, error_rate=prm_error_rate)
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
    task (with every kind of error), drills, and the older `synthetic_corpus`."""
    rng = random.Random(f"corpus:{seed}")
    texts = list(synthetic_corpus())
    for _ in range(size):
        problem = task_problem(rng)
        solution = task_solution(problem, rng, slip_rate=CORPUS_SLIP_RATE, error_rate=CORPUS_ERROR_RATE)
        texts.append(format_prompt(problem.question) + solution.text)
        drill = arithmetic_drill(rng, CORPUS_DRILL_FACTS)
        texts.append(NEWLINE.join(left + right for left, right in drill))
    return texts


def drill_rows(tokenizer: Any, rng: random.Random, count: int, facts: int) -> list[Row]:
    """`count` SFT rows of `facts` arithmetic drills each, one per line, loss on the results only."""
    newline = tokenizer.encode(NEWLINE, add_special_tokens=False)
    rows = []
    for _ in range(count):
        ids: list[int] = []
        mask: list[int] = []
        for left, right in arithmetic_drill(rng, facts):
            left_ids = tokenizer.encode(left, add_special_tokens=False)
            right_ids = tokenizer.encode(right, add_special_tokens=False) + newline
            ids += left_ids + right_ids
            mask += [0] * len(left_ids) + [1] * len(right_ids)
        rows.append((ids, mask))
    return rows
