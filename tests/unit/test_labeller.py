"""The careful labeller of the policy's own solutions (tinyworld/labeller.py)."""

from __future__ import annotations

import random

import pytest

from puremesh.tinyworld.labeller import FirstError, first_error, label_steps
from puremesh.tinyworld.solutions import task_solution
from puremesh.tinyworld.task import unique_problems

QUESTION = (
    "Hugo has 27 bottles. First, he buys 5 more. Second, he loses 3. How many bottles does he have now?"
)
FIRST = "First, he buys 5 more: 27 + 5 = 32"
SECOND = "Second, he loses 3: 32 - 3 = 29"
ANSWER = "The answer is \\boxed{29}"


def test_same_labels_as_the_synthetic_solutions_on_every_error_kind():
    rng = random.Random(7)
    problems = unique_problems(rng, 400)
    for problem in problems:
        solution = task_solution(problem, rng, slip_rate=0.5, error_rate=0.3, pad_rate=0.3)
        assert label_steps(problem.question, list(solution.steps)) == list(solution.labels), solution.steps
    # the error kinds did occur: some solutions have a first error, some none
    labels = [
        task_solution(p, random.Random(i), slip_rate=0.5, error_rate=0.3).labels
        for i, p in enumerate(problems)
    ]
    assert any(all(x) for x in labels) and any(not all(x) for x in labels)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([FIRST, SECOND, ANSWER], [1, 1, 1]),
        ([FIRST, "Check: 27 + 5 = 32", "So far, he has 32 bottles.", SECOND, ANSWER], [1, 1, 1, 1, 1]),
        (["At the start, he has 27 bottles.", "Let me think again.", FIRST, SECOND, ANSWER], [1, 1, 1, 1, 1]),
        # off by one, and everything after it
        (
            [
                "First, he buys 5 more: 27 + 5 = 31",
                "Second, he loses 3: 31 - 3 = 28",
                "The answer is \\boxed{28}",
            ],
            [0, 0, 0],
        ),
        # a forgotten carry
        (["First, he buys 5 more: 27 + 5 = 22", "Second, he loses 3: 22 - 3 = 19"], [0, 0]),
        # the second event first, an answer before the last event, a cut-off step, an extra operation
        ([SECOND, ANSWER], [0, 0]),
        ([FIRST, "The answer is \\boxed{32}"], [1, 0]),
        ([FIRST, "Second, he loses 3: 32 - "], [1, 0]),
        ([FIRST, SECOND, "Third, he loses 3: 29 - 3 = 26", ANSWER], [1, 1, 0, 0]),
        # a pad saying something false; a check of a step not written
        ([FIRST, "So far, he has 33 bottles."], [1, 0]),
        (["Check: 27 + 5 = 32"], [0]),
        # stopping early is not a step error: the verifiable reward, not the labeller, sees it
        ([FIRST], [1]),
    ],
)
def test_hand_cases(steps, expected):
    assert label_steps(QUESTION, steps) == expected


def test_a_question_of_another_world_is_refused():
    with pytest.raises(ValueError, match="not a tiny-world question"):
        label_steps("What is 2 + 2?", ["4"])
    # the tiny world's shape, but a name it never uses
    with pytest.raises(ValueError, match="not a tiny-world question"):
        label_steps(QUESTION.replace("Hugo", "Bob"), [FIRST])


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (f"{FIRST}\n\n{SECOND}\n\n{ANSWER}", FirstError.CORRECT),
        (f"Let me think again.\n\n{FIRST}", FirstError.NO_ANSWER),
        ("", FirstError.NO_ANSWER),
        ("First, he buys 5 more: 27 + 5 = 22\n\nSecond, he loses 3: 22 - 3 = 19", FirstError.FORGOTTEN_CARRY),
        ("First, he buys 5 more: 27 + 5 = 31", FirstError.OFF_BY_ONE),
        (f"{FIRST}\n\nSecond, he loses 3: 32 - 3 = 25", FirstError.ARITHMETIC),
        ("First, he buys 6 more: 27 + 6 = 33", FirstError.WRONG_INPUTS),
        (f"{FIRST}\n\nSecond, he loses 3: 31 - 3 = 28", FirstError.WRONG_INPUTS),
        (f"{FIRST}\n\nThe answer is \\boxed{{32}}", FirstError.WRONG_ANSWER),
        (f"{FIRST}\n\n{SECOND}\n\nThe answer is \\boxed{{30}}", FirstError.WRONG_ANSWER),
        (f"{FIRST}\n\nSo far, he has 33 bottles.", FirstError.OTHER),
        (f"{FIRST}\n\nCheck: 27 + 5 = 31", FirstError.OTHER),
        (f"{FIRST}\n\nSecond, he loses 3: 32 - ", FirstError.OTHER),
    ],
)
def test_first_error_names_what_goes_wrong_first(text, kind):
    assert first_error(QUESTION, text) is kind


def test_the_wording_of_an_event_is_not_judged_its_numbers_are():
    reworded = "First, he gets 5 more: 27 + 5 = 32"
    assert label_steps(QUESTION, [reworded, SECOND, ANSWER]) == [1, 1, 1]
    assert label_steps(QUESTION, ["First, he: 27 + 5 = 32"]) == [0]  # no event at all
    assert label_steps(QUESTION, ["Second, he gets 5 more: 27 + 5 = 32"]) == [0]  # the wrong ordinal
    assert label_steps(QUESTION, ["First, she buys 5 more: 27 + 5 = 32"]) == [0]  # the wrong person
