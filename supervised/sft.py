"""Supervised fine-tuning of a causal LM on masked rows (token ids and a 0/1 loss mask).

`sft_rows` turns a JSONL file of {"prompt": str, "solution": str} rows into rows with the loss
on the solution and EOS only; `train_causal_lm` trains on any rows (the tiny world also mixes in
arithmetic drills, see puremesh.tinyworld.taskdata). The optimisation itself is
`training.SupervisedTraining`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .training import LOG_EVERY, SupervisedTraining, length_batches

Row = tuple[list[int], list[int]]  # (token ids, loss mask 0/1 per token)
IGNORE_INDEX = -100  # the label transformers' cross-entropy skips


def sft_rows(tokenizer: Any, sft_path: str | Path) -> list[Row]:
    """(prompt + solution + EOS, loss on the solution and EOS) for every row of a JSONL file of
    {"prompt", "solution"} objects. The prompt and the solution are tokenised apart, as the
    policy sees them at generation time (the prompt given, the solution generated)."""
    rows = []
    with Path(sft_path).open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            prompt = tokenizer.encode(record["prompt"], add_special_tokens=False)
            solution = [
                *tokenizer.encode(record["solution"], add_special_tokens=False),
                tokenizer.eos_token_id,
            ]
            rows.append((prompt + solution, [0] * len(prompt) + [1] * len(solution)))
    return rows


def lm_batch(batch: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX where the mask is 0)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, mask) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.where(torch.tensor(mask) == 1, torch.tensor(ids), IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def train_causal_lm(
    model: Any,
    rows: list[Row],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    log: Callable[[str], None] | None = None,
    log_every: int = LOG_EVERY,
) -> float:
    """Masked next-token cross-entropy on `rows` for `steps` optimizer steps, in place, drawing
    shuffled epochs of similar-length batches. Returns the mean loss of the last logged window
    and leaves `model` in eval mode. Deterministic in `seed`."""
    if not rows:
        raise ValueError("no training rows")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    lengths = [len(ids) for ids, _ in rows]
    training = SupervisedTraining(model, steps, lr, "sft", log, log_every)
    queue: list[list[int]] = []
    for step in range(1, steps + 1):
        if not queue:
            queue = length_batches(lengths, batch_size, rng)
        batch = lm_batch([rows[i] for i in queue.pop()], pad_id)
        training.step(step, model(**batch).loss)
    model.eval()
    return training.last
