"""cli/eval_data.py: evaluation sets in PURE's and MATH's layouts, their refusals, the templates,
set names and the per-set summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from puremesh.cli.eval_data import (
    PURE_TEMPLATE,
    EvalItem,
    ItemResult,
    load_items,
    set_names,
    summarize,
)
from puremesh.contract.verdict import Verdict
from puremesh.trainer.data import TemplatePreset, format_prompt
from puremesh.trainer.settings import PromptSettings


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_pure_and_math_layouts(tmp_path):
    items = load_items(
        write(
            tmp_path / "a.jsonl",
            [
                {"question": " What is 2+3? ", "answer": 5},
                {"problem": "Simplify 6/4.", "solution": "We get $\\frac{6}{4} = \\boxed{\\frac{3}{2}}$."},
                {"problem": "p", "solution": "\\boxed{1}", "answer": "2"},  # an answer field wins
            ],
        )
    )
    assert items == [
        EvalItem("What is 2+3?", "5"),
        EvalItem("Simplify 6/4.", "\\frac{3}{2}"),
        EvalItem("p", "2"),
    ]
    table = pa.table({"question": ["q1", "q2"], "answer": ["1", "2"]})
    pq.write_table(table, tmp_path / "b.parquet")
    assert load_items(tmp_path / "b.parquet") == [EvalItem("q1", "1"), EvalItem("q2", "2")]


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ({"answer": "1"}, "no 'question'"),
        ({"question": "q"}, "no 'answer'"),
        ({"question": "q", "answer": "null"}, "no 'answer'"),
        ({"problem": "q", "solution": "   "}, "no 'answer'"),
        ("[1, 2]", "expected an object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, row, why):
    path = write(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "1"}, row])
    with pytest.raises(ValueError, match=why) as error:
        load_items(path)
    assert f"{path}:2" in str(error.value)
    with pytest.raises(ValueError, match="no rows"):
        load_items(write(tmp_path / "empty.jsonl", []))


def test_templates_and_names():
    pure = PromptSettings(preset=TemplatePreset.PURE).prompt_template()
    assert pure.render(" Q? ") == PURE_TEMPLATE.format(question="Q?")
    tail = 'Please reason step by step with steps separated by "\\n\\n", and put your final answer'
    assert pure.render("Q?") == "Q?\n\n" + tail + " within \\boxed{}."
    assert PromptSettings(preset=TemplatePreset.TINYWORLD).prompt_template().render("Q?") == format_prompt(
        "Q?"
    )
    assert set_names(["x/math.jsonl", "y/math.parquet", "aime.jsonl", "z/math.jsonl"]) == [
        "math",
        "math-2",
        "aime",
        "math-3",
    ]


def test_summary_accuracy_and_standard_error():
    def result(i: int, verdict: Verdict, reason: str = "stop") -> ItemResult:
        return ItemResult(
            i, "q", "1", "r", "" if verdict is Verdict.NO_ANSWER else "x", verdict, 10 * i, reason
        )

    results = [
        result(0, Verdict.CORRECT),
        result(1, Verdict.INCORRECT),
        result(2, Verdict.NO_ANSWER, "length"),
    ]
    results.append(result(3, Verdict.CORRECT))
    summary = summarize(results)
    assert summary["accuracy"] == 0.5 and summary["correct"] == 2 and summary["n"] == 4
    assert summary["stderr"] == pytest.approx(math.sqrt(0.25 / 4))
    assert summary["answered"] == 3 and summary["truncated"] == 1 and summary["mean_tokens"] == 15
    assert results[0].record()["verdict"] == "correct" and results[0].record()["correct"] is True
