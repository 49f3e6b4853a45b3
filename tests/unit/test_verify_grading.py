"""Answer grading (services/verify/grading.py): extraction, ground-truth presence, math-verify
verdicts, and the pure-core import boundary (rule of the house 1)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from puremesh.contract.verdict import Verdict
from puremesh.services.verify.grading import (
    answers_match,
    classify,
    extract_final_answer,
    gold_answer,
    grade,
    has_ground_truth,
)

GRADING = Path(__file__).resolve().parents[2] / "services" / "verify" / "grading.py"

# ---- extraction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"So the result is $\boxed{42}$.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"nested: \boxed{\frac{\sqrt{a^{2}+b^{2}}}{2}} done", r"\frac{\sqrt{a^{2}+b^{2}}}{2}"),
        (r"escaped braces \boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"first \boxed{1}, then I correct myself: \boxed{2}", "2"),
        (r"\boxed{3} and \fbox{x^{2}}", "x^{2}"),
        (r"truncated after a good box: \boxed{7} and \boxed{8", "7"),
        (r"empty last box is skipped \boxed{5} \boxed{}", "5"),
        (r"MATH style \boxed 5$ ok", "5"),
        ("The answer is 42.", "42"),
        ("Therefore, the answer is: $x = 3$", "x = 3"),
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
        ("Some work.\nFinal answer: 17", "17"),
        ("Natalia sold 48 clips.\n#### 72", "72"),
        ("**Answer:** 12", "12"),
        ("answer: -3.5", "-3.5"),
        ("Answer: 1\nWait, that is wrong.\nAnswer: 2", "2"),
        (r"boxed wins over phrases: \boxed{9}. The answer is 8.", "9"),
        ("No final answer in this response.", None),
        ("", None),
        (r"\boxed{}", None),
        (r"unclosed \boxed{12", None),
    ],
)
def test_extract_final_answer(response: str, expected: str | None) -> None:
    assert extract_final_answer(response) == expected


def test_extraction_is_linear_on_adversarial_input() -> None:
    # 20k unclosed boxes: a naive scan from each box to the end would be quadratic.
    assert extract_final_answer("\\boxed{" * 20_000) is None
    assert extract_final_answer("\\boxed{1}" + "\\boxed{" * 20_000) == "1"


# ---- ground truth ---------------------------------------------------------------------------


@pytest.mark.parametrize("gt", [None, "", "   ", "\n\t", "null", "NULL", "None", "none", "  None "])
def test_absent_ground_truth(gt: str | None) -> None:
    assert not has_ground_truth(gt)
    assert grade(r"\boxed{4}", gt) == (Verdict.NO_GROUND_TRUTH, "4")
    assert grade("no answer here", gt) == (Verdict.NO_GROUND_TRUTH, "")


@pytest.mark.parametrize("gt", ["0", "42", "nullity", "x", "None of the above"])
def test_present_ground_truth(gt: str) -> None:
    assert has_ground_truth(gt)


def test_gold_answer_takes_the_box_of_a_worked_solution() -> None:
    assert gold_answer(r"Adding gives $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert gold_answer(" $0.5$ ") == "0.5"
    assert gold_answer("x^2+1") == "x^2+1"


def test_classify_leaves_only_math_to_answers_match() -> None:
    assert classify("nothing", "3") == (Verdict.NO_ANSWER, "")
    assert classify(r"\boxed{3}", None) == (Verdict.NO_GROUND_TRUTH, "3")
    assert classify(r"\boxed{3}", "3") == (None, "3")


# ---- grading --------------------------------------------------------------------------------

GRADING_CASES = [
    # (response, ground truth, verdict, extracted answer)
    (r"\boxed{42}", "42", Verdict.CORRECT, "42"),
    (r"\boxed{\frac{1}{2}}", "1/2", Verdict.CORRECT, r"\frac{1}{2}"),
    (r"\boxed{0.5}", "1/2", Verdict.CORRECT, "0.5"),
    (r"\boxed{1/2}", r"\frac{1}{2}", Verdict.CORRECT, "1/2"),
    (r"\boxed{\dfrac{3}{4}}", "0.75", Verdict.CORRECT, r"\dfrac{3}{4}"),
    (r"\boxed{3.0}", "3", Verdict.CORRECT, "3.0"),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", Verdict.CORRECT, "(x+1)^2"),
    (r"\boxed{1+x^2}", "x^2+1", Verdict.CORRECT, "1+x^2"),
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", Verdict.CORRECT, r"\sqrt{12}"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2", Verdict.CORRECT, r"\frac{\sqrt{2}}{2}"),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", Verdict.CORRECT, r"\pi/2"),
    (r"\boxed{x=3}", "3", Verdict.CORRECT, "x=3"),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}", Verdict.CORRECT, r"\{2, 1\}"),
    (r"\boxed{[0,1)}", "[0,1)", Verdict.CORRECT, "[0,1)"),
    (r"\boxed{B}", r"\text{(B)}", Verdict.CORRECT, "B"),
    (r"\boxed{\text{(C)}}", "C", Verdict.CORRECT, r"\text{(C)}"),
    (r"\boxed{1,000}", "1000", Verdict.CORRECT, "1,000"),
    (r"\boxed{5\text{ cm}}", "5", Verdict.CORRECT, r"5\text{ cm}"),
    (r"\boxed{-1.0}", "$-1$", Verdict.CORRECT, "-1.0"),
    ("The answer is 72.", "72", Verdict.CORRECT, "72"),
    ("reasoning...\n#### 1,234", "1234", Verdict.CORRECT, "1,234"),
    (r"\boxed{3}", r"so the total is $\boxed{3}$", Verdict.CORRECT, "3"),
    (r"\boxed{43}", "42", Verdict.INCORRECT, "43"),
    (r"\boxed{0.33}", r"\frac{1}{3}", Verdict.INCORRECT, "0.33"),
    (r"\boxed{(x-1)^2}", "x^2+2x+1", Verdict.INCORRECT, "(x-1)^2"),
    (r"\boxed{(2,1)}", "(1,2)", Verdict.INCORRECT, "(2,1)"),
    (r"\boxed{A}", "B", Verdict.INCORRECT, "A"),
    (r"first \boxed{42} then \boxed{41}", "42", Verdict.INCORRECT, "41"),
    ("I could not solve it.", "42", Verdict.NO_ANSWER, ""),
    ("", "42", Verdict.NO_ANSWER, ""),
    (r"\boxed{7}", None, Verdict.NO_GROUND_TRUTH, "7"),
    (r"\boxed{7}", "  ", Verdict.NO_GROUND_TRUTH, "7"),
]


@pytest.mark.parametrize(("response", "gt", "verdict", "answer"), GRADING_CASES)
def test_grade(response: str, gt: str | None, verdict: Verdict, answer: str) -> None:
    assert grade(response, gt) == (verdict, answer)


def test_grading_table_is_broad() -> None:
    verdicts = [case[2] for case in GRADING_CASES]
    assert len(GRADING_CASES) >= 15
    assert {Verdict.CORRECT, Verdict.INCORRECT, Verdict.NO_ANSWER, Verdict.NO_GROUND_TRUTH} <= set(verdicts)


def test_answers_match_is_not_fooled_by_whitespace_or_delimiters() -> None:
    assert answers_match(" $ 42 $ ", "42")
    assert answers_match(r"\( \frac12 \)", "0.5")
    assert not answers_match("41", "42")


def test_grading_uses_the_contract_verdict() -> None:
    # One Verdict, from grading to the learner (contract/verdict.py; its values: test_contract.py).
    assert grade(r"\boxed{1}", None)[0] is Verdict.NO_GROUND_TRUTH
    assert isinstance(grade(r"\boxed{1}", "1")[0], Verdict)


# ---- rule 1: a pure core --------------------------------------------------------------------

BLOCKED = ("grpc", "ray", "vllm", "prometheus_client", "transformers", "pydantic", "yaml", "torch")
ALLOWED_THIRD_PARTY = {"math_verify", "sympy", "latex2sympy2_extended"}

PROBE = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = {blocked!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked by the import-boundary test: {{name}}")
            return None

    sys.meta_path.insert(0, Blocker())
    from puremesh.contract.verdict import Verdict
    from puremesh.services.verify.grading import grade

    assert grade(r"\\boxed{{0.5}}", "1/2") == (Verdict.CORRECT, "0.5")
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    """
).format(blocked=set(BLOCKED))


def test_grading_imports_with_service_dependencies_blocked() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_grading_imports_only_stdlib_math_verify_and_the_contract() -> None:
    allowed = set(sys.stdlib_module_names) | ALLOWED_THIRD_PARTY | {"__future__"}
    tree = ast.parse(GRADING.read_text(), filename=str(GRADING))
    names = [alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert names
    project = [name for name in names if name.split(".")[0] == "puremesh"]
    assert project == ["puremesh.contract.verdict"]
    assert not [name for name in names if name not in project and name.split(".")[0] not in allowed]
