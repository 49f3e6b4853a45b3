"""trainer/algo/diagnostics.py: PURE's repeat score (suffix array and LCP of the characters) against
hand-derived values and a brute-force count of distinct substrings, and the batch diagnostics."""

from __future__ import annotations

import math
import random

import pytest

from puremesh.contract.sampling import FinishReason
from puremesh.contract.verdict import Verdict
from puremesh.trainer.algo.diagnostics import lcp_array, repeat_score, response_diagnostics, suffix_array


def distinct_substrings(text: str) -> int:
    return len({text[i:j] for i in range(len(text)) for j in range(i + 1, len(text) + 1)})


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("", 0.0),
        ("a", 0.0),
        ("ab", 0.0),  # no substring repeats
        ("aa", 1 / 3),  # substrings a, a, aa: one of three repeats
        ("aaaa", 0.6),  # LCPs 0, 1, 2, 3 of a, aa, aaa, aaaa: 2 * 6 / (4 * 5)
        ("abab", 0.3),  # 7 distinct of 10 substrings
    ],
)
def test_hand_derived_values(text: str, score: float) -> None:
    assert repeat_score(text) == pytest.approx(score)


def test_equals_one_minus_the_share_of_distinct_substrings() -> None:
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab c\n") for _ in range(rng.randint(2, 40)))
        n = len(text)
        assert repeat_score(text) == pytest.approx(1 - distinct_substrings(text) / (n * (n + 1) / 2))


def test_suffix_array_and_lcp_against_sorting() -> None:
    rng = random.Random(1)
    for _ in range(100):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(1, 30)))
        codes = [ord(c) for c in text]
        order = suffix_array(codes)
        assert order == sorted(range(len(text)), key=lambda i: text[i:])
        lcp = lcp_array(codes, order)
        for j in range(1, len(text)):
            a, b = text[order[j - 1] :], text[order[j] :]
            assert lcp[j] == next(
                (k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b))
            )


def test_a_looping_text_scores_about_the_square_of_one_minus_one_over_its_copies() -> None:
    phrase = "Let me think again.\n\n"
    for copies in (2, 5, 20):
        assert repeat_score(phrase * copies) == pytest.approx((1 - 1 / copies) ** 2, abs=0.02)
    answer = "First, she buys 5 more: 17 + 5 = 22\n\nThe answer is \\boxed{22}"
    assert repeat_score(answer) < 0.1 < repeat_score(answer + "\n\n" + phrase * 5)


def test_response_diagnostics() -> None:
    stats = response_diagnostics(
        ["abab", "ab", "aaaa"],
        [FinishReason.STOP, FinishReason.LENGTH, FinishReason.STOP],
        [Verdict.CORRECT, Verdict.NO_ANSWER, Verdict.INCORRECT, Verdict.NO_ANSWER],
    )
    assert stats["repeat_score"] == pytest.approx((0.3 + 0.0 + 0.6) / 3)
    assert stats["truncated_ratio"] == pytest.approx(1 / 3)
    assert stats["answer_ratio"] == pytest.approx(0.5)
    assert math.isnan(response_diagnostics(["a"], [FinishReason.STOP], [])["answer_ratio"])
    with pytest.raises(ValueError):
        response_diagnostics(["a", "b"], [FinishReason.STOP], [])
