"""`puremesh eval` end to end on a local model with the transformers engine: the outputs of
PURE's protocol (greedy, one sample, a token cap, the verify service's grader), and one-line
refusals of bad input."""

from __future__ import annotations

import json

import pytest

from puremesh.cli.main import main
from puremesh.services.verify import grading

pytestmark = pytest.mark.integration


def test_eval_writes_results_and_one_line_per_item(tiny_policy_dir, tmp_path, capsys):
    pure = tmp_path / "sums.jsonl"
    pure.write_text(
        "".join(json.dumps({"question": f"What is {a} + 1?", "answer": a + 1}) + "\n" for a in range(5))
    )
    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"problem": "What is 1 + 1?", "solution": "It is $\\boxed{2}$."}) + "\n")
    out = tmp_path / "out"
    argv = [
        "eval",
        "--model",
        str(tiny_policy_dir),
        "--data",
        str(pure),
        "--data",
        str(math),
        "--out",
        str(out),
    ]
    code = main([*argv, "--engine", "hf", "--max-new-tokens", "6", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sums" in printed and "math" in printed and "accuracy" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["max_new_tokens"] == 6 and results["template"] == "pure" and results["engine"] == "hf"
    for name, n in (("sums", 5), ("math", 1)):
        items = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert [item["index"] for item in items] == list(range(n))
        summary = results["sets"][name]
        assert summary["n"] == n and summary["correct"] == sum(item["correct"] for item in items)
        for item in items:
            assert 1 <= item["tokens"] <= 6 and item["finish_reason"] in ("stop", "length")
            # graded exactly as the verify service grades
            assert item["verdict"] == grading.grade(item["response"], item["answer"])[0]
    assert json.loads((out / "math.jsonl").read_text())["answer"] == "2"  # the solution's last box


def test_bad_input_is_one_line_and_exit_2(tiny_policy_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q"}) + "\n")
    cases = [
        (["--model", str(tmp_path), "--data", str(data)], "not a local model directory"),
        (["--model", str(tiny_policy_dir), "--data", str(data)], f"{data}:1: no 'answer'"),
        (["--model", str(tiny_policy_dir), "--data", str(tmp_path / "none.jsonl")], "cannot read"),
        (["--model", str(tiny_policy_dir), "--data", str(data), "--max-new-tokens", "0"], "--max-new-tokens"),
    ]
    for flags, message in cases:
        assert main(["eval", *flags, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
