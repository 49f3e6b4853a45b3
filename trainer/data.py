"""Training problems: loading, prompt templates, and a resumable shuffled stream.

Pure-ish on purpose: stdlib only, plus pyarrow for parquet files and reasoning-gym for its
generators, both imported lazily. No gRPC, nothing from services/.

A problem is a question and an optional ground-truth answer. PURE's data layout (PRM+VR mode,
pure-algorithm.md section 4) stores the answer "null" for the prompts that carry none; such
problems still get process rewards, and a verifiable reward of 0. `keep_ground_truth` gives a
problem list PURE's headline setting: ground truth on a fraction of the prompts only.

A prompt template (`PromptTemplate`) is a format string with one {question} field, optionally
wrapped as the user turn of the tokenizer's chat template (with a system prompt). The presets:
`pure`, PURE's own prompt with no chat template, and `tinyworld`, the tiny policy's. The settings
that choose one are trainer/settings.py's PromptSettings (training, the held-out evaluation and
`puremesh eval` alike).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = [
    "PRESETS",
    "PROMPT_TEMPLATE",
    "PURE_TEMPLATE",
    "Problem",
    "ProblemStream",
    "PromptTemplate",
    "TemplatePreset",
    "check_format",
    "format_prompt",
    "keep_ground_truth",
    "load_problems",
    "reasoning_gym_problems",
]

# The tiny policy is fine-tuned on exactly this template (tinyworld/task.py), so prompts built
# any other way are out of its distribution. It ends in one "\n": the response starts a new line
# and its first step is not glued to the question.
PROMPT_TEMPLATE = (
    "Question: {question}\n"
    "Solve it step by step, one step per paragraph, and put the final answer in \\boxed{{}}.\n"
)

# PURE's prompt (its public training and evaluation code), the question in front, no chat template.
PURE_TEMPLATE = (
    '{question}\n\nPlease reason step by step with steps separated by "\\n\\n", and put your final answer '
    "within \\boxed{{}}."
)


class TemplatePreset(StrEnum):
    """Named prompt templates: PURE's, or the tiny world's."""

    PURE = "pure"
    TINYWORLD = "tinyworld"


PRESETS = {TemplatePreset.PURE: PURE_TEMPLATE, TemplatePreset.TINYWORLD: PROMPT_TEMPLATE}

# Answer values that mean "no ground truth" (compared after strip + lower).
_NO_ANSWER = {"", "null", "none"}


@dataclass(frozen=True)
class Problem:
    """One training or evaluation problem. `answer` None = no ground truth."""

    question: str
    answer: str | None


def check_format(text: str) -> None:
    """ValueError, in one line, unless `text` is a format string whose only field is {question}
    (literal braces doubled: "\\boxed{{}}")."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as error:
        raise ValueError(f"prompt template {text!r} is not a format string ({error})") from None
    if "question" not in fields:
        raise ValueError(f"prompt template {text!r} has no {{question}} field")
    if fields != {"question"}:
        others = ", ".join(sorted("{" + f + "}" for f in fields - {"question"}))
        raise ValueError(f"prompt template {text!r} has fields other than {{question}}: {others}")


@dataclass(frozen=True)
class PromptTemplate:
    """The prompt around a question: `format` (with {question}), then, with `chat`, the
    tokenizer's chat template around it as the user turn, after a system turn of `system` (when
    not empty), ending with the assistant's generation prompt."""

    format: str = PROMPT_TEMPLATE
    chat: bool = False
    system: str = ""

    def __post_init__(self) -> None:
        check_format(self.format)
        if self.system and not self.chat:
            raise ValueError("a system prompt needs the chat template (chat_template: true)")

    def render(self, question: str, tokenizer: Any = None) -> str:
        """The prompt text for `question` (stripped). ValueError when the chat template is asked
        for and `tokenizer` has none."""
        text = self.format.format(question=question.strip())
        if not self.chat:
            return text
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("the prompt asks for the tokenizer's chat template, and the tokenizer has none")
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def describe(self) -> str:
        chat = f", in the chat template with system prompt {self.system!r}" if self.chat else ""
        return f"{self.format!r}{chat}"


def format_prompt(question: str) -> str:
    """The tiny world's prompt for `question` (PROMPT_TEMPLATE, question stripped)."""
    return PromptTemplate().render(question)


def _answer(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: 'answer' must be a string, a number or null, got {type(value).__name__}")
    text = str(value).strip()
    return None if text.lower() in _NO_ANSWER else text


def _problem(row: Any, where: str) -> Problem:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object with 'question' and 'answer'")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    if "answer" not in row:
        raise ValueError(f"{where}: missing 'answer' (use null when there is no ground truth)")
    return Problem(question=question, answer=_answer(row["answer"], where))


def _jsonl_rows(path: Path) -> Iterable[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error


def _parquet_rows(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:  # pragma: no cover - pyarrow is a dependency
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from error
    try:
        table = pq.read_table(path)
    except Exception as error:
        raise ValueError(f"{path}: not a readable parquet file ({error})") from error
    missing = [name for name in ("question", "answer") if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    for number, row in enumerate(table.select(["question", "answer"]).to_pylist(), start=1):
        yield f"{path}: row {number}", row


def load_problems(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file (one object per line) or a parquet file (".parquet").

    Each row has `question` (non-empty string) and `answer` (string or number; null, "", "null"
    and "None" mean no ground truth). Blank JSONL lines are skipped. ValueError, naming the file
    and the line (or parquet row), for a malformed row; OSError if the file cannot be read.
    """
    path = Path(path)
    rows = _parquet_rows(path) if path.suffix.lower() in (".parquet", ".pq") else _jsonl_rows(path)
    try:
        problems = [_problem(row, where) for where, row in rows]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason})") from error
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def keep_ground_truth(problems: Sequence[Problem], fraction: float, seed: int = 0) -> list[Problem]:
    """`problems` with the answer kept on round(fraction * len(problems)) of them, chosen at random
    (deterministic in `seed`), and None, PURE's "null", on the others. fraction 1 keeps them all."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    keep = set(
        random.Random(f"ground-truth:{seed}").sample(range(len(problems)), round(fraction * len(problems)))
    )
    return [p if i in keep else Problem(p.question, None) for i, p in enumerate(problems)]


def reasoning_gym_problems(
    name: str = "basic_arithmetic", size: int = 1000, seed: int = 0, **config: Any
) -> list[Problem]:
    """`size` problems with integer answers from a reasoning-gym generator (offline, procedural).

    `name` is any reasoning-gym dataset ("basic_arithmetic", "chain_sum", "gsm_symbolic", ...),
    `config` its generator settings. Items whose answer is not an integer are skipped (so the
    generator is asked for more than `size`); ValueError if it yields too few integer answers.
    """
    import reasoning_gym

    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    problems: list[Problem] = []
    # Ask for extra items once; a generator that is mostly non-integer fails below.
    for item in reasoning_gym.create_dataset(name, size=2 * size + 16, seed=seed, **config):
        answer = str(item["answer"]).strip()
        try:
            int(answer)
        except ValueError:
            continue
        problems.append(Problem(question=str(item["question"]).strip(), answer=answer))
        if len(problems) == size:
            return problems
    raise ValueError(f"reasoning-gym {name!r} gave only {len(problems)} integer-answer problems")


class ProblemStream:
    """Deterministic shuffled epochs over a fixed list of problems, resumable.

    Epoch e visits every problem once, in the order of `random.Random(f"{seed}:{e}")`'s shuffle
    of range(len(problems)), so the order depends only on (seed, epoch), never on how the stream
    was consumed. `position` = (epoch, index into that epoch's order) of the next problem; save
    it with `state()` and continue exactly there with `from_state(problems, state)`.
    """

    def __init__(self, problems: Sequence[Problem], seed: int = 0, epoch: int = 0, index: int = 0) -> None:
        if not problems:
            raise ValueError("a ProblemStream needs at least one problem")
        if epoch < 0 or not 0 <= index <= len(problems):
            raise ValueError(f"position ({epoch}, {index}) is outside the stream of {len(problems)}")
        self.problems = list(problems)
        self.seed = int(seed)
        self._epoch = int(epoch)
        self._index = int(index)
        self._order = self._order_of(self._epoch)
        self._roll_over()

    def _order_of(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, index) of the next problem."""
        return self._epoch, self._index

    def next_batch(self, k: int) -> list[Problem]:
        """The next `k` problems, crossing into the next epoch (a fresh shuffle) as needed."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        batch: list[Problem] = []
        while len(batch) < k:
            batch.append(self.problems[self._order[self._index]])
            self._index += 1
            self._roll_over()
        return batch

    def _roll_over(self) -> None:
        # The position is kept canonical: a finished epoch is (epoch + 1, 0), never (epoch, size).
        if self._index == len(self.problems):
            self._epoch += 1
            self._index = 0
            self._order = self._order_of(self._epoch)

    def state(self) -> dict[str, int]:
        """A JSON-able position: {"seed", "epoch", "index", "size"}."""
        return {"seed": self.seed, "epoch": self._epoch, "index": self._index, "size": len(self.problems)}

    @classmethod
    def from_state(cls, problems: Sequence[Problem], state: Mapping[str, Any]) -> ProblemStream:
        """The stream at a saved position. ValueError if the state is malformed or was saved for
        a problem list of another size."""
        try:
            seed, epoch, index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"malformed ProblemStream state {dict(state)!r}") from error
        size = state.get("size")
        if size is not None and int(size) != len(problems):
            raise ValueError(f"the state was saved for {size} problems, got {len(problems)}")
        return cls(problems, seed=seed, epoch=epoch, index=index)
