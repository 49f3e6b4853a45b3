"""trainer/data.py: problem loading (JSONL, parquet, "null" answers, malformed rows), the prompt
template, and ProblemStream's determinism and resumable position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from puremesh.trainer.data import (
    PROMPT_TEMPLATE,
    Problem,
    ProblemStream,
    format_prompt,
    keep_ground_truth,
    load_problems,
    reasoning_gym_problems,
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_loading_and_missing_ground_truth(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"question": "What is 2 + 3?", "answer": "5"},
            {"question": "Q2", "answer": "null"},
            {"question": "Q3", "answer": None},
            {"question": "Q4", "answer": ""},
            {"question": "Q5", "answer": 7},
            {"question": "Q6", "answer": " NULL "},
            "",  # blank lines are skipped
        ],
    )
    assert load_problems(path) == [
        Problem("What is 2 + 3?", "5"),
        Problem("Q2", None),
        Problem("Q3", None),
        Problem("Q4", None),
        Problem("Q5", "7"),
        Problem("Q6", None),
    ]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps(["a", "b"]), "expected an object"),
        (json.dumps({"answer": "1"}), "'question'"),
        (json.dumps({"question": "  ", "answer": "1"}), "'question'"),
        (json.dumps({"question": "Q"}), "missing 'answer'"),
        (json.dumps({"question": "Q", "answer": [1]}), "'answer'"),
        (json.dumps({"question": "Q", "answer": True}), "'answer'"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "1"}, "", line])
    with pytest.raises(ValueError, match=why) as raised:
        load_problems(path)
    assert f"{path}:3" in str(raised.value)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no problems"):
        load_problems(path)


def test_parquet_loading(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "p.parquet"
    table = pa.table({"question": ["A", "B", "C"], "answer": ["1", "null", None], "extra": [1, 2, 3]})
    pq.write_table(table, path)
    assert load_problems(path) == [Problem("A", "1"), Problem("B", None), Problem("C", None)]

    pq.write_table(pa.table({"question": ["A"]}), tmp_path / "no_answer.parquet")
    with pytest.raises(ValueError, match="missing column"):
        load_problems(tmp_path / "no_answer.parquet")
    pq.write_table(pa.table({"question": ["A", ""], "answer": ["1", "2"]}), tmp_path / "blank.parquet")
    with pytest.raises(ValueError, match="row 2"):
        load_problems(tmp_path / "blank.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet"):
        load_problems(tmp_path / "junk.parquet")


def test_keep_ground_truth_keeps_the_fraction_and_nulls_the_rest() -> None:
    problems = [Problem(f"q{i}", str(i)) for i in range(200)]
    kept = keep_ground_truth(problems, 0.1, seed=3)
    assert [p.question for p in kept] == [p.question for p in problems]  # same order, same prompts
    with_truth = [p for p in kept if p.answer is not None]
    assert len(with_truth) == 20 and all(p.answer == p.question[1:] for p in with_truth)
    assert kept == keep_ground_truth(problems, 0.1, seed=3)  # deterministic in the seed
    assert kept != keep_ground_truth(problems, 0.1, seed=4)
    assert keep_ground_truth(problems, 1.0) == problems
    assert all(p.answer is None for p in keep_ground_truth(problems, 0.0))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            keep_ground_truth(problems, bad)


def test_format_prompt() -> None:
    prompt = format_prompt("  What is 2 + 3?\n")
    assert prompt == PROMPT_TEMPLATE.format(question="What is 2 + 3?")
    assert prompt.startswith("Question: What is 2 + 3?\n")
    assert "\\boxed{}" in prompt and "step by step" in prompt
    assert prompt.endswith("\n") and not prompt.endswith("\n\n")


def problems(n: int) -> list[Problem]:
    return [Problem(f"q{i}", str(i)) for i in range(n)]


def test_stream_epochs_are_permutations_and_deterministic() -> None:
    items = problems(10)
    a, b = ProblemStream(items, seed=3), ProblemStream(items, seed=3)
    first, second = a.next_batch(10), a.next_batch(10)
    assert sorted(p.question for p in first) == sorted(p.question for p in items)
    assert sorted(p.question for p in second) == sorted(p.question for p in items)
    assert first != second  # a fresh shuffle per epoch
    assert b.next_batch(7) + b.next_batch(13) == first + second  # batch sizes do not matter
    assert ProblemStream(items, seed=4).next_batch(10) != first
    assert a.position == (2, 0) and b.position == (2, 0)


def test_stream_state_round_trip() -> None:
    items = problems(7)
    stream = ProblemStream(items, seed=1)
    stream.next_batch(9)  # one epoch and 2 into the next
    state = json.loads(json.dumps(stream.state()))
    assert state == {"seed": 1, "epoch": 1, "index": 2, "size": 7}
    resumed = ProblemStream.from_state(items, state)
    assert resumed.position == stream.position == (1, 2)
    assert resumed.next_batch(20) == stream.next_batch(20)


def test_stream_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        ProblemStream([])
    with pytest.raises(ValueError):
        ProblemStream(problems(3)).next_batch(-1)
    with pytest.raises(ValueError, match="saved for 5"):
        ProblemStream.from_state(problems(3), {"seed": 0, "epoch": 0, "index": 0, "size": 5})
    with pytest.raises(ValueError, match="malformed"):
        ProblemStream.from_state(problems(3), {"epoch": 0})
    with pytest.raises(ValueError, match="outside"):
        ProblemStream.from_state(problems(3), {"seed": 0, "epoch": 0, "index": 4})
    assert ProblemStream(problems(3)).next_batch(0) == []


def test_reasoning_gym_problems_have_integer_answers() -> None:
    pytest.importorskip("reasoning_gym")
    got = reasoning_gym_problems("basic_arithmetic", size=20, seed=5)
    assert len(got) == 20
    for problem in got:
        int(problem.answer or "x")
        assert problem.question
    assert got == reasoning_gym_problems("basic_arithmetic", size=20, seed=5)
