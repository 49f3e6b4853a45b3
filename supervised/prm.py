"""Training and evaluation of a process reward model on encoded step-labelled rows.

The PRM is a token-classification model with 2 labels (1 = "step is correct"), trained with
cross-entropy at the read-out positions of `prm_data.PrmLayout` only, and scored as the PRM
service scores, with the layout's read-out (contract/steps.py `read_score`; PURE's default
r = tanh((z1 - z0) / 2), pure-algorithm.md section 2). `save_prm` writes the layout beside the
weights (LAYOUT_FILE), where the PRM service finds it. `load_base` turns a local
causal-LM checkpoint (the policy: its body is kept, a fresh 2-way head added) or an existing
PRM into the model to train. The optimisation is `training.SupervisedTraining`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from puremesh.contract.steps import LAYOUT_FILE, Readout, StepLayout, read_score

from .prm_data import EncodedRecord
from .training import SupervisedTraining, length_batches

LABELS = {0: "incorrect", 1: "correct"}
# The defaults of `train_prm` (and of `puremesh prm-train`'s flags).
EPOCHS = 1.0
LR = 1e-3
BATCH_SIZE = 32
SEED = 0
LOG_EVERY = 50
SCORE_BATCH_SIZE = 64  # rows per forward pass when scoring


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


def load_base(base_dir: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer): a 2-label token-classification model from a local causal-LM or
    token-classification checkpoint (a causal LM keeps its body and gets a fresh head)."""
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
    """(input_ids, attention_mask, row of each read-out, position of each read-out, labels)."""
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


def train_prm(
    model: Any,
    rows: Sequence[EncodedRecord],
    *,
    epochs: float = EPOCHS,
    lr: float = LR,
    batch_size: int = BATCH_SIZE,
    seed: int = SEED,
    log: Callable[[str], None] | None = None,
    log_every: int = LOG_EVERY,
) -> float:
    """Train `model` (token classification, 2 labels) in place on `rows`; returns the mean loss
    of the last logged window and leaves `model` in eval mode. `epochs` may be fractional
    (at least one step is taken). Deterministic in `seed`."""
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
            queue = length_batches(lengths, batch_size, rng)
        input_ids, attention, row_at, pos_at, labels = _batch([rows[i] for i in queue.pop()], pad_id)
        logits = model(input_ids=input_ids, attention_mask=attention).logits
        training.step(step, torch.nn.functional.cross_entropy(logits[row_at, pos_at].float(), labels))
    model.eval()
    return training.last


@torch.inference_mode()
def step_scores(
    model: Any,
    rows: Sequence[EncodedRecord],
    batch_size: int = SCORE_BATCH_SIZE,
    readout: Readout = Readout.DIFFERENCE,
) -> list[list[float]]:
    """The score at every read-out position of every row, read as `readout` reads it (the
    default: r = tanh((z1 - z0) / 2))."""
    model.eval()
    pad_id = int(model.config.pad_token_id or 0)
    out: list[list[float]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        input_ids, attention, row_at, pos_at, _ = _batch(chunk, pad_id)
        z = model(input_ids=input_ids, attention_mask=attention).logits[row_at, pos_at].float()
        flat = [read_score(logits, readout) for logits in z.tolist()]
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


def evaluate_prm(
    model: Any, rows: Sequence[EncodedRecord], readout: Readout = Readout.DIFFERENCE
) -> PrmMetrics:
    """Step-level metrics of `model` on labelled rows."""
    scores = [s for row in step_scores(model, rows, readout=readout) for s in row]
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


def save_prm(model: Any, tokenizer: Any, out_dir: str | Path, layout: StepLayout | None = None) -> None:
    """The model and its tokenizer, save_pretrained into `out_dir` (created if missing), and the
    layout it was trained with (LAYOUT_FILE; PURE's by default), which serving picks up."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / LAYOUT_FILE).write_text((layout or StepLayout()).to_json())
