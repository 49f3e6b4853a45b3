"""Reward-hacking diagnostics (pure-algorithm.md section 7). Pure functions over plain values.

`repeat_score` is PURE's repetition measure of a response's text: from the suffix array of its
characters and the longest common prefix (LCP) of each pair of neighbouring suffixes,

    repeat_score(s) = 2 * sum(LCP) / (n * (n + 1)),   n = len(s)  (0 when n <= 1),

which is 1 - (distinct substrings of s) / (all n(n+1)/2 substrings of s): the share of the
text's substrings that repeat one seen elsewhere in it. A text that never repeats a character
scores 0, ordinary prose a little, a text that loops over one phrase close to 1: k copies of a
phrase score about (1 - 1/k)^2, since the periodic text has about u * n - u^2 / 2 distinct
substrings (u the phrase's length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from puremesh.contract.sampling import FinishReason
from puremesh.contract.verdict import Verdict


def steps_per_response(step_end_mask: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool masks -> [B] long: number of steps of each response."""
    return (step_end_mask & token_mask).sum(-1)


def suffix_array(codes: Sequence[int]) -> list[int]:
    """Start positions of the suffixes of `codes` in sorted order (prefix doubling, O(n log^2 n))."""
    n = len(codes)
    order = list(range(n))
    rank = list(codes)
    width = 1
    while n > 1:
        keys = [(rank[i], rank[i + width] if i + width < n else -1) for i in range(n)]
        order.sort(key=keys.__getitem__)
        fresh = [0] * n
        for j in range(1, n):
            fresh[order[j]] = fresh[order[j - 1]] + (keys[order[j]] != keys[order[j - 1]])
        rank = fresh
        if rank[order[-1]] == n - 1:  # every suffix has its own rank: sorted
            break
        width *= 2
    return order


def lcp_array(codes: Sequence[int], order: Sequence[int]) -> list[int]:
    """lcp[j] = length of the common prefix of the suffixes at order[j - 1] and order[j]
    (lcp[0] = 0), in O(n) (Kasai's algorithm)."""
    n = len(codes)
    position = [0] * n
    for j, start in enumerate(order):
        position[start] = j
    lcp = [0] * n
    common = 0
    for start in range(n):
        j = position[start]
        if j == 0:
            common = 0
            continue
        other = order[j - 1]
        while start + common < n and other + common < n and codes[start + common] == codes[other + common]:
            common += 1
        lcp[j] = common
        common = max(0, common - 1)
    return lcp


def repeat_score(text: str) -> float:
    """PURE's repetition score of `text` (see the module docstring), in [0, 1)."""
    n = len(text)
    if n <= 1:
        return 0.0
    codes = [ord(c) for c in text]
    return 2.0 * sum(lcp_array(codes, suffix_array(codes))) / (n * (n + 1))


def response_diagnostics(
    texts: Sequence[str], finish_reasons: Sequence[FinishReason], verdicts: Sequence[Verdict]
) -> dict[str, float]:
    """Per-batch means over the responses: `repeat_score`, `truncated_ratio` (the share cut off
    at the token limit) and `answer_ratio` (the share of graded responses, `verdicts`, whose
    final answer was compared with the ground truth, right or wrong; NaN when none was graded)."""
    if len(texts) != len(finish_reasons):
        raise ValueError(f"{len(texts)} texts but {len(finish_reasons)} finish reasons")
    count = max(1, len(texts))
    answered = sum(v in (Verdict.CORRECT, Verdict.INCORRECT) for v in verdicts)
    return {
        "repeat_score": sum(map(repeat_score, texts)) / count,
        "truncated_ratio": sum(r is FinishReason.LENGTH for r in finish_reasons) / count,
        "answer_ratio": answered / len(verdicts) if verdicts else math.nan,
    }


def prm_vr_agreement(
    outcome: torch.Tensor, solved: torch.Tensor, has_ground_truth: torch.Tensor
) -> torch.Tensor:
    """Share of responses with ground truth where the PRM's verdict 1[O > 0] equals `solved`.

    outcome [B] float, solved and has_ground_truth [B] bool -> scalar; NaN if none has ground
    truth. A falling agreement while reward rises is a reward-hacking sign.
    """
    if not bool(has_ground_truth.any()):
        return torch.tensor(float("nan"))
    agree = (outcome > 0) == solved
    return agree[has_ground_truth].float().mean()
