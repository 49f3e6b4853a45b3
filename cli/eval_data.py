"""`puremesh eval`'s inputs and outputs: evaluation sets and per-set results (the prompt templates
are trainer/data.py's, chosen with the learner's PromptSettings).

A set is a JSONL file (one object per line) or a parquet file, in PURE's layout (`question`,
`answer`) or MATH's (`problem`, and a `solution` whose last \\boxed{} holds the answer; an
`answer` field, when present and not empty, wins). A row without a question or without any
answer is an error naming the file and the row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from puremesh.contract.verdict import Verdict
from puremesh.services.verify import grading
from puremesh.trainer.data import PURE_TEMPLATE

__all__ = ["PURE_TEMPLATE", "EvalItem", "ItemResult", "load_items", "set_names", "summarize", "table"]


@dataclass(frozen=True)
class EvalItem:
    question: str
    answer: str  # the gold answer, as the grader compares it


def _rows(path: Path) -> Iterable[tuple[str, Any]]:
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as error:
            raise ValueError(f"{path}: not a readable parquet file ({error})") from error
        yield from ((f"{path}: row {n}", row) for n, row in enumerate(rows, start=1))
        return
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error


def _text(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def _item(row: Any, where: str) -> EvalItem:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with question and answer (or problem and solution)")
    question = _text(row, "question") or _text(row, "problem")
    if question is None:
        raise ValueError(f"{where}: no 'question' (or 'problem')")
    answer = _text(row, "answer")
    if answer is None and _text(row, "solution") is not None:
        answer = grading.gold_answer(str(row["solution"]))
    if not grading.has_ground_truth(answer):
        raise ValueError(f"{where}: no 'answer' (or 'solution' with a \\boxed{{}} answer)")
    return EvalItem(question, str(answer))


def load_items(path: str | Path) -> list[EvalItem]:
    """Every row of one evaluation set (see the module docstring); ValueError for a bad row or
    an empty file, OSError when it cannot be read."""
    path = Path(path)
    try:
        items = [_item(row, where) for where, row in _rows(path)]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason})") from error
    if not items:
        raise ValueError(f"{path}: no rows")
    return items


def set_names(paths: Sequence[str | Path]) -> list[str]:
    """One name per set: the file's stem, made unique with -2, -3, ... when stems repeat."""
    names: list[str] = []
    for path in paths:
        stem, name, k = Path(path).stem, Path(path).stem, 2
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names.append(name)
    return names


@dataclass(frozen=True)
class ItemResult:
    index: int
    question: str
    answer: str
    response: str
    extracted: str
    verdict: Verdict
    tokens: int
    finish_reason: str

    @property
    def correct(self) -> bool:
        return self.verdict.solved

    def record(self) -> dict:
        return {**asdict(self), "verdict": str(self.verdict), "correct": self.correct}


def summarize(results: Sequence[ItemResult]) -> dict:
    """A set's accuracy with its standard error sqrt(p (1 - p) / n), and how many answered."""
    n = len(results)
    accuracy = sum(r.correct for r in results) / n if n else 0.0
    return {
        "n": n,
        "correct": sum(r.correct for r in results),
        "accuracy": accuracy,
        "stderr": math.sqrt(accuracy * (1 - accuracy) / n) if n else 0.0,
        "answered": sum(bool(r.extracted) for r in results),
        "truncated": sum(r.finish_reason == "length" for r in results),
        "mean_tokens": sum(r.tokens for r in results) / n if n else 0.0,
    }


def table(summaries: dict[str, dict]) -> str:
    """The per-set accuracy table that `puremesh eval` prints."""
    width = max([len("set"), *map(len, summaries)])
    lines = [f"{'set':<{width}}  {'n':>6}  {'accuracy':>8}  {'stderr':>6}  {'answered':>8}  {'cut off':>7}"]
    for name, s in summaries.items():
        lines.append(
            f"{name:<{width}}  {s['n']:>6}  {s['accuracy']:>8.3f}  {s['stderr']:>6.3f}  "
            f"{s['answered'] / max(1, s['n']):>8.1%}  {s['truncated'] / max(1, s['n']):>7.1%}"
        )
    return "\n".join(lines)
