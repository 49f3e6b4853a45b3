"""The tiny world's problems: chained arithmetic word problems, and their arithmetic content.

A problem: "Maya has 17 apples. First, she buys 5 more. Second, she gives away 3. Third, she
doubles them. How many apples does she have now?" (2 to 4 operations: +2..9, -2..9, x2 / x3;
every value stays in [10, 99]). Its solutions, flawed and padded ones included, are
solutions.py's; the data files built from both are taskdata.py's.

The CONTENT of a problem is its arithmetic chain: the start and each (operation, operand). Two
problems with the same content have the same answer and the same intermediate values, however
their names, objects and phrasings differ; the held-out set is disjoint from training by content
(taskdata.build_task). `parse_question` reads the content back from a question's text, so a
data file can be checked without the generator's state.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from puremesh.trainer.data import Problem

from .corpus import OBJECTS, apply_op

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

Content = tuple[int, tuple[tuple[str, int], ...]]  # (start, ((op, operand), ...))
OP_WEIGHTS = "++--*"  # how often each operation is drawn: additions and subtractions twice as often


@dataclass(frozen=True)
class TaskShape:
    """Which problems a world draws: up to `max_operations` operations (at least
    OPERATION_COUNT[0]) of the `kinds` ("+", "-", "*"; additions are always among them, since
    the flaw lives in them)."""

    max_operations: int = OPERATION_COUNT[1]
    kinds: str = "+-*"

    def __post_init__(self) -> None:
        if not OPERATION_COUNT[0] <= self.max_operations <= OPERATION_COUNT[1]:
            raise ValueError(f"max_operations must be in {list(OPERATION_COUNT)}, got {self.max_operations}")
        if "+" not in self.kinds or set(self.kinds) - set(OP_WEIGHTS):
            raise ValueError(f"kinds must include + and only use + - *, got {self.kinds!r}")

    @property
    def weights(self) -> str:
        return "".join(op for op in OP_WEIGHTS if op in self.kinds)


DEFAULT_SHAPE = TaskShape()


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
    def content(self) -> Content:
        """The arithmetic chain (see the module docstring)."""
        return self.start, tuple((o.op, o.operand) for o in self.operations)

    def values(self) -> list[int]:
        """The start and every intermediate result of the correct solution."""
        values = [self.start]
        for o in self.operations:
            values.append(apply_op(values[-1], o.op, o.operand))
        return values

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def carry_steps(self) -> int:
        """How many of the correct solution's steps are carry steps (where the policy slips)."""
        values = self.values()
        return sum(is_carry_step(values[k], o.op, o.operand) for k, o in enumerate(self.operations))

    def to_problem(self) -> Problem:
        return Problem(question=self.question, answer=str(self.answer))


def is_carry_step(value: int, op: str, operand: int) -> bool:
    """An addition whose units digits carry: where the flawed policy forgets the carry."""
    return op == "+" and value % 10 + operand >= 10


def task_problem(rng: random.Random, shape: TaskShape = DEFAULT_SHAPE) -> TaskProblem:
    """One random problem of `shape`, every value in [TASK_MIN_VALUE, TASK_MAX_VALUE]."""
    name, thing = rng.choice(sorted(PRONOUNS)), rng.choice(OBJECTS)
    start = value = rng.randint(*TASK_START)
    operations: list[Operation] = []
    count = rng.randint(OPERATION_COUNT[0], shape.max_operations)
    # Every phrasing at most once per problem: each event reads differently from the others.
    unused = {"+": list(ADD_PHRASES), "-": list(SUB_PHRASES), "*": list(MUL_PHRASES.values())}
    while len(operations) < count:
        op = rng.choice(shape.weights)
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


def unique_problems(
    rng: random.Random,
    count: int,
    *,
    exclude: set[Content] | None = None,
    distinct_content: bool = False,
    shape: TaskShape = DEFAULT_SHAPE,
) -> list[TaskProblem]:
    """`count` problems (task_problem) with pairwise distinct questions, none with a content in
    `exclude`; with `distinct_content`, pairwise distinct contents too."""
    seen_questions: set[str] = set()
    seen_contents: set[Content] = set()
    blocked = set(exclude or ())
    out = []
    while len(out) < count:
        problem = task_problem(rng, shape)
        if problem.question in seen_questions or problem.content in blocked:
            continue
        if distinct_content and problem.content in seen_contents:
            continue
        seen_questions.add(problem.question)
        seen_contents.add(problem.content)
        out.append(problem)
    return out


# --- reading a question back --------------------------------------------------------------------

_PHRASE_OPS = [(re.escape(p).replace(r"\{c\}", r"(\d+)"), "+") for p in ADD_PHRASES]
_PHRASE_OPS += [(re.escape(p).replace(r"\{c\}", r"(\d+)"), "-") for p in SUB_PHRASES]
_EVENT_RE = re.compile(r"(?:First|Second|Third|Fourth), (?:he|she) ([^.]+)\.")
_QUESTION_RE = re.compile(r"^\w+ has (\d+) \w+\. (.+) How many \w+ does (?:he|she) have now\?$")


def _event(text: str, question: str) -> tuple[str, int]:
    for operand, phrase in MUL_PHRASES.items():
        if text == phrase:
            return "*", operand
    for pattern, op in _PHRASE_OPS:
        match = re.fullmatch(pattern, text)
        if match:
            return op, int(match.group(1))
    raise ValueError(f"unknown event {text!r} in {question!r}")


def parse_question(question: str) -> Content:
    """The content of a question written by `TaskProblem.question`; ValueError for other text."""
    match = _QUESTION_RE.match(question)
    if not match:
        raise ValueError(f"not a tiny-world question: {question!r}")
    events = _EVENT_RE.findall(match.group(2))
    if not events:
        raise ValueError(f"no events in {question!r}")
    return int(match.group(1)), tuple(_event(e, question) for e in events)
