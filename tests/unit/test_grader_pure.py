"""PURE's answer check (services/verify/grading.py `grade_pure`, `normalize_answer`): the MATH
normalisation rules, the cases where it and the default math-verify grader disagree, and the
cases where normalisation makes them agree."""

from __future__ import annotations

import pytest

from puremesh.contract.verdict import Verdict
from puremesh.services.verify.grading import grade, grade_pure, normalize_answer


@pytest.mark.parametrize(
    ("answer", "normal"),
    [
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac1{72}", "\\frac{1}{72}"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("\\tfrac{3}{4}", "\\frac{3}{4}"),
        ("0.5", "\\frac{1}{2}"),
        (".5", "\\frac{1}{2}"),
        ("3/4", "\\frac{3}{4}"),
        ("-3/4", "\\frac{-3}{4}"),
        ("x = 5", "5"),
        ("10\\%", "10"),
        ("5 \\text{ apples}", "5"),
        ("90^\\circ", "90"),
        ("\\$18.90", "18.90"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("a\\!b", "ab"),
        ("1,000", "1,000"),  # no thousands rule in MATH's check
        ("x^2 + 2x + 1", "x^2+2x+1"),
    ],
)
def test_normalize_answer(answer: str, normal: str) -> None:
    assert normalize_answer(answer) == normal


# (response, gold, PURE's verdict, math-verify's verdict)
DISAGREE = [
    ("The answer is 7.", "7", Verdict.NO_ANSWER, Verdict.CORRECT),  # only a box is an answer
    ("\\boxed{x^2+2x+1}", "(x+1)^2", Verdict.INCORRECT, Verdict.CORRECT),  # no algebra
    ("\\boxed{3.0}", "3", Verdict.INCORRECT, Verdict.CORRECT),  # no numeric equality
    ("\\boxed{\\frac{2}{4}}", "\\frac12", Verdict.INCORRECT, Verdict.CORRECT),
    ("\\boxed{1,000}", "1000", Verdict.INCORRECT, Verdict.CORRECT),
    ("\\boxed{\\text{(B)}}", "B", Verdict.INCORRECT, Verdict.CORRECT),
]
AGREE = [
    ("so \\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12"),
    ("\\boxed{10\\%}", "10"),
    ("\\boxed{5 \\text{ apples}}", "5"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{\\sqrt2}", "\\sqrt{2}"),
    ("first \\boxed{3}, then \\boxed{3/4}", "The answer: $\\boxed{\\frac{3}{4}}$"),  # last box, gold's box
]


@pytest.mark.parametrize(("response", "gold", "pure", "math_verify"), DISAGREE)
def test_where_the_graders_disagree(response: str, gold: str, pure: Verdict, math_verify: Verdict) -> None:
    assert grade_pure(response, gold)[0] is pure
    assert grade(response, gold)[0] is math_verify


@pytest.mark.parametrize(("response", "gold"), AGREE)
def test_normalisation_makes_pure_accept(response: str, gold: str) -> None:
    assert grade_pure(response, gold)[0] is Verdict.CORRECT
    assert grade(response, gold)[0] is Verdict.CORRECT


def test_pure_reports_the_last_box_and_no_ground_truth() -> None:
    assert grade_pure("\\boxed{1} then \\boxed{2}", "1") == (Verdict.INCORRECT, "2")
    assert grade_pure("\\boxed{2}", None) == (Verdict.NO_GROUND_TRUTH, "2")
    assert grade_pure("\\boxed{2}", "null") == (Verdict.NO_GROUND_TRUTH, "2")
    assert grade_pure("no box", None) == (Verdict.NO_GROUND_TRUTH, "")
    assert grade_pure("\\boxed{2", "2") == (Verdict.NO_ANSWER, "")  # a truncated box
