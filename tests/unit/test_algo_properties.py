"""Properties of the PURE core: invariances, limits, step splitting, validation, PPO, diagnostics."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from puremesh.contract.steps import separator_ids, split_steps
from puremesh.trainer.algo import (
    CREDIT_METHODS,
    kl_estimate,
    normalize_advantages,
    ppo_loss,
    prm_vr_agreement,
    pure_advantages,
    step_end_mask_from_lengths,
    step_layout,
    steps_per_response,
)
from puremesh.trainer.algo.reference import reference_advantages, reference_ppo_loss

F64 = torch.float64
OUTPUT_FIELDS = (
    "scores",
    "step_weights",
    "transformed",
    "outcome",
    "baseline",
    "baseline_share",
    "vr_advantage",
    "step_rewards",
    "token_rewards",
    "returns",
    "advantages",
    "normalized",
)
PER_STEP = ("scores", "step_weights", "transformed", "baseline_share", "step_rewards")
PER_TOKEN = ("token_rewards", "returns", "advantages", "normalized")

# Vocabulary for step splitting: ids 1, 2, 3 end with "\n\n"; 4 and 5 only contain it.
VOCAB = ["a", "\n\n", ".\n\n", " x\n\n", "a\n\nb", "\n\nb", "\n", "b", "<eos>"]
SEPARATORS = {1, 2, 3}
EOS = 8
CONTENT_IDS = [0, 4, 5, 6, 7]


def random_batch(seed: int, groups: int = 4) -> dict:
    """A ragged batch built from token ids: B responses, ids, masks, scores, kl, labels."""
    rng = random.Random(seed)
    ids, step_counts, group_index, solved, has_ground_truth = [], [], [], [], []
    for g in range(groups):
        gt = rng.random() < 0.7
        for _ in range(rng.randint(2, 5)):
            steps = rng.randint(1, 5)
            row = []
            for k in range(steps):
                row += [rng.choice(CONTENT_IDS) for _ in range(rng.randint(0, 4))]
                last = k == steps - 1
                row.append(rng.choice([EOS, *CONTENT_IDS]) if last else rng.choice(sorted(SEPARATORS)))
            ids.append(row)
            step_counts.append(steps)
            group_index.append(10 * g + 3)
            solved.append(rng.random() < 0.5)
            has_ground_truth.append(gt)
    width = max(len(row) for row in ids)
    k_max = max(step_counts)
    token_mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in ids])
    token_ids = torch.tensor([r + [0] * (width - len(r)) for r in ids])
    return {
        "token_ids": token_ids,
        "token_mask": token_mask,
        "step_scores": torch.empty(len(ids), k_max, dtype=F64).uniform_(-1, 1, generator=_gen(seed)),
        "kl": torch.empty(len(ids), width, dtype=F64).uniform_(-0.3, 0.3, generator=_gen(seed + 1)),
        "group_index": torch.tensor(group_index),
        "solved": torch.tensor(solved),
        "has_ground_truth": torch.tensor(has_ground_truth),
        "step_counts": step_counts,
    }


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def step_ends(token_ids: torch.Tensor, token_mask: torch.Tensor, separators) -> torch.Tensor:
    """[B, L] step ends of right-padded responses, split by the one splitter (contract.steps)."""
    lengths = [
        [end - start for start, end in split_steps(row[:valid].tolist(), separators)]
        for row, valid in zip(token_ids, token_mask.sum(-1).tolist(), strict=True)
    ]
    return step_end_mask_from_lengths(lengths, pad_to=token_ids.shape[1])[1]


def run(batch: dict, **options) -> object:
    step_end_mask = step_ends(batch["token_ids"], batch["token_mask"], SEPARATORS)
    return pure_advantages(
        batch["step_scores"],
        step_end_mask,
        batch["token_mask"],
        batch["group_index"],
        solved=batch["solved"],
        has_ground_truth=batch["has_ground_truth"],
        kl=batch["kl"],
        **{"kl_coef": 0.05, **options},
    )


def with_garbage_padding(batch: dict, extra_tokens: int, extra_steps: int, seed: int) -> dict:
    """Right-pad tokens and steps, and fill every masked position with garbage."""
    rng = torch.Generator().manual_seed(seed)
    rows, width = batch["token_ids"].shape
    new_width = width + extra_tokens
    token_mask = torch.zeros(rows, new_width, dtype=torch.bool)
    token_mask[:, :width] = batch["token_mask"]
    # Garbage ids under padding include separators and EOS: they must not make step ends.
    token_ids = torch.randint(0, len(VOCAB), (rows, new_width), generator=rng)
    token_ids[token_mask] = batch["token_ids"][batch["token_mask"]]
    kl = torch.randn(rows, new_width, dtype=F64, generator=rng) * 1e6
    kl[:, ::3] = math.nan
    kl[:, 1::3] = math.inf
    kl[token_mask] = batch["kl"][batch["token_mask"]]
    k_max = batch["step_scores"].shape[1]
    step_scores = torch.randn(rows, k_max + extra_steps, dtype=F64, generator=rng) * 1e6
    step_scores[:, ::2] = math.nan
    for row, count in enumerate(batch["step_counts"]):
        step_scores[row, :count] = batch["step_scores"][row, :count]
    return {**batch, "token_ids": token_ids, "token_mask": token_mask, "kl": kl, "step_scores": step_scores}


def assert_same_outputs(a, b, tokens: int, steps: int) -> None:
    """Every output field of b (possibly padded wider) equals a's, and b is 0 on its padding."""
    for name in OUTPUT_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if name in PER_TOKEN:
            torch.testing.assert_close(y[:, :tokens], x[:, :tokens], rtol=0, atol=1e-12, msg=name)
            assert bool((y[:, tokens:] == 0).all()), name
        elif name in PER_STEP:
            torch.testing.assert_close(y[:, :steps], x[:, :steps], rtol=0, atol=1e-12, msg=name)
            assert bool((y[:, steps:] == 0).all()), name
        else:
            torch.testing.assert_close(y, x, rtol=0, atol=1e-12, msg=name)


# --- invariance -------------------------------------------------------------------------------


@pytest.mark.parametrize("credit", CREDIT_METHODS)
@pytest.mark.parametrize("baseline", ["token", "step"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padding_and_masked_garbage_never_change_results(credit: str, baseline: str, seed: int) -> None:
    batch = random_batch(seed)
    clean = run(batch, credit=credit, baseline=baseline)
    noisy = run(with_garbage_padding(batch, 7, 3, seed), credit=credit, baseline=baseline)
    width = batch["token_ids"].shape[1]
    steps = clean.step_weights.shape[1]
    assert_same_outputs(clean, noisy, width, steps)
    for name in OUTPUT_FIELDS:
        assert bool(torch.isfinite(getattr(noisy, name)).all()), name


def test_left_padded_token_masks_are_rejected() -> None:
    """Responses are right-padded (steps.py); a left-padded mask must fail loudly, not silently."""
    token_mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    step_end_mask = torch.tensor([[False, False, False, True], [False, True, False, False]])
    with pytest.raises(ValueError, match="right-padded"):
        step_layout(step_end_mask, token_mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuting_responses_permutes_outputs(seed: int) -> None:
    batch = random_batch(seed, groups=5)
    perm = torch.randperm(batch["token_ids"].shape[0], generator=_gen(seed))
    permuted = {
        key: (value[perm] if isinstance(value, torch.Tensor) else [value[int(i)] for i in perm])
        for key, value in batch.items()
    }
    a, b = run(batch), run(permuted)
    for name in OUTPUT_FIELDS:
        torch.testing.assert_close(getattr(b, name), getattr(a, name)[perm], rtol=0, atol=1e-12, msg=name)


def test_normalisation_depends_only_on_valid_tokens() -> None:
    gen = _gen(5)
    mask = torch.rand(6, 9, generator=gen) < 0.7
    advantages = torch.where(mask, torch.randn(6, 9, dtype=F64, generator=gen), 0.0)
    advantages[0, :3] = 0.0  # some valid tokens exactly 0
    expected = normalize_advantages(advantages, mask)

    wide_mask = torch.zeros(8, 12, dtype=torch.bool)
    wide_mask[:6, :9] = mask
    garbage = torch.randn(8, 12, dtype=F64, generator=gen) * 1e3
    garbage[:6, :9][mask] = advantages[mask]
    got = normalize_advantages(garbage, wide_mask)
    torch.testing.assert_close(got[:6, :9], expected, rtol=0, atol=1e-12)
    assert bool((got[~wide_mask] == 0).all())

    # And it is the section 4 formula over the valid tokens alone.
    values = advantages[mask].tolist()
    nonzero = [a for a in values if a != 0]
    mu = sum(values) / len(nonzero)
    std = math.sqrt(max(sum((a - mu) ** 2 for a in values) / len(nonzero), 1e-8))
    want = [0.0 if a == 0 else (a - mu) / std for a in values]
    assert expected[mask].tolist() == pytest.approx(want, abs=1e-12)


# --- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_min_form_at_tiny_temperature_is_the_hard_min(seed: int) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(6):
        # Distinct scores at least 0.05 apart: the soft weights off the minimum are ~exp(-500).
        rows.append([s / 20 for s in rng.sample(range(-20, 21), rng.randint(1, 7))])
    lengths = [[rng.randint(1, 4) for _ in r] for r in rows]
    token_mask, step_end_mask = step_end_mask_from_lengths(lengths)
    scores = torch.zeros(6, 7, dtype=F64)
    for i, r in enumerate(rows):
        scores[i, : len(r)] = torch.tensor(r, dtype=F64)
    out = pure_advantages(
        scores,
        step_end_mask,
        token_mask,
        torch.zeros(6, dtype=torch.long),
        temperature=1e-4,
        reward_mode="prm",
    )
    assert out.outcome.tolist() == pytest.approx([min(r) for r in rows], abs=1e-12)
    group = [
        {"step_tokens": n, "step_scores": r, "solved": False, "has_ground_truth": False, "kl": None}
        for n, r in zip(lengths, rows, strict=True)
    ]
    ref = reference_advantages([group], temperature=1e-4, reward_mode="prm")[0]
    assert [item["outcome"] for item in ref] == pytest.approx([min(r) for r in rows], abs=1e-12)


@pytest.mark.parametrize("credit", CREDIT_METHODS)
@pytest.mark.parametrize("baseline", ["token", "step"])
def test_one_step_responses_reduce_to_the_outcome_reward(credit: str, baseline: str) -> None:
    lengths = [[4], [1], [6], [3]]
    single = [0.7, -0.3, 0.2, -0.9]
    token_mask, step_end_mask = step_end_mask_from_lengths(lengths)
    scores = torch.tensor(single, dtype=F64).unsqueeze(-1)
    out = pure_advantages(
        scores,
        step_end_mask,
        token_mask,
        torch.zeros(4, dtype=torch.long),
        credit=credit,
        reward_mode="prm",
        baseline=baseline,
        kl_coef=0.0,
        normalize=False,
    )
    assert out.outcome.tolist() == pytest.approx(single, abs=1e-15)
    n_tokens = [n[0] for n in lengths]
    for i in range(4):
        others = [j for j in range(4) if j != i]
        if baseline == "token":
            share = sum(single[j] for j in others) / sum(n_tokens[j] for j in others) * (n_tokens[i] - 1)
        else:
            share = sum(single[j] for j in others) / 3  # one step each: O_j / K_j = r_j
        assert float(out.returns[i, 0]) == pytest.approx(single[i] - share, abs=1e-12)
        # Every content token sees the same return; the single step-end token gets advantage 0.
        expected = [single[i] - share] * (n_tokens[i] - 1) + [0.0]
        assert out.advantages[i, : n_tokens[i]].tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_strict_min_suffix_sums_are_suffix_minima(seed: int) -> None:
    rng = random.Random(seed)
    rows = [[rng.uniform(-1, 1) for _ in range(rng.randint(1, 8))] for _ in range(5)]
    rows.append([0.3, -0.2, 0.5, -0.2, 0.1])  # a tie for the minimum
    lengths = [[2] * len(r) for r in rows]
    token_mask, step_end_mask = step_end_mask_from_lengths(lengths)
    scores = torch.zeros(len(rows), 8, dtype=F64)
    for i, r in enumerate(rows):
        scores[i, : len(r)] = torch.tensor(r, dtype=F64)
    out = pure_advantages(
        scores,
        step_end_mask,
        token_mask,
        torch.zeros(len(rows), dtype=torch.long),
        credit="strict-min",
        reward_mode="prm",
        kl_coef=0.0,
    )
    for i, r in enumerate(rows):
        transformed = out.transformed[i, : len(r)].tolist()
        suffix_sums = [sum(transformed[k:]) for k in range(len(r))]
        suffix_minima = [min(r[k:]) for k in range(len(r))]
        assert suffix_sums == pytest.approx(suffix_minima, abs=1e-12)
        assert all(a <= b for a, b in itertools.pairwise(suffix_sums))
        weights = out.step_weights[i, : len(r)].tolist()
        assert weights == [1.0 if k == r.index(min(r)) else 0.0 for k in range(len(r))]
        assert float(out.outcome[i]) == pytest.approx(min(r), abs=1e-12)


@pytest.mark.parametrize("baseline", ["token", "step"])
def test_vr_mode_without_ground_truth_normalises_to_zeros(baseline: str) -> None:
    batch = random_batch(7)
    batch["has_ground_truth"] = torch.zeros_like(batch["has_ground_truth"])
    out = run(batch, reward_mode="vr", baseline=baseline, kl_coef=0.0)
    assert bool((out.advantages == 0).all())
    assert bool((out.normalized == 0).all())
    assert not bool(out.normalized.isnan().any())
    assert bool((normalize_advantages(torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool)) == 0).all())


# --- step splitting ---------------------------------------------------------------------------


def test_separator_ids_are_the_ids_ending_with_a_blank_line() -> None:
    assert separator_ids(VOCAB) == frozenset(SEPARATORS)
    assert separator_ids(dict(enumerate(VOCAB))) == frozenset(SEPARATORS)
    assert separator_ids({100: "x\n\n", 7: "\n\nx", 9: "\n"}) == frozenset({100})


def test_step_ends_from_token_ids() -> None:
    token_ids = torch.tensor(
        [
            [0, 4, 1, 7, 5, 2, 0, 8, 1, 1],  # separators at 2 and 5, last valid token 7
            [4, 5, 4, 5, 0, 3, 3, 3, 3, 3],  # no separator among valid tokens: one step
            [3, 0, 3, 2, 2, 2, 2, 2, 2, 2],  # ends with a separator; padding full of them
        ]
    )
    token_mask = torch.tensor([[True] * 8 + [False] * 2, [True] * 5 + [False] * 5, [True] * 3 + [False] * 7])
    ends = step_ends(token_ids, token_mask, separator_ids(VOCAB))
    assert ends[0].nonzero().flatten().tolist() == [2, 5, 7]
    assert ends[1].nonzero().flatten().tolist() == [4]
    assert ends[2].nonzero().flatten().tolist() == [0, 2]
    assert steps_per_response(ends, token_mask).tolist() == [3, 1, 2]
    layout = step_layout(ends, token_mask)
    assert layout.step_lengths.tolist() == [[3, 3, 2], [5, 0, 0], [1, 2, 0]]
    assert layout.num_steps.tolist() == [3, 1, 2]
    # Without any separator id every response is a single step.
    none = step_ends(token_ids, token_mask, frozenset())
    assert steps_per_response(none, token_mask).tolist() == [1, 1, 1]


def test_step_layout_rejects_trailing_tokens_outside_a_step() -> None:
    token_mask = torch.tensor([[True] * 5 + [False]])
    step_end_mask = torch.tensor([[False, False, True, False, False, False]])
    with pytest.raises(ValueError, match="last valid token"):
        step_layout(step_end_mask, token_mask)


# --- validation -------------------------------------------------------------------------------


def _tiny_inputs() -> tuple:
    token_mask, step_end_mask = step_end_mask_from_lengths([[2, 1], [3], [1, 1, 1]])
    scores = torch.tensor([[0.5, -0.5, 0.0], [0.1, 0.0, 0.0], [0.2, 0.3, -0.4]], dtype=F64)
    return scores, step_end_mask, token_mask


def test_a_group_of_one_response_is_rejected() -> None:
    scores, ends, mask = _tiny_inputs()
    with pytest.raises(ValueError, match="at least two"):
        pure_advantages(scores, ends, mask, torch.tensor([0, 0, 1]))
    response = {
        "step_tokens": [2],
        "step_scores": [0.1],
        "solved": True,
        "has_ground_truth": True,
        "kl": None,
    }
    with pytest.raises(ValueError, match="at least two"):
        reference_advantages([[response, response], [response]])


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_non_positive_temperature_is_rejected(temperature: float) -> None:
    scores, ends, mask = _tiny_inputs()
    with pytest.raises(ValueError, match="temperature"):
        pure_advantages(scores, ends, mask, torch.zeros(3, dtype=torch.long), temperature=temperature)
    response = {
        "step_tokens": [2],
        "step_scores": [0.1],
        "solved": True,
        "has_ground_truth": True,
        "kl": None,
    }
    with pytest.raises(ValueError, match="temperature"):
        reference_advantages([[response, response]], temperature=temperature)


@pytest.mark.parametrize(
    "option", [{"credit": "max"}, {"reward_mode": "orm"}, {"baseline": "critic"}, {"credit": "Min"}]
)
def test_unknown_method_names_are_rejected(option: dict) -> None:
    scores, ends, mask = _tiny_inputs()
    with pytest.raises(ValueError, match="unknown"):
        pure_advantages(scores, ends, mask, torch.zeros(3, dtype=torch.long), **option)
    response = {
        "step_tokens": [2],
        "step_scores": [0.1],
        "solved": True,
        "has_ground_truth": True,
        "kl": None,
    }
    with pytest.raises(ValueError, match="unknown"):
        reference_advantages([[response, response]], **option)


def test_unknown_kl_estimator_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), "k2")


# --- PPO loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_ppo_loss_matches_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 12) for _ in range(7)]
    new = [[rng.uniform(-3, 0) for _ in range(n)] for n in lengths]
    old = [[x + rng.uniform(-0.5, 0.5) for x in row] for row in new]  # ratios around [0.6, 1.65]
    adv = [[rng.gauss(0, 1) for _ in range(n)] for n in lengths]
    width = max(lengths) + 2

    def pad(rows: list[list[float]]) -> torch.Tensor:
        out = torch.full((len(rows), width), math.nan, dtype=F64)  # garbage under padding
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=F64)
        return out

    mask = torch.tensor([[True] * n + [False] * (width - n) for n in lengths])
    out = ppo_loss(pad(new), pad(old), pad(adv), mask, clip_eps=0.2)
    assert float(out.loss) == pytest.approx(reference_ppo_loss(new, old, adv, eps=0.2), abs=1e-12)
    ratios = [math.exp(a - b) for rn, ro in zip(new, old, strict=True) for a, b in zip(rn, ro, strict=True)]
    assert float(out.mean_ratio) == pytest.approx(sum(ratios) / len(ratios), abs=1e-12)
    assert 0.0 <= float(out.clip_fraction) <= 1.0


def test_ppo_clipping_stops_the_gradient_only_in_the_clipped_direction() -> None:
    eps = 0.2
    # token: (log ratio, advantage, gradient expected to vanish)
    cases = [
        (math.log(1.5), 1.0, True),  # ratio above 1 + eps, A > 0: clipped
        (math.log(0.5), -1.0, True),  # ratio below 1 - eps, A < 0: clipped
        (math.log(0.5), 1.0, False),  # ratio below 1 - eps, A > 0: still pushed up
        (math.log(1.5), -1.0, False),  # ratio above 1 + eps, A < 0: still pushed down
        (math.log(1.1), 1.0, False),  # inside the trust region
        (math.log(0.9), -1.0, False),
    ]
    logp_old = torch.zeros(1, len(cases), dtype=F64)
    logp_new = torch.tensor([[c[0] for c in cases]], dtype=F64, requires_grad=True)
    advantages = torch.tensor([[c[1] for c in cases]], dtype=F64)
    mask = torch.ones(1, len(cases), dtype=torch.bool)
    out = ppo_loss(logp_new, logp_old, advantages, mask, clip_eps=eps)
    out.loss.backward()
    grad = logp_new.grad[0].tolist()
    for (log_ratio, a, vanishes), g in zip(cases, grad, strict=True):
        if vanishes:
            assert g == 0.0
        else:  # d/dlogp of -ratio * A / n_tokens
            assert g == pytest.approx(-math.exp(log_ratio) * a / len(cases), abs=1e-12)
    assert float(out.clip_fraction) == pytest.approx(2 / 6)
    ratios = [math.exp(c[0]) for c in cases]
    assert float(out.mean_ratio) == pytest.approx(sum(ratios) / len(ratios))
    assert float(out.approx_kl) == pytest.approx(-sum(c[0] for c in cases) / len(cases))


def test_ppo_on_policy_sanity() -> None:
    gen = _gen(3)
    logp = torch.randn(4, 6, dtype=F64, generator=gen)
    adv = torch.randn(4, 6, dtype=F64, generator=gen)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 3:] = False
    out = ppo_loss(logp, logp, adv, mask)
    assert float(out.clip_fraction) == 0.0
    assert float(out.mean_ratio) == pytest.approx(1.0)
    assert float(out.approx_kl) == pytest.approx(0.0)
    per_sequence = [float(adv[i][mask[i]].mean()) for i in range(4)]
    assert float(out.loss) == pytest.approx(-sum(per_sequence) / 4, abs=1e-12)


# --- KL estimators ----------------------------------------------------------------------------


def test_kl_estimators() -> None:
    gen = _gen(11)
    logp_old = torch.randn(3, 5, dtype=F64, generator=gen)
    logp_ref = torch.randn(3, 5, dtype=F64, generator=gen)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 2:] = False
    k1 = kl_estimate(logp_old, logp_ref, mask, "k1")
    k3 = kl_estimate(logp_old, logp_ref, mask, "k3")
    for i in range(3):
        for t in range(5):
            if not mask[i, t]:
                assert float(k1[i, t]) == 0.0 and float(k3[i, t]) == 0.0
                continue
            d = float(logp_ref[i, t] - logp_old[i, t])
            assert float(k1[i, t]) == pytest.approx(-d, abs=1e-12)
            assert float(k3[i, t]) == pytest.approx(math.exp(d) - d - 1, abs=1e-12)
    assert bool((k3 >= 0).all())
    same = kl_estimate(logp_old, logp_old, mask, "k3")
    assert bool((same == 0).all())


# --- diagnostics ------------------------------------------------------------------------------


def test_prm_vr_agreement() -> None:
    outcome = torch.tensor([0.5, -0.2, 0.3, -0.1, 0.0])
    solved = torch.tensor([True, False, False, True, False])
    has_ground_truth = torch.tensor([True, True, True, False, True])
    # agree, agree, disagree, (no ground truth), agree (O = 0 counts as "not correct")
    assert float(prm_vr_agreement(outcome, solved, has_ground_truth)) == pytest.approx(3 / 4)
    assert math.isnan(float(prm_vr_agreement(outcome, solved, torch.zeros(5, dtype=torch.bool))))


def test_steps_per_response_ignores_padding() -> None:
    ends = torch.tensor([[False, True, True, True], [True, False, True, True], [True, True, True, True]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False], [False, False, False, False]])
    assert steps_per_response(ends, mask).tolist() == [2, 2, 0]
