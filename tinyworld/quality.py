"""The SFT'd policy's quality figures: greedy accuracy, gradable share, pass@k.

Completions are generated with transformers (`generate_texts`) and graded by THE grader of the
learner's held-out evaluation: the verify service's `grading.grade` (math-verify), called
in-process as a single-threaded caller does (services/verify/grading.py). So the bootstrap's
greedy accuracy and the learner's "accuracy before" measure the same thing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from puremesh.contract.verdict import Verdict
from puremesh.services.verify import grading
from puremesh.trainer.data import Problem, format_prompt

MAX_NEW_TOKENS = 160  # enough for the longest solution of the task
GENERATE_BATCH_SIZE = 64  # prompts per generate call
MATH_VERIFY_LOGGER = "math_verify"  # the parent of math-verify's module loggers


@torch.inference_mode()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = GENERATE_BATCH_SIZE,
    seed: int = 0,
) -> list[list[str]]:
    """`samples` completions per prompt (greedy when temperature == 0), with transformers."""
    torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[list[str]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                if temperature > 0
                else {"do_sample": False}
            )
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            texts = tokenizer.batch_decode(
                generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
            )
            out += [texts[i * samples : (i + 1) * samples] for i in range(len(chunk))]
    finally:
        tokenizer.padding_side = side
    return out


@dataclass(frozen=True)
class PolicyQuality:
    """Greedy accuracy, the share of greedy outputs in which the grader finds a final answer
    (gradable), and pass@k / mean accuracy of k samples at
    `temperature` (on `sampled_problems` problems)."""

    greedy_accuracy: float
    greedy_problems: int
    gradable: float
    pass_at_k: float | None = None
    sample_accuracy: float | None = None
    k: int = 0
    temperature: float = 1.0
    sampled_problems: int = 0


@contextlib.contextmanager
def _quiet_math_verify() -> Iterator[None]:
    """Errors only from math-verify while grading here: it warns that its own timeout is off,
    which `grading` does on purpose (the verify service bounds the time in its pool)."""
    logger = logging.getLogger(MATH_VERIFY_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def solved(text: str, answer: str | None) -> bool:
    """Whether the verify service's grader rates `text` CORRECT against the ground truth."""
    return grading.grade(text, answer)[0] is Verdict.CORRECT


def policy_quality(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    sampled: int,
    k: int,
    temperature: float,
    seed: int,
) -> PolicyQuality:
    """Greedy accuracy on `problems` (graded as the verify service grades, see the module
    docstring), and pass@k with k samples at `temperature` on the first `sampled` of them."""
    prompts = [format_prompt(p.question) for p in problems]
    greedy = [texts[0] for texts in generate_texts(model, tokenizer, prompts)]
    with _quiet_math_verify():
        graded = [grading.grade(text, p.answer) for text, p in zip(greedy, problems, strict=True)]
    quality = PolicyQuality(
        greedy_accuracy=sum(verdict is Verdict.CORRECT for verdict, _ in graded) / len(graded),
        greedy_problems=len(graded),
        gradable=sum(bool(answer) for _, answer in graded) / len(graded),
    )
    if sampled <= 0:
        return quality
    outs = generate_texts(model, tokenizer, prompts[:sampled], samples=k, temperature=temperature, seed=seed)
    sampled_problems = problems[:sampled]
    with _quiet_math_verify():
        hits = [[solved(t, p.answer) for t in texts] for texts, p in zip(outs, sampled_problems, strict=True)]
    return dataclasses.replace(
        quality,
        pass_at_k=sum(any(h) for h in hits) / len(hits),
        sample_accuracy=sum(sum(h) for h in hits) / (len(hits) * k),
        k=k,
        temperature=temperature,
        sampled_problems=len(hits),
    )
