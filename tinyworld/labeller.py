"""A careful labeller of tiny-world solutions: first-error step labels from the question alone.

solutions.py writes solutions together with their labels; the policy's own outputs come without
any. `label_steps` labels any solution of a tiny-world question by the first-error rule of
solutions.py, as a careful labeller who knows the question would:

- an operation step is right iff it is the step a correct solution writes next: the next
  event's ordinal, the value so far, the event's operation and operand, the right result. How it
  words the event is not judged ("gets 3 more" for the question's "finds 3 more" is right; the
  quick world's policy does that often);
- a pad is right iff what it says is true: the start, the value so far, the previous operation
  as written, or one of the rethinking phrases;
- the answer step is right iff every event has been applied and it boxes the value so far;
- anything else (a garbled or cut-off step, an event out of order, an operation after the last
  event) is wrong, and so is every step after the first wrong one.

A solution that stops early is not wrong for it: each of its steps is right, as a labeller who
judges steps sees it (the verifiable reward, not a step label, sees that no answer came).
`label_steps` gives exactly solutions.task_solution's labels on its solutions (tested on every
error kind).

`first_error` names what goes wrong first in a solution (FirstError). The demo's report counts
these over the held-out outputs before and after each run, to show which errors a run removed
and which it traded them for.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass

from puremesh.contract.steps import STEP_SEPARATOR

from .corpus import apply_op
from .solutions import CARRY, RETHINK_PHRASES, answer_text, step_text
from .task import PRONOUNS, is_carry_step, parse_question

ANSWER_PREFIX = answer_text(0).split("\\boxed", 1)[0]  # "The answer is "

_THING_RE = re.compile(r"^\w+ has \d+ (\w+)\.")
_PHRASE = "\x00"  # where an operation step words its event (not judged: see the docstring)
_ARITHMETIC_RE = re.compile(r"(\d+) ([+*-]) (\d+) = (\d+)$")


class FirstError(enum.Enum):
    """What a solution's first wrong step is (or that it has none), as `first_error` reads it."""

    CORRECT = "correct"  # every step right, and the answer given
    NO_ANSWER = "no_answer"  # every step right, but it stops before an answer
    FORGOTTEN_CARRY = "forgotten_carry"  # an addition 10 short: the world's systematic flaw
    SPURIOUS_CARRY = "spurious_carry"  # an addition without a carry written 10 too big
    OFF_BY_ONE = "off_by_one"  # a result 1 away from its own operands' result
    ARITHMETIC = "arithmetic"  # any other wrong result
    WRONG_INPUTS = "wrong_inputs"  # right arithmetic on a wrong value, operand or event
    WRONG_ANSWER = "wrong_answer"  # the answer boxed early or wrong
    OTHER = "other"  # a false pad, a garbled or cut-off step, anything else


@dataclass(frozen=True)
class _Question:
    start: int
    operations: tuple[tuple[str, int], ...]
    pronoun: str
    thing: str

    @classmethod
    def parse(cls, question: str) -> _Question:
        start, operations = parse_question(question)  # ValueError for other text
        thing, pronoun = _THING_RE.match(question), PRONOUNS.get(question.split(" ", 1)[0])
        if thing is None or pronoun is None:
            raise ValueError(f"not a tiny-world question: {question!r}")
        return cls(start, operations, pronoun.lower(), thing.group(1))


def _walk(question: str, steps: list[str]) -> Iterator[bool]:
    """For each step, whether it is right, judged on its own as the next step of a solution that
    has been right so far."""
    q = _Question.parse(question)
    value, done, last = q.start, 0, ""
    for step in steps:
        right = step in RETHINK_PHRASES or step == f"At the start, {q.pronoun} has {q.start} {q.thing}."
        if not right and done > 0:
            right = step in (f"So far, {q.pronoun} has {value} {q.thing}.", f"Check: {last}")
        if not right and done < len(q.operations):
            op, operand = q.operations[done]
            result = apply_op(value, op, operand)
            if _states(step, step_text(done + 1, q.pronoun, _PHRASE, value, op, operand, result)):
                right, last, value, done = True, f"{value} {op} {operand} = {result}", result, done + 1
        elif not right:
            right = step == answer_text(value)
        yield right


def _states(step: str, template: str) -> bool:
    """Whether `step` is `template` with any wording of the event where _PHRASE stands."""
    before, after = template.split(_PHRASE)
    middle = step[len(before) : len(step) - len(after)]
    return step.startswith(before) and step.endswith(after) and bool(middle.strip()) and ":" not in middle


def label_steps(question: str, steps: list[str]) -> list[int]:
    """First-error labels (1 = this step and every earlier one are right) of `steps` as a
    solution of `question` (a tiny-world question; ValueError for other text)."""
    labels, ok = [], True
    for right in _walk(question, steps):
        ok = ok and right
        labels.append(int(ok))
    return labels


def first_error(question: str, text: str) -> FirstError:
    """The kind of the first wrong step of `text` (steps separated by "\\n\\n") as a solution
    of `question`; CORRECT or NO_ANSWER when every step is right."""
    steps = [step for step in text.split(STEP_SEPARATOR) if step.strip()]
    for step, right in zip(steps, _walk(question, steps), strict=True):
        if not right:
            return _kind(step)
    answered = bool(steps) and steps[-1].startswith(ANSWER_PREFIX)
    return FirstError.CORRECT if answered else FirstError.NO_ANSWER


def _kind(step: str) -> FirstError:
    """What the first wrong step `step` gets wrong, read from the step alone."""
    if step.startswith(ANSWER_PREFIX):
        return FirstError.WRONG_ANSWER
    match = _ARITHMETIC_RE.search(step)
    if match is None or step.startswith("Check:"):
        return FirstError.OTHER
    left, op, operand, written = int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))
    result = apply_op(left, op, operand)
    if written == result:
        return FirstError.WRONG_INPUTS
    if op == "+" and written == result - CARRY and is_carry_step(left, op, operand):
        return FirstError.FORGOTTEN_CARRY
    if op == "+" and written == result + CARRY and not is_carry_step(left, op, operand):
        return FirstError.SPURIOUS_CARRY
    return FirstError.OFF_BY_ONE if abs(written - result) == 1 else FirstError.ARITHMETIC
