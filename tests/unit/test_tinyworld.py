"""puremesh.tinyworld without a bootstrap: the task's problems, flawed solutions and first-error
labels, its data files, drills, the models' shape, and the quality grader (the verify service's)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from puremesh.services.verify import grading
from puremesh.tinyworld.corpus import apply_op
from puremesh.tinyworld.models import HIDDEN_SIZE, NUM_LAYERS, model_shape
from puremesh.tinyworld.quality import solved
from puremesh.tinyworld.task import (
    CARRY,
    TASK_MAX_VALUE,
    TASK_MIN_VALUE,
    build_task,
    drill_rows,
    is_carry_step,
    task_problem,
    task_solution,
)

PROBLEMS = [task_problem(random.Random(seed)) for seed in range(200)]


def _values(problem) -> list[int]:
    values = [problem.start]
    for o in problem.operations:
        values.append(apply_op(values[-1], o.op, o.operand))
    return values


def test_problems_stay_in_range_and_restate_each_event() -> None:
    for problem in PROBLEMS:
        assert 2 <= len(problem.operations) <= 4
        assert all(TASK_MIN_VALUE <= v <= TASK_MAX_VALUE for v in _values(problem))
        assert problem.answer == _values(problem)[-1]
        assert all(o.phrase in problem.question for o in problem.operations)
    assert 0.3 < sum(p.carry_steps() == 0 for p in PROBLEMS) / len(PROBLEMS) < 0.6  # documented ~43%


def test_a_correct_solution_is_right_everywhere() -> None:
    for problem in PROBLEMS:
        solution = task_solution(problem, random.Random(0))
        assert solution.correct and len(solution.steps) == len(problem.operations) + 1
        assert solution.steps[-1] == f"The answer is \\boxed{{{problem.answer}}}"
        assert grading.grade(solution.text, str(problem.answer))[0] is grading.Verdict.CORRECT


def test_a_forgotten_carry_is_the_first_error_and_later_steps_follow_it() -> None:
    problem = next(p for p in PROBLEMS if p.carry_steps() >= 1)
    solution = task_solution(problem, random.Random(0), slip_rate=1.0)
    values = _values(problem)
    first = next(k for k, o in enumerate(problem.operations) if is_carry_step(values[k], o.op, o.operand))
    wrong = values[first + 1] - CARRY
    assert solution.steps[first].endswith(f"= {wrong}")
    assert solution.labels == tuple([1] * first + [0] * (len(solution.steps) - first))
    if first + 1 < len(problem.operations):  # the next step computes on the written (wrong) value
        assert f": {wrong} " in solution.steps[first + 1]


def test_error_labels_are_first_error_and_every_error_is_marked() -> None:
    rng = random.Random(1)
    for problem in PROBLEMS:
        solution = task_solution(problem, rng, slip_rate=0.5, error_rate=0.3)
        assert list(solution.labels) == sorted(solution.labels, reverse=True)
        right = grading.grade(solution.text, str(problem.answer))[0] is grading.Verdict.CORRECT
        assert solution.correct <= right  # a solution labelled correct ends in the right answer


def test_build_task_is_deterministic_and_keeps_held_out_apart(tmp_path: Path) -> None:
    rates = {"sft_slip_rate": 0.65, "prm_slip_rate": 0.5, "prm_error_rate": 0.08}
    first = build_task(tmp_path / "a", 60, 30, 3, **rates)
    second = build_task(tmp_path / "b", 60, 30, 3, **rates)
    for name in ("train", "heldout", "sft", "prm", "prm_heldout"):
        assert getattr(first, name).read_bytes() == getattr(second, name).read_bytes()
    train = [json.loads(line) for line in first.train.read_text().splitlines()]
    heldout = [json.loads(line) for line in first.heldout.read_text().splitlines()]
    assert (len(train), len(heldout)) == (60, 30)
    assert not {r["question"] for r in train} & {r["question"] for r in heldout}
    other = build_task(tmp_path / "c", 60, 30, 4, **rates)
    assert other.train.read_bytes() != first.train.read_bytes()


def test_drill_rows_train_on_results_only(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True)
    [(ids, mask)] = drill_rows(tokenizer, random.Random(0), 1, 3)
    text = tokenizer.decode(ids)
    lines = text.splitlines()
    assert len(lines) == 3 and text.endswith("\n")
    learnt = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert learnt.split() == [line.split("= ")[1] for line in lines]


def test_model_shape_is_the_shared_tiny_size() -> None:
    assert model_shape(HIDDEN_SIZE, NUM_LAYERS) == {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
    }
    assert model_shape(64, 1)["num_key_value_heads"] == 1


@pytest.mark.parametrize(
    ("text", "answer", "right"),
    [
        ("First, ...: 17 + 5 = 22\n\nThe answer is \\boxed{22}", "22", True),
        ("The answer is \\boxed{22.0}", "22", True),  # math-verify: equal numbers
        ("The answer is 22.", "22", True),  # no box: the final-answer phrase counts
        ("The answer is \\boxed{12}", "22", False),
        ("\\boxed{22} at first, but The answer is \\boxed{21}", "22", False),  # the last box wins
        ("no answer here", "22", False),
        ("The answer is \\boxed{22}", None, False),  # no ground truth: never solved
    ],
)
def test_quality_grades_with_the_verify_grader(text: str, answer: str | None, right: bool) -> None:
    assert solved(text, answer) is right
    assert right is (grading.grade(text, answer)[0] is grading.Verdict.CORRECT)
