"""puremesh.tinyworld without a bootstrap: the task's problems and their content, flawed and
padded solutions and their first-error labels, the data files (held-out disjoint by content),
drills, the models' shape, and the quality grader (the verify service's)."""

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
from puremesh.tinyworld.solutions import CARRY, MAX_PADS_PER_GAP, RETHINK_PHRASES, task_solution
from puremesh.tinyworld.task import (
    TASK_MAX_VALUE,
    TASK_MIN_VALUE,
    is_carry_step,
    parse_question,
    task_problem,
)
from puremesh.tinyworld.taskdata import TaskSpec, build_task, drill_rows

PROBLEMS = [task_problem(random.Random(seed)) for seed in range(200)]


RATES = TaskSpec(
    sft_slip_rate=0.65, sft_pad_rate=0.2, prm_slip_rate=0.5, prm_error_rate=0.08, prm_pad_rate=0.3
)


def _values(problem) -> list[int]:
    values = [problem.start]
    for o in problem.operations:
        values.append(apply_op(values[-1], o.op, o.operand))
    return values


def _content(question: str) -> tuple:
    return parse_question(question)


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


def test_build_task_is_deterministic_and_keeps_held_out_apart_by_content(tmp_path: Path) -> None:
    first = build_task(tmp_path / "a", 400, 200, 3, RATES)
    second = build_task(tmp_path / "b", 400, 200, 3, RATES)
    for name in ("train", "heldout", "sft", "prm", "prm_heldout"):
        assert getattr(first, name).read_bytes() == getattr(second, name).read_bytes()
    train = [json.loads(line) for line in first.train.read_text().splitlines()]
    heldout = [json.loads(line) for line in first.heldout.read_text().splitlines()]
    assert (len(train), len(heldout)) == (400, 200)
    # Disjoint by arithmetic content (start, operations, operands), read back from the questions'
    # text: not one held-out chain is trained on, whatever its names and phrasings.
    held_contents = [_content(r["question"]) for r in heldout]
    assert len(set(held_contents)) == len(held_contents)
    assert not {_content(r["question"]) for r in train} & set(held_contents)
    other = build_task(tmp_path / "c", 400, 200, 4, RATES)
    assert other.train.read_bytes() != first.train.read_bytes()


def test_without_the_content_rule_the_same_draw_would_overlap(tmp_path: Path) -> None:
    """The disjointness above is not luck: drawn as before (distinct questions only), this many
    problems share contents (issue 11 counted 133 of 500 held-out problems in the old world)."""
    rng = random.Random(0)
    held = [task_problem(rng) for _ in range(200)]
    train = [task_problem(rng) for _ in range(4000)]
    assert {p.content for p in train} & {p.content for p in held}


def test_questions_read_back_to_their_content() -> None:
    for problem in PROBLEMS:
        assert parse_question(problem.question) == problem.content
        assert problem.content[0] == problem.start and len(problem.content[1]) == len(problem.operations)
    for bad in ("What is 3 + 4?", "Tom has 12 apples. First, he sings. How many apples does he have now?"):
        with pytest.raises(ValueError):
            parse_question(bad)


def test_pads_are_labelled_correct_before_the_first_error_and_wrong_after() -> None:
    rng = random.Random(2)
    seen_before = seen_after = 0
    for problem in PROBLEMS:
        solution = task_solution(problem, rng, slip_rate=0.5, pad_rate=0.5)
        assert list(solution.labels) == sorted(solution.labels, reverse=True)
        for step, label in zip(solution.steps, solution.labels, strict=True):
            if _is_pad(step):
                seen_before += label
                seen_after += 1 - label
        # a pad never changes the arithmetic: the answer is right unless a carry slipped
        right = grading.grade(solution.text, str(problem.answer))[0] is grading.Verdict.CORRECT
        assert solution.correct == right
    assert seen_before > 50 and seen_after > 20


def _is_pad(step: str) -> bool:
    return step.startswith(("At the start,", "So far,", "Check:")) or step in RETHINK_PHRASES


def test_pads_say_true_things_and_repeat_at_most_a_few_times() -> None:
    rng = random.Random(3)
    for problem in PROBLEMS:
        solution = task_solution(problem, rng, pad_rate=0.9)
        assert solution.correct and solution.pads == sum(map(_is_pad, solution.steps))
        values = _values(problem)
        run = 0
        for step in solution.steps:
            run = run + 1 if _is_pad(step) else 0
            assert run <= MAX_PADS_PER_GAP
            if step.startswith("At the start,"):
                assert f" {problem.start} " in step
            if step.startswith("So far,"):
                assert any(f" {v} " in step for v in values[1:])
        assert len(solution.steps) - solution.pads == len(problem.operations) + 1


def test_restating_a_wrong_number_is_an_error() -> None:
    rng = random.Random(4)
    wrong_pads = 0
    for problem in PROBLEMS * 3:
        solution = task_solution(problem, rng, pad_rate=0.6, error_rate=0.3)
        for k, step in enumerate(solution.steps):
            if step.startswith("At the start,") and f" {problem.start} " not in step:
                wrong_pads += 1
                assert solution.labels[k] == 0
    assert wrong_pads > 0


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


def test_every_kind_of_error_is_the_first_error_where_the_text_first_differs() -> None:
    """Labels follow the first-error rule for every ErrorKind (arithmetic, operand, carried,
    event, answer, garbled) and the slip: all 1 up to the first step that differs from the
    correct solution, all 0 from there on."""
    rng = random.Random(5)
    kinds_seen = set()
    for problem in PROBLEMS * 2:
        right = task_solution(problem, random.Random(0)).steps
        solution = task_solution(problem, rng, slip_rate=0.5, error_rate=0.3)
        first = next(
            (k for k, (a, b) in enumerate(zip(solution.steps, right, strict=True)) if a != b), len(right)
        )
        assert solution.labels == tuple([1] * first + [0] * (len(right) - first))
        if first < len(right):
            broken = solution.steps[first]
            kinds_seen.add(
                "garbled" if not broken.startswith(("First", "Second", "Third", "Fourth", "The")) else "step"
            )
    assert kinds_seen == {"garbled", "step"}
