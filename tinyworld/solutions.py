"""Solutions of the tiny world's problems: the systematic flaw, the other errors, the padding
steps that make no progress, and the step labels a careful labeller gives them.

A correct solution, one operation per step, steps separated by "\\n\\n":

    First, she buys 5 more: 17 + 5 = 22

    Second, she gives away 3: 22 - 3 = 19

    The answer is \\boxed{19}

THE FLAW: a FORGOTTEN CARRY. In an addition whose units digits sum to 10 or more ("carry
steps", e.g. 17 + 5), a flawed solution writes the result 10 too small (17 + 5 = 12) and goes
on consistently from that wrong value. The policy's SFT data slips every carry step with
probability `sft_slip_rate` (> 0.5), so the SFT'd policy knows the right carry (the minority
continuation, reachable by sampling) while its greedy decoding prefers the slip.

PADDING (PadKind): steps that make no progress and contain no error, as real solutions have
them: restating the start ("At the start, she has 17 apples."), restating the value so far
("So far, she has 22 apples."), re-checking the previous step ("Check: 17 + 5 = 22") and
thinking aloud ("Let me think again."). Before each step and before the answer, a solution
inserts pads while a draw stays below `pad_rate` (at most MAX_PADS_PER_GAP in a row). The SFT
data pads at `sft_pad_rate`, so the policy can produce them; the PRM's data at `prm_pad_rate`.

LABELS: "first error" labelling, as in PRM800K / Math-Shepherd: a step is labelled 1 iff it and
every step before it are right. A pad contains no error, so before the first error it is
labelled 1, exactly like a step that makes progress; after it, 0 like every later step. The
PRM's data adds other errors at a small rate (ErrorKind): a restatement of a wrong number, so
that it learns to check what a pad says rather than "pads are right", and a garbled step (broken
off, a stray piece of text after it), which a careful labeller marks wrong like any error.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from puremesh.contract.steps import STEP_SEPARATOR

from .corpus import apply_op
from .task import ADD_OPERAND, MUL_PHRASES, ORDINALS, Operation, TaskProblem, is_carry_step

CARRY = 10  # what a forgotten carry takes off the result
ARITHMETIC_OFFSET = (1, 9)  # the size of each ErrorKind's error
OPERAND_OFFSET = (1, 3)
CARRIED_OFFSET = (1, 5)
ANSWER_OFFSET = (1, 9)
RESTATED_OFFSET = (1, 9)
MAX_PADS_PER_GAP = 3
GARBLE_FRAGMENT = (1, 6)  # characters of the stray piece a garbled step ends with
RETHINK_PHRASES = ("Let me think again.", "Let me double-check.", "Let me read the question again.")


class ErrorKind(enum.Enum):
    """The errors of the PRM's data besides the forgotten carry."""

    ARITHMETIC = "arithmetic"  # the result off by 1..9
    OPERAND = "operand"  # a wrong operand, computed right
    CARRIED = "carried"  # the previous result copied wrongly, computed right
    EVENT = "event"  # another event than the question's (another operand), computed right
    ANSWER = "answer"  # a wrong boxed answer
    RESTATED = "restated"  # a pad restating a wrong number
    GARBLED = "garbled"  # a step broken off, with a stray piece of another step after it


STEP_ERRORS = (ErrorKind.ARITHMETIC, ErrorKind.OPERAND, ErrorKind.CARRIED, ErrorKind.EVENT)


class PadKind(enum.Enum):
    """Steps that make no progress (see the module docstring)."""

    RESTATE_START = "restate_start"  # "At the start, she has 17 apples."
    RESTATE_VALUE = "restate_value"  # "So far, she has 22 apples." (after an operation)
    RECHECK = "recheck"  # "Check: 17 + 5 = 22", the previous step as written (after an operation)
    RETHINK = "rethink"  # "Let me think again."


@dataclass(frozen=True)
class TaskSolution:
    steps: tuple[str, ...]
    labels: tuple[int, ...]  # first-error labels, one per step (the answer step included)
    pads: int = 0  # how many of the steps are pads

    @property
    def text(self) -> str:
        return STEP_SEPARATOR.join(self.steps)

    @property
    def correct(self) -> bool:
        return all(self.labels)


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


@dataclass
class _Writer:
    """A solution being written: its steps, labels and whether an error has happened yet."""

    problem: TaskProblem
    rng: random.Random
    error_rate: float
    steps: list[str]
    labels: list[int]
    ok: bool = True
    value: int = 0  # the value written so far
    last: str = ""  # the arithmetic of the last operation step as written ("17 + 5 = 22")
    pads: int = 0

    def add(self, text: str, wrong: bool) -> None:
        self.ok = self.ok and not wrong
        self.steps.append(text)
        self.labels.append(int(self.ok))

    def pad(self, pad_rate: float) -> None:
        """Pads while a draw stays below `pad_rate`, at most MAX_PADS_PER_GAP."""
        if pad_rate <= 0:
            return  # no draw: a solution without pads uses the same randomness as before pads
        for _ in range(MAX_PADS_PER_GAP):
            if self.rng.random() >= pad_rate:
                return
            self.pads += 1
            self.add(*self._pad_text())

    def _pad_text(self) -> tuple[str, bool]:
        kinds = [PadKind.RESTATE_START, PadKind.RETHINK]
        if self.last:
            kinds += [PadKind.RESTATE_VALUE, PadKind.RECHECK]
        kind = self.rng.choice(kinds)
        if kind is PadKind.RETHINK:
            return self.rng.choice(RETHINK_PHRASES), False
        if kind is PadKind.RECHECK:
            return f"Check: {self.last}", False
        said = self.problem.start if kind is PadKind.RESTATE_START else self.value
        wrong = self.rng.random() < self.error_rate  # ErrorKind.RESTATED
        shown = _offset(self.rng, *RESTATED_OFFSET, said) if wrong else said
        pronoun, thing = self.problem.pronoun.lower(), self.problem.thing
        if kind is PadKind.RESTATE_START:
            return f"At the start, {pronoun} has {shown} {thing}.", wrong
        return f"So far, {pronoun} has {shown} {thing}.", wrong


def _other_event(o: Operation, rng: random.Random) -> tuple[int, str]:
    """ErrorKind.EVENT: another operand of the same operation, and the phrase that says it."""
    if o.op == "*":
        operand = next(m for m in MUL_PHRASES if m != o.operand)
        return operand, MUL_PHRASES[operand]
    operand = rng.choice([c for c in range(ADD_OPERAND[0], ADD_OPERAND[1] + 1) if c != o.operand])
    return operand, o.phrase.replace(str(o.operand), str(operand))


def _with_error(value: int, o: Operation, rng: random.Random) -> tuple[int, int, str, int]:
    """One of STEP_ERRORS on the step applying `o` to `value`: (value shown, operand, phrase,
    result) as the step writes them."""
    kind = rng.choice(STEP_ERRORS)
    if kind is ErrorKind.ARITHMETIC:
        return value, o.operand, o.phrase, _offset(rng, *ARITHMETIC_OFFSET, apply_op(value, o.op, o.operand))
    if kind is ErrorKind.OPERAND:
        operand = _offset(rng, *OPERAND_OFFSET, o.operand)
        return value, operand, o.phrase, apply_op(value, o.op, operand)
    if kind is ErrorKind.EVENT:
        operand, phrase = _other_event(o, rng)
        return value, operand, phrase, apply_op(value, o.op, operand)
    shown = _offset(rng, *CARRIED_OFFSET, value)  # CARRIED: the previous result copied wrongly
    return shown, o.operand, o.phrase, apply_op(shown, o.op, o.operand)


def _operation_step(writer: _Writer, k: int, slip_rate: float) -> None:
    """Step k of `writer.problem`, slipped or with one of STEP_ERRORS at their rates."""
    rng, o = writer.rng, writer.problem.operations[k - 1]
    value = writer.value
    shown, operand, phrase, result = value, o.operand, o.phrase, apply_op(value, o.op, o.operand)
    wrong = False
    if is_carry_step(value, o.op, operand) and rng.random() < slip_rate:
        result, wrong = result - CARRY, True
    elif rng.random() < writer.error_rate:
        shown, operand, phrase, result = _with_error(value, o, rng)
        wrong = result != apply_op(value, o.op, o.operand) or (operand, shown) != (o.operand, value)
    writer.add(step_text(k, writer.problem.pronoun, phrase, shown, o.op, operand, result), wrong)
    writer.value, writer.last = result, f"{shown} {o.op} {operand} = {result}"


def _garble(steps: list[str], labels: list[int], rng: random.Random) -> None:
    """ErrorKind.GARBLED on one step (in place): cut at a random character, a stray tail of some
    step appended; it and every later step are labelled 0."""
    k = rng.randrange(len(steps))
    text = steps[k]
    while True:
        donor = rng.choice(steps)
        piece = donor[len(donor) - rng.randint(*GARBLE_FRAGMENT) :]
        garbled = text[: rng.randint(1, max(1, len(text) - 2))] + piece
        if garbled != text and garbled.strip():
            break
    steps[k] = garbled
    labels[k:] = [0] * (len(labels) - k)


def task_solution(
    problem: TaskProblem,
    rng: random.Random,
    *,
    slip_rate: float = 0.0,
    error_rate: float = 0.0,
    pad_rate: float = 0.0,
) -> TaskSolution:
    """A solution of `problem`: each carry step slips (forgotten carry) with probability
    `slip_rate`; each other step gets one of STEP_ERRORS, each restating pad a wrong number and
    the answer step a wrong answer, with probability `error_rate`; pads before each step and
    the answer at `pad_rate`; and one step of the solution is GARBLED with probability
    `error_rate`. Later steps continue consistently from whatever was written.
    Labels: first-error labelling (see the module docstring)."""
    writer = _Writer(problem, rng, error_rate, [], [], value=problem.start)
    for k in range(1, len(problem.operations) + 1):
        writer.pad(pad_rate)
        _operation_step(writer, k, slip_rate)
    writer.pad(pad_rate)
    answer = writer.value
    wrong = rng.random() < error_rate
    if wrong:
        answer = _offset(rng, *ANSWER_OFFSET, writer.value)
    writer.add(answer_text(answer), wrong)
    if rng.random() < error_rate:
        _garble(writer.steps, writer.labels, rng)
    return TaskSolution(tuple(writer.steps), tuple(writer.labels), writer.pads)
