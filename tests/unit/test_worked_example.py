"""pure-algorithm.md section 6, by hand: PRM mode, min-form, T = 0.1, beta = 0, one group of 4.

Every number below is copied from the spec (printed to 6 decimals, so compared to 1e-6; the
sum-form advantages are printed to 4 decimals and compared to 1e-4). Both the vectorised core
and the loop reference must reproduce them.
"""

from __future__ import annotations

import pytest
import torch

from puremesh.trainer.algo import pure_advantages, step_end_mask_from_lengths
from puremesh.trainer.algo.reference import reference_advantages

STEP_TOKENS = [[5, 4, 3], [6, 4], [3, 3, 4, 2], [7, 3]]
STEP_SCORES = [[0.9, 0.2, 0.8], [0.7, 0.6], [0.5, -0.6, 0.4, 0.9], [0.95, 0.85]]

W_1 = [0.000909, 0.996621, 0.002470]
R_STAR_1 = [0.000818, 0.199324, 0.001976]
OUTCOME = [0.202118, 0.626894, -0.599936, 0.876894]
ABAR_1 = 0.903852 / 32
RT_1 = [-0.112164, 0.114588, -0.054514]
ADV_1 = [-0.052090] * 4 + [0.0] + [0.060074] * 3 + [0.0] + [-0.054514] * 2 + [0.0]
SUM_ADV_1 = [0.6906] * 4 + [0.0] + [0.3281] * 3 + [0.0] + [0.5312] * 2 + [0.0]
# Tokens of R3's steps after its wrong step (steps 3 and 4), step-end tokens excluded.
R3_LATER_CONTENT = [6, 7, 8, 10]


def vectorised(credit: str) -> dict:
    token_mask, step_end_mask = step_end_mask_from_lengths(STEP_TOKENS)
    scores = torch.zeros(4, 4, dtype=torch.float64)
    for row, values in enumerate(STEP_SCORES):
        scores[row, : len(values)] = torch.tensor(values, dtype=torch.float64)
    out = pure_advantages(
        scores,
        step_end_mask,
        token_mask,
        torch.zeros(4, dtype=torch.long),
        credit=credit,
        temperature=0.1,
        reward_mode="prm",
        kl_coef=0.0,
        normalize=False,
    )
    lengths = [sum(n) for n in STEP_TOKENS]
    num_steps = [len(n) for n in STEP_TOKENS]
    return {
        "step_weights": out.step_weights[0, : num_steps[0]].tolist(),
        "transformed": out.transformed[0, : num_steps[0]].tolist(),
        "outcome": out.outcome.tolist(),
        "baseline_1": float(out.baseline[0]),
        "step_rewards_1": out.step_rewards[0, : num_steps[0]].tolist(),
        "advantages": [out.advantages[i, : lengths[i]].tolist() for i in range(4)],
    }


def reference(credit: str) -> dict:
    group = [
        {"step_tokens": n, "step_scores": r, "solved": False, "has_ground_truth": False, "kl": None}
        for n, r in zip(STEP_TOKENS, STEP_SCORES, strict=True)
    ]
    out = reference_advantages(
        [group], credit=credit, temperature=0.1, reward_mode="prm", kl_coef=0.0, normalize=False
    )[0]
    return {
        "step_weights": out[0]["step_weights"],
        "transformed": out[0]["transformed"],
        "outcome": [item["outcome"] for item in out],
        "baseline_1": out[0]["baseline"],
        "step_rewards_1": out[0]["step_rewards"],
        "advantages": [item["advantages"] for item in out],
    }


IMPLEMENTATIONS = {"vectorised": vectorised, "reference": reference}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def compute(request):
    return IMPLEMENTATIONS[request.param]


def test_min_form_numbers(compute) -> None:
    out = compute("min")
    assert out["step_weights"] == pytest.approx(W_1, abs=1e-6)
    assert out["transformed"] == pytest.approx(R_STAR_1, abs=1e-6)
    assert out["outcome"] == pytest.approx(OUTCOME, abs=1e-6)
    assert out["baseline_1"] == pytest.approx(ABAR_1, abs=1e-6)
    assert out["step_rewards_1"] == pytest.approx(RT_1, abs=1e-6)
    assert out["advantages"][0] == pytest.approx(ADV_1, abs=1e-6)


def test_sum_form_numbers(compute) -> None:
    out = compute("sum")
    assert out["outcome"] == pytest.approx([1.9, 1.3, 1.2, 1.8], abs=1e-12)
    assert out["advantages"][0] == pytest.approx(SUM_ADV_1, abs=1e-4)


def test_min_form_denies_the_wrong_response_credit_for_later_steps(compute) -> None:
    min_r3 = compute("min")["advantages"][2]
    sum_r3 = compute("sum")["advantages"][2]
    assert all(min_r3[t] < 0 for t in R3_LATER_CONTENT)
    assert all(sum_r3[t] > 0 for t in R3_LATER_CONTENT)


def test_implementations_agree_on_every_response() -> None:
    for credit in ("min", "sum"):
        fast, slow = vectorised(credit), reference(credit)
        for fast_row, slow_row in zip(fast["advantages"], slow["advantages"], strict=True):
            assert fast_row == pytest.approx(slow_row, abs=1e-12)
