"""`puremesh prm-train`: train a process reward model on step-labelled data.

Data: JSONL, one solution per line, {"prompt": str, "steps": [str, ...], "labels": [0|1, ...]}
(label 1 = "this step is correct"; one label per step). `prompt` is the policy prompt exactly as
the policy sees it (e.g. `puremesh.trainer.data.format_prompt(question)`).

Layout: exactly the serving layout (pure-algorithm.md section 2), built by the PRM service's own
`layout.split_steps` + `layout.prm_input` on the same tokenizer, so that training and scoring
agree token for token. The response is the steps joined by "\\n\\n" plus EOS, tokenised the way the
policy would have produced it; the PRM input is the prompt, then each step's content followed by
one "\\n" token; the label of step k sits on its "\\n". Cross-entropy is taken at those read-out
positions only.

Base model: a local directory with a Qwen2-style causal LM (the policy: its body is reused and a
fresh 2-way head is added) or a token-classification checkpoint, plus its tokenizer.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from puremesh.contract import steps as layout

from .errors import CliError

STEP_SEPARATOR = "\n\n"
LABELS = {0: "incorrect", 1: "correct"}


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


@dataclass(frozen=True)
class PrmMetrics:
    """Step-level quality on a labelled set: accuracy of "score > 0" against the label, the
    accuracy on each class, and the ROC AUC of the scores."""

    steps: int
    accuracy: float
    accuracy_correct: float
    accuracy_incorrect: float
    auc: float

    def line(self) -> str:
        return (
            f"step accuracy {self.accuracy:.3f} (correct steps {self.accuracy_correct:.3f}, "
            f"wrong steps {self.accuracy_incorrect:.3f}), AUC {self.auc:.3f} on {self.steps} steps"
        )


# --- data -----------------------------------------------------------------------------------


def parse_record(row: Any, where: str) -> StepRecord:
    """A StepRecord from one decoded JSON row; ValueError naming `where` if it is malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with prompt, steps and labels")
    prompt, steps, labels = row.get("prompt"), row.get("steps"), row.get("labels")
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s for s in steps):
        raise ValueError(f"{where}: 'steps' must be a non-empty list of non-empty strings")
    if any(STEP_SEPARATOR in s for s in steps):
        raise ValueError(f"{where}: a step may not contain a blank line (the step separator)")
    if not isinstance(labels, list) or not all(v in (0, 1) and not isinstance(v, float) for v in labels):
        raise ValueError(f"{where}: 'labels' must be a list of 0/1")
    if len(labels) != len(steps):
        raise ValueError(f"{where}: {len(steps)} steps but {len(labels)} labels")
    return StepRecord(prompt, tuple(steps), tuple(int(v) for v in labels))


def load_records(path: str | Path) -> list[StepRecord]:
    """Every record of a JSONL file; ValueError with "FILE:LINE: why" for the first bad line."""
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
    """The serving layout (services/prm/layout.py) on one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        newline = tokenizer.encode("\n", add_special_tokens=False)
        if len(newline) != 1:
            raise ValueError(f'the tokenizer must encode "\\n" as one token, got {newline}')
        self.newline_id = newline[0]
        self.eos_id = tokenizer.eos_token_id
        texts = tokenizer.batch_decode(
            [[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False
        )
        self.separator_ids = layout.separator_ids(texts)
        if not self.separator_ids:
            raise ValueError('the tokenizer has no token that decodes to text ending in "\\n\\n"')
        self.drop_ids = self.separator_ids | ({self.eos_id} if self.eos_id is not None else set())

    def encode(self, record: StepRecord) -> EncodedRecord:
        prompt_ids = self.tokenizer.encode(record.prompt, add_special_tokens=False)
        response_ids = self.tokenizer.encode(STEP_SEPARATOR.join(record.steps), add_special_tokens=False)
        if self.eos_id is not None:
            response_ids.append(self.eos_id)
        spans = layout.split_steps(response_ids, self.separator_ids)
        if len(spans) != len(record.steps):
            raise ValueError(f"the steps tokenise into {len(spans)} steps, not {len(record.steps)}")
        input_ids, positions = layout.prm_input(
            prompt_ids, response_ids, spans, self.newline_id, self.drop_ids
        )
        return EncodedRecord(input_ids, positions, list(record.labels))


# --- model ----------------------------------------------------------------------------------


def load_base(base_dir: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer): a 2-label token-classification model from a local causal-LM or
    token-classification checkpoint (a causal LM keeps its body and gets a fresh head)."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "newly initialised score head" is the point, not news
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
        model = AutoModelForTokenClassification.from_pretrained(
            str(base_dir),
            local_files_only=True,
            num_labels=2,
            id2label=dict(LABELS),
            label2id={v: k for k, v in LABELS.items()},
            dtype=torch.float32,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return model, tokenizer


def _batch(rows: Sequence[EncodedRecord], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    row_at, pos_at, labels = [], [], []
    for i, r in enumerate(rows):
        input_ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        attention[i, : len(r.input_ids)] = 1
        row_at += [i] * len(r.positions)
        pos_at += r.positions
        labels += r.labels
    return input_ids, attention, torch.tensor(row_at), torch.tensor(pos_at), torch.tensor(labels)


def _batches(n: int, batch_size: int, lengths: Sequence[int], rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length rows (less padding): shuffle, sort windows of 16
    batches by length, cut, shuffle the batches."""
    order = list(range(n))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for start in range(0, n, window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class SupervisedTraining:
    """The optimisation shared by PRM training and the tiny world's SFT: AdamW (betas 0.9/0.98,
    weight decay 0.01), linear warm-up over 5% of the steps then cosine decay, gradient
    clipping at 1, and the mean loss of each logging window (`last`). Puts `model` in train mode.
    """

    def __init__(
        self,
        model,
        total: int,
        lr: float,
        name: str,
        log: Callable[[str], None] | None = None,
        log_every: int = 100,
    ) -> None:
        warmup = max(1, total // 20)
        self.model, self.total, self.name = model, total, name
        self.log, self.log_every = log, log_every
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)),
        )
        model.train()
        self.last = float("nan")
        self._window: list[float] = []
        self._began = time.perf_counter()

    def step(self, step: int, loss: torch.Tensor) -> None:
        """One optimizer step on `loss` (step counts from 1); logs every `log_every` steps."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self._window.append(loss.item())
        if step % self.log_every == 0 or step == self.total:
            self.last = sum(self._window) / len(self._window)
            self._window = []
            if self.log is not None:
                elapsed = time.perf_counter() - self._began
                self.log(f"  {self.name} step {step}/{self.total}  loss {self.last:.4f}  {elapsed:.0f} s")


def train_prm(
    model: Any,
    rows: Sequence[EncodedRecord],
    *,
    epochs: float = 1.0,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
) -> float:
    """Train `model` (token classification, 2 labels) in place on `rows`; returns the mean loss
    of the last logged window. AdamW, linear warm-up over 5% of the steps, cosine decay;
    `epochs` may be fractional."""
    if not rows:
        raise ValueError("no training rows")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    lengths = [len(r.input_ids) for r in rows]
    per_epoch = math.ceil(len(rows) / batch_size)
    total = max(1, round(epochs * per_epoch))
    pad_id = int(model.config.pad_token_id or 0)
    training = SupervisedTraining(model, total, lr, "prm", log, log_every)
    queue: list[list[int]] = []
    for step in range(1, total + 1):
        if not queue:
            queue = _batches(len(rows), batch_size, lengths, rng)
        input_ids, attention, row_at, pos_at, labels = _batch([rows[i] for i in queue.pop()], pad_id)
        logits = model(input_ids=input_ids, attention_mask=attention).logits
        training.step(step, torch.nn.functional.cross_entropy(logits[row_at, pos_at].float(), labels))
    model.eval()
    return training.last


@torch.inference_mode()
def step_scores(model: Any, rows: Sequence[EncodedRecord], batch_size: int = 64) -> list[list[float]]:
    """The score r = tanh((z1 - z0) / 2) at every read-out position of every row."""
    model.eval()
    pad_id = int(model.config.pad_token_id or 0)
    out: list[list[float]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        input_ids, attention, row_at, pos_at, _ = _batch(chunk, pad_id)
        z = model(input_ids=input_ids, attention_mask=attention).logits[row_at, pos_at].float()
        flat = torch.tanh((z[:, 1] - z[:, 0]) / 2).tolist()
        offset = 0
        for r in chunk:
            out.append(flat[offset : offset + len(r.positions)])
            offset += len(r.positions)
    return out


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """ROC AUC (ties count one half); nan when one class is missing."""
    positives = sum(labels)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, label in zip(ranks, labels, strict=True) if label == 1)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def evaluate_prm(model: Any, rows: Sequence[EncodedRecord]) -> PrmMetrics:
    """Step-level metrics of `model` on labelled rows."""
    scores = [s for row in step_scores(model, rows) for s in row]
    labels = [v for row in rows for v in row.labels]
    hits = [(s > 0) == (v == 1) for s, v in zip(scores, labels, strict=True)]

    def rate(cls: int) -> float:
        chosen = [h for h, v in zip(hits, labels, strict=True) if v == cls]
        return sum(chosen) / len(chosen) if chosen else float("nan")

    return PrmMetrics(
        steps=len(labels),
        accuracy=sum(hits) / max(1, len(hits)),
        accuracy_correct=rate(1),
        accuracy_incorrect=rate(0),
        auc=auc(scores, labels),
    )


def save_prm(model: Any, tokenizer: Any, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


# --- the command ----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prm-train",
        help="train a process reward model on step-labelled JSONL",
        description=(
            'Train a PRM (token classification, 2 labels, label 1 = "step is correct") on a JSONL '
            'file of {"prompt": str, "steps": [str, ...], "labels": [0|1, ...]} rows, in the exact '
            "layout the PRM service scores: the prompt, then each step followed by one \\n token, "
            "the label read at that \\n."
        ),
    )
    parser.add_argument("--data", required=True, help="training JSONL (prompt, steps, labels)")
    parser.add_argument(
        "--base", required=True, help="local model dir: a Qwen2-style causal LM or PRM + its tokenizer"
    )
    parser.add_argument("--out", required=True, help="where to save the trained PRM")
    parser.add_argument("--eval", dest="eval_data", help="held-out JSONL to report step accuracy and AUC on")
    parser.add_argument(
        "--epochs", type=float, default=1.0, help="passes over the data (default: %(default)s)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="solutions per step (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.set_defaults(run=run)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.epochs) and args.epochs > 0):
        raise CliError(f"--epochs must be a positive number, got {args.epochs}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CliError(f"--lr must be a positive number, got {args.lr}")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    records = _records(args.data)
    held_out = _records(args.eval_data) if args.eval_data else None
    if not Path(args.base, "config.json").is_file():
        raise CliError(f"--base {args.base} is not a model directory (no config.json)")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model, tokenizer = load_base(args.base)
        prm_layout = PrmLayout(tokenizer)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load a model from {args.base}: {str(error).splitlines()[0]}") from error
    rows = _encode(prm_layout, records, args.data, model)
    eval_rows = _encode(prm_layout, held_out, args.eval_data, model) if held_out else None
    steps = sum(len(r.labels) for r in rows)
    positive = sum(sum(r.labels) for r in rows)
    _log(
        f"prm-train: {len(rows)} solutions, {steps} steps ({positive / steps:.0%} labelled correct), "
        f"base {args.base}, {args.epochs:g} epoch(s), lr {args.lr:g}, batch {args.batch_size}"
    )
    began = time.perf_counter()
    train_prm(
        model, rows, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, log=_log
    )
    _log(f"prm-train: trained in {time.perf_counter() - began:.1f} s")
    if eval_rows:
        _log(f"prm-train: held-out {evaluate_prm(model, eval_rows).line()}")
    try:
        save_prm(model, tokenizer, args.out)
    except OSError as error:
        raise CliError(f"cannot write {args.out}: {error.strerror or error}", exit_code=1) from error
    print(f"prm-train: saved the PRM to {args.out}")
    return 0


def _records(path: str) -> list[StepRecord]:
    try:
        return load_records(path)
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror or error}") from error
    except ValueError as error:
        raise CliError(str(error)) from error


def _encode(prm_layout: PrmLayout, records: list[StepRecord], source: str, model: Any) -> list[EncodedRecord]:
    limit = getattr(model.config, "max_position_embeddings", None)
    rows = []
    for index, record in enumerate(records, start=1):
        try:
            row = prm_layout.encode(record)
        except ValueError as error:
            raise CliError(f"{source}: record {index}: {error}") from error
        if limit and len(row.input_ids) > limit:
            raise CliError(
                f"{source}: record {index}: {len(row.input_ids)} tokens exceed the model's context of {limit}"
            )
        rows.append(row)
    return rows
