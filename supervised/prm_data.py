"""Step-labelled data for PRM training, and its encoding in the PRM service's own input layout.

Data: JSONL, one solution per line, {"prompt": str, "steps": [str, ...], "labels": [0|1, ...]}
(label 1 = "this step is correct"; one label per step). `prompt` is the policy prompt exactly as
the policy sees it (e.g. `puremesh.trainer.data.format_prompt(question)`).

Layout: exactly the serving layout (pure-algorithm.md section 2), built by the contract's
`split_steps` + `prm_input` (puremesh.contract.steps) on the same tokenizer, so that training
and scoring agree token for token. The response is the steps joined by the step separator plus
EOS, tokenised the way the policy would have produced it; the label of step k sits on the step
tag ("\\n" by default, or a dedicated tag token: contract/steps.py StepLayout) that `prm_input`
inserts after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puremesh.contract.steps import STEP_SEPARATOR, StepLayout, prm_input, separator_ids, split_steps


@dataclass(frozen=True)
class StepRecord:
    """One step-labelled solution."""

    prompt: str
    steps: tuple[str, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class EncodedRecord:
    """A record in the PRM layout: input ids, read-out positions and one label per position."""

    input_ids: list[int]
    positions: list[int]
    labels: list[int]


def _check_steps(steps: Any, where: str) -> None:
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s for s in steps):
        raise ValueError(f"{where}: 'steps' must be a non-empty list of non-empty strings")
    if any(STEP_SEPARATOR in s for s in steps):
        raise ValueError(f"{where}: a step may not contain a blank line (the step separator)")


def parse_record(row: Any, where: str) -> StepRecord:
    """A StepRecord from one decoded JSON row; ValueError naming `where` if it is malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with prompt, steps and labels")
    prompt, steps, labels = row.get("prompt"), row.get("steps"), row.get("labels")
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string")
    _check_steps(steps, where)
    if not isinstance(labels, list) or not all(v in (0, 1) and not isinstance(v, float) for v in labels):
        raise ValueError(f"{where}: 'labels' must be a list of 0/1")
    if len(labels) != len(steps):
        raise ValueError(f"{where}: {len(steps)} steps but {len(labels)} labels")
    return StepRecord(prompt, tuple(steps), tuple(int(v) for v in labels))


def load_records(path: str | Path) -> list[StepRecord]:
    """Every record of a JSONL file; ValueError with "FILE:LINE: why" for the first bad line.
    Blank lines are skipped; a file without records is an error."""
    path = Path(path)
    records = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
                records.append(parse_record(row, f"{path}:{number}"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text") from error
    if not records:
        raise ValueError(f"{path}: no records")
    return records


class PrmLayout:
    """The serving layout (see the module docstring) on one tokenizer, with `step` (the step tag
    and read-out; PURE's by default): ValueError at construction unless the step tag is one
    token and some token decodes to text ending in the step separator."""

    def __init__(self, tokenizer: Any, step: StepLayout | None = None) -> None:
        self.tokenizer = tokenizer
        self.step = step or StepLayout()
        tag = tokenizer.encode(self.step.step_tag, add_special_tokens=False)
        if len(tag) != 1:
            raise ValueError(
                f"the tokenizer must encode the step tag {self.step.step_tag!r} as one token, got {tag}"
            )
        self.newline_id = tag[0]
        self.eos_id = tokenizer.eos_token_id
        texts = tokenizer.batch_decode(
            [[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False
        )
        self.separator_ids = separator_ids(texts)
        if not self.separator_ids:
            raise ValueError('the tokenizer has no token that decodes to text ending in "\\n\\n"')
        self.drop_ids = self.separator_ids | ({self.eos_id} if self.eos_id is not None else set())

    def encode(self, record: StepRecord) -> EncodedRecord:
        """`record` in the PRM layout; ValueError if its steps do not tokenise into as many steps."""
        prompt_ids = self.tokenizer.encode(record.prompt, add_special_tokens=False)
        response_ids = self.tokenizer.encode(STEP_SEPARATOR.join(record.steps), add_special_tokens=False)
        if self.eos_id is not None:
            response_ids.append(self.eos_id)
        spans = split_steps(response_ids, self.separator_ids)
        if len(spans) != len(record.steps):
            raise ValueError(f"the steps tokenise into {len(spans)} steps, not {len(record.steps)}")
        input_ids, positions = prm_input(prompt_ids, response_ids, spans, self.newline_id, self.drop_ids)
        return EncodedRecord(input_ids, positions, list(record.labels))
