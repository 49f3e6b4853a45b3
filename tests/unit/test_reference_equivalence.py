"""The vectorised core equals the loop reference on random ragged batches, for every option.

Every combination of credit method (4) x reward mode (3) x baseline (2) x KL on/off runs on
5 seeded batches of 40 to 48 prompt groups (>= 200 groups per combination), each batch in one
call with shuffled rows and arbitrary group ids. Every intermediate is compared in float64.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from puremesh.trainer.algo import CREDIT_METHODS, pure_advantages
from puremesh.trainer.algo.reference import reference_advantages

TOL = 1e-9
BATCHES = 5
GROUPS_PER_BATCH = (40, 48)
PER_STEP = ("scores", "step_weights", "transformed", "baseline_share", "step_rewards")
PER_TOKEN = ("token_rewards", "returns", "advantages", "normalized")
PER_RESPONSE = ("outcome", "baseline", "vr_advantage")
COMBOS = list(itertools.product(CREDIT_METHODS, ("prm", "vr", "prm+vr"), ("token", "step"), (0.0, 0.05)))


def random_response(rng: random.Random, tie_scores: bool) -> dict:
    num_steps = rng.randint(1, 8)
    step_tokens = [rng.randint(1, 6) for _ in range(num_steps)]
    if tie_scores:
        # A coarse grid makes equal scores within a response (ties for min and strict-min)
        # common. The random offset per response keeps responses from being exact multiples of
        # each other: such coincidences make advantages that are 0 in exact arithmetic, which
        # rounding leaves either exactly 0 or at ~1e-20, and the normalisation's "exactly 0"
        # rule (spec section 4) is discontinuous there.
        offset = rng.uniform(-0.5, 0.5)
        scores = [offset + rng.choice([-0.5, -0.25, 0.0, 0.25, 0.5]) for _ in range(num_steps)]
    else:
        scores = [rng.uniform(-1.0, 1.0) for _ in range(num_steps)]
    length = sum(step_tokens)
    kl = None if rng.random() < 0.2 else [rng.uniform(-0.5, 0.5) for _ in range(length)]
    return {
        "step_tokens": step_tokens,
        "step_scores": scores,
        "solved": rng.random() < 0.5,
        "has_ground_truth": False,  # set per group below
        "kl": kl,
    }


def random_groups(rng: random.Random) -> list[list[dict]]:
    groups = []
    for _ in range(rng.randint(*GROUPS_PER_BATCH)):
        has_ground_truth = rng.random() < 0.6
        tie_scores = rng.random() < 0.25
        group = [random_response(rng, tie_scores) for _ in range(rng.randint(2, 6))]
        for response in group:
            response["has_ground_truth"] = has_ground_truth
        groups.append(group)
    return groups


def to_batch(groups: list[list[dict]], rng: random.Random) -> tuple[list[tuple[int, int]], dict]:
    """Pack groups into padded float64 tensors, rows shuffled; returns (row -> (g, i), tensors)."""
    order = [(g, i) for g, group in enumerate(groups) for i in range(len(group))]
    rng.shuffle(order)
    group_ids = rng.sample(range(1000), len(groups))  # arbitrary, non-contiguous ids
    responses = [groups[g][i] for g, i in order]
    width = max(sum(r["step_tokens"]) for r in responses) + rng.randint(0, 3)
    steps = max(len(r["step_tokens"]) for r in responses) + rng.randint(0, 2)
    token_mask, step_end_mask, scores, kl = [], [], [], []
    for response in responses:
        length = sum(response["step_tokens"])
        ends = []
        for n in response["step_tokens"]:
            ends += [False] * (n - 1) + [True]
        token_mask.append([True] * length + [False] * (width - length))
        step_end_mask.append(ends + [False] * (width - length))
        scores.append(response["step_scores"] + [0.0] * (steps - len(response["step_scores"])))
        kl.append((response["kl"] or [0.0] * length) + [0.0] * (width - length))
    tensors = {
        "step_scores": torch.tensor(scores, dtype=torch.float64),
        "step_end_mask": torch.tensor(step_end_mask),
        "token_mask": torch.tensor(token_mask),
        "group_index": torch.tensor([group_ids[g] for g, _ in order]),
        "solved": torch.tensor([r["solved"] for r in responses]),
        "has_ground_truth": torch.tensor([r["has_ground_truth"] for r in responses]),
        "kl": torch.tensor(kl, dtype=torch.float64),
    }
    return order, tensors


def padded(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Reference rows, zero-padded to the vectorised tensor's shape."""
    width = like.shape[1]
    return torch.tensor([values + [0.0] * (width - len(values)) for values in rows], dtype=like.dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, order: list) -> None:
    """Elementwise |actual - expected| <= TOL, padding included (the reference pads with 0)."""
    bad = (actual - expected).abs() > TOL
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        g, i = order[row]
        pytest.fail(
            f"{name} differs for group {g}, response {i} (row {row}):\n"
            f"vectorised {actual[row].tolist()}\nreference  {expected[row].tolist()}"
        )


@pytest.mark.parametrize(("credit", "reward_mode", "baseline", "kl_coef"), COMBOS)
def test_vectorised_matches_reference(credit: str, reward_mode: str, baseline: str, kl_coef: float) -> None:
    rng = random.Random(f"{credit}/{reward_mode}/{baseline}/{kl_coef}")
    total_groups = 0
    for _ in range(BATCHES):
        groups = random_groups(rng)
        total_groups += len(groups)
        options = {
            "credit": credit,
            "temperature": rng.choice([0.05, 0.1, 1.0]),
            "reward_mode": reward_mode,
            "baseline": baseline,
            "kl_coef": kl_coef,
            "vr_coef": rng.choice([1.0, 0.5]),
            "normalize": True,
        }
        expected = reference_advantages(groups, **options)
        order, tensors = to_batch(groups, rng)
        out = pure_advantages(**tensors, **options)
        per_row = [expected[g][i] for g, i in order]
        for name in PER_STEP + PER_TOKEN:
            actual = getattr(out, name)
            assert_close(actual, padded([ref[name] for ref in per_row], actual), name, order)
        for name in PER_RESPONSE:
            actual = getattr(out, name)
            reference = torch.tensor([ref[name] for ref in per_row], dtype=actual.dtype)
            assert_close(actual.unsqueeze(-1), reference.unsqueeze(-1), name, order)
    assert total_groups >= 200


def test_every_combination_is_covered() -> None:
    assert len(COMBOS) == 48
