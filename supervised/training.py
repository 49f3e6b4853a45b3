"""The optimisation every supervised job of puremesh shares (the policy's SFT and PRM training).

`SupervisedTraining` is one optimizer loop: AdamW, a linear warm-up then cosine decay, gradient
clipping and the mean loss of each logging window. `length_batches` draws the shuffled batches
of similar-length rows both jobs train on (less padding). The constants below are the one
source of these choices.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

import torch

ADAM_BETAS = (0.9, 0.98)
WEIGHT_DECAY = 0.01
WARMUP_DIVISOR = 20  # warm-up over 1/20 (5%) of the total steps, at least one step
CLIP_NORM = 1.0
BATCHES_PER_WINDOW = 16  # length_batches sorts windows of this many batches by length
LOG_EVERY = 100  # steps per logged loss window, unless a caller asks otherwise


class SupervisedTraining:
    """AdamW (ADAM_BETAS, WEIGHT_DECAY), linear warm-up over 1/WARMUP_DIVISOR of the `total` steps then
    cosine decay to 0, gradient clipping at CLIP_NORM, and the mean loss of each logging window
    (`last`). Puts `model` in train mode; the caller calls `step` once per batch."""

    def __init__(
        self,
        model: torch.nn.Module,
        total: int,
        lr: float,
        name: str,
        log: Callable[[str], None] | None = None,
        log_every: int = LOG_EVERY,
    ) -> None:
        warmup = max(1, total // WARMUP_DIVISOR)
        self.model, self.total, self.name = model, total, name
        self.log, self.log_every = log, log_every
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)),
        )
        model.train()
        self.last = float("nan")
        self._window: list[float] = []
        self._began = time.perf_counter()

    def step(self, step: int, loss: torch.Tensor) -> None:
        """One optimizer step on `loss` (step counts from 1); logs every `log_every` steps and at
        the last one."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
        self.optimizer.step()
        self.schedule.step()
        self._window.append(loss.item())
        if step % self.log_every == 0 or step == self.total:
            self.last = sum(self._window) / len(self._window)
            self._window = []
            if self.log is not None:
                elapsed = time.perf_counter() - self._began
                self.log(f"  {self.name} step {step}/{self.total}  loss {self.last:.4f}  {elapsed:.0f} s")


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One shuffled epoch of row indices in batches of similar length: shuffle the rows, sort each
    window of BATCHES_PER_WINDOW batches by length, cut it into batches, shuffle the batches.

    Deterministic in the state of `rng`, which it advances."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * BATCHES_PER_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
