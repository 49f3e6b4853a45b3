"""A slow, loop-by-loop reference of PURE credit assignment and the PPO loss (S1 semantics).

This module is the executable spec: it is written straight from pure-algorithm.md (sections 3,
4 and 5), one response at a time, with plain Python lists and the `math` module only (the
choices and defaults are options.py's, like everywhere in the package). The unit
tests (tests/unit/test_reference_equivalence.py, test_worked_example.py) pin the vectorised
core in this package to it, and benchmarks/bench_credit.py measures the vectorised core
against it. It must stay slow and simple: no torch, no numpy, no cleverness. Readability
beats speed everywhere in this file.

Input of `reference_advantages`: a list of prompt groups; each group is a list (two or more)
of response dicts with the keys
    step_tokens       list[int]    tokens per step n_k, the step's end token included (each >= 1)
    step_scores       list[float]  PRM score r_k of each step (one per step)
    solved            bool         the verifier accepted the final answer
    has_ground_truth  bool         the prompt has a ground-truth answer
    kl                list[float] | None   per-token KL estimate (None = all zeros)
"""

from __future__ import annotations

import math

from .options import (
    DEFAULT_BASELINE,
    DEFAULT_CLIP_EPS,
    DEFAULT_CREDIT,
    DEFAULT_KL_COEF,
    DEFAULT_NORMALIZE,
    DEFAULT_REWARD_MODE,
    DEFAULT_TEMPERATURE,
    DEFAULT_VR_COEF,
    NORMALIZE_EPS,
    BaselineKind,
    CreditMethod,
    RewardMode,
    parse_choice,
)


def _step_weights(scores: list[float], credit: CreditMethod, temperature: float) -> list[float]:
    """The weight of each step in the outcome reward (section 3)."""
    num_steps = len(scores)
    if credit == CreditMethod.MIN:
        # w_k = softmax_k(-r_k / T). Shifting every exponent by the same amount (the lowest
        # score) leaves the softmax unchanged and keeps exp() from overflowing for small T.
        lowest = min(scores)
        exps = [math.exp(-(r - lowest) / temperature) for r in scores]
        total = sum(exps)
        return [e / total for e in exps]
    if credit == CreditMethod.SUM:
        return [1.0] * num_steps
    if credit == CreditMethod.MEAN:
        return [1.0 / num_steps] * num_steps
    # strict-min: one-hot on the first lowest step (the T -> 0 limit of min).
    lowest = min(scores)
    first = scores.index(lowest)
    return [1.0 if k == first else 0.0 for k in range(num_steps)]


def _transformed(scores: list[float], weights: list[float], credit: CreditMethod) -> list[float]:
    """r*_k (section 3)."""
    if credit != CreditMethod.STRICT_MIN:
        return [w * r for w, r in zip(weights, scores, strict=True)]
    # r*_k = g_k - g_{k+1}, g_k = min_{k' >= k} r_k', g_{K+1} = 0.
    num_steps = len(scores)
    g = [min(scores[k:]) for k in range(num_steps)] + [0.0]
    return [g[k] - g[k + 1] for k in range(num_steps)]


def _check_response(response: dict, where: str) -> None:
    step_tokens = response["step_tokens"]
    if len(step_tokens) < 1:
        raise ValueError(f"{where}: a response needs at least one step")
    if any(n < 1 for n in step_tokens):
        raise ValueError(f"{where}: every step needs at least one token")
    if len(response["step_scores"]) != len(step_tokens):
        raise ValueError(f"{where}: one score per step expected")
    kl = response.get("kl")
    if kl is not None and len(kl) != sum(step_tokens):
        raise ValueError(f"{where}: one KL value per token expected")


def _credit(response: dict, credit: CreditMethod, temperature: float, reward_mode: RewardMode) -> dict:
    """Section 3 for one response: its scores as used, step weights, r* and outcome O."""
    r = [float(s) for s in response["step_scores"]]
    if reward_mode == RewardMode.VR:
        r = [0.0] * len(r)  # VR mode: process rewards are all 0
    w = _step_weights(r, credit, temperature)
    r_star = _transformed(r, w, credit)
    # O_i = sum_k r*_{i,k}
    return {"scores": r, "step_weights": w, "transformed": r_star, "outcome": sum(r_star)}


def _group_advantages(
    group: list[dict],
    *,
    credit: CreditMethod,
    temperature: float,
    reward_mode: RewardMode,
    baseline: BaselineKind,
    kl_coef: float,
    vr_coef: float,
) -> list[dict]:
    """Everything up to the raw advantages for one prompt group (sections 3 and 4)."""
    n = len(group)
    # Section 3: credit transform, per response, over its steps only.
    results = [_credit(response, credit, temperature, reward_mode) for response in group]
    outcome = [item["outcome"] for item in results]
    lengths = [sum(response["step_tokens"]) for response in group]  # L_i
    # Verifiable reward: v_i = solved_i - 1 (0 without ground truth).
    v = [_verifiable_reward(response) for response in group]

    for i, (response, item) in enumerate(zip(group, results, strict=True)):
        others = [j for j in range(n) if j != i]
        step_tokens = response["step_tokens"]

        # Section 4: RLOO baseline, either per token (S1 default) or per step.
        if baseline == BaselineKind.TOKEN:
            abar = sum(outcome[j] for j in others) / sum(lengths[j] for j in others)
            base = abar
            share = [abar * (n_k - 1) for n_k in step_tokens]  # abar_i * m_{i,k}
        else:
            base = sum(outcome[j] / len(group[j]["step_tokens"]) for j in others) / (n - 1)
            share = [base] * len(step_tokens)
        step_rewards = [item["transformed"][k] - share[k] for k in range(len(step_tokens))]

        # Leave-one-out VR advantage, added to the last step's reward (modes vr, prm+vr).
        vt = 0.0
        if reward_mode != RewardMode.PRM:
            vt = v[i] - sum(v[j] for j in others) / (n - 1)
            step_rewards[-1] += vr_coef * vt

        item.update(baseline=base, baseline_share=share, vr_advantage=vt, step_rewards=step_rewards)
        item.update(_token_advantages(step_tokens, step_rewards, response.get("kl"), kl_coef))
    return results


def _verifiable_reward(response: dict) -> float:
    """v_i = solved_i - 1, or 0 for a prompt without ground truth (section 4)."""
    if not response["has_ground_truth"]:
        return 0.0
    return (1.0 if response["solved"] else 0.0) - 1.0


def _token_advantages(
    step_tokens: list[int], step_rewards: list[float], kl: list[float] | None, kl_coef: float
) -> dict:
    """One response's `token_rewards`, `returns` and `advantages` from its step rewards rt."""
    # Token rewards: rt at each step's end token, 0 elsewhere, minus beta * kl everywhere.
    token_rewards = []
    is_step_end = []
    for k in range(len(step_tokens)):
        for position in range(step_tokens[k]):
            last = position == step_tokens[k] - 1
            token_rewards.append(step_rewards[k] if last else 0.0)
            is_step_end.append(last)
    if kl is not None:
        token_rewards = [rho - kl_coef * float(kl_t) for rho, kl_t in zip(token_rewards, kl, strict=True)]

    # Returns G_t = sum_{t' >= t} rho_t' (gamma = 1), accumulated from the end.
    returns = [0.0] * len(token_rewards)
    running = 0.0
    for t in reversed(range(len(token_rewards))):
        running += token_rewards[t]
        returns[t] = running

    # Advantage = return, except 0 at every step-end token (EOS included).
    advantages = [0.0 if end else g for g, end in zip(returns, is_step_end, strict=True)]
    return {"token_rewards": token_rewards, "returns": returns, "advantages": advantages}


def _normalize(all_advantages: list[list[float]]) -> list[list[float]]:
    """Batch normalisation (end of section 4), over every token of every response given."""
    flat = [a for advantages in all_advantages for a in advantages]
    nonzero = sum(1 for a in flat if a != 0.0)  # N = #tokens - |Z|
    if nonzero == 0:
        return [[0.0] * len(advantages) for advantages in all_advantages]
    mu = sum(flat) / nonzero
    var = sum((a - mu) ** 2 for a in flat) / nonzero  # over ALL tokens, divided by N
    std = math.sqrt(max(var, NORMALIZE_EPS))
    return [[0.0 if a == 0.0 else (a - mu) / std for a in advantages] for advantages in all_advantages]


def reference_advantages(
    groups: list[list[dict]],
    *,
    credit: CreditMethod | str = DEFAULT_CREDIT,
    temperature: float = DEFAULT_TEMPERATURE,
    reward_mode: RewardMode | str = DEFAULT_REWARD_MODE,
    baseline: BaselineKind | str = DEFAULT_BASELINE,
    kl_coef: float = DEFAULT_KL_COEF,
    vr_coef: float = DEFAULT_VR_COEF,
    normalize: bool = DEFAULT_NORMALIZE,
) -> list[list[dict]]:
    """PURE credit assignment, S1 semantics, for a list of prompt groups.

    Returns, per group and per response, a dict with: per step `scores` (as used: 0 in `vr`
    mode), `step_weights`, `transformed` (r*), `baseline_share`, `step_rewards` (rt, VR
    included); per response `outcome` (O), `baseline` (abar for `token`, b for `step`),
    `vr_advantage` (vt; 0 in `prm` mode); per token `token_rewards` (rho, KL included),
    `returns` (G), `advantages` (step-end tokens 0) and `normalized` (over all tokens of all
    groups together; equal to `advantages` when `normalize` is False).
    """
    credit = parse_choice(CreditMethod, credit, "credit method")
    reward_mode = parse_choice(RewardMode, reward_mode, "reward mode")
    baseline = parse_choice(BaselineKind, baseline, "baseline")
    if credit == CreditMethod.MIN and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    results = []
    for g, group in enumerate(groups):
        if len(group) < 2:
            raise ValueError(f"group {g}: every prompt group needs at least two responses")
        for i, response in enumerate(group):
            _check_response(response, f"group {g}, response {i}")
        results.append(
            _group_advantages(
                group,
                credit=credit,
                temperature=temperature,
                reward_mode=reward_mode,
                baseline=baseline,
                kl_coef=kl_coef,
                vr_coef=vr_coef,
            )
        )

    all_advantages = [item["advantages"] for group in results for item in group]
    normalized = _normalize(all_advantages) if normalize else [list(a) for a in all_advantages]
    position = 0
    for group in results:
        for item in group:
            item["normalized"] = normalized[position]
            position += 1
    return results


def reference_ppo_loss(
    logp_new: list[list[float]],
    logp_old: list[list[float]],
    advantages: list[list[float]],
    eps: float = DEFAULT_CLIP_EPS,
) -> float:
    """Clipped PPO loss (section 5) over per-sequence lists of per-token values.

    Per token -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) with ratio = exp(new - old);
    the mean over each sequence's tokens, then the mean over sequences. Sequences without
    tokens are left out; 0.0 if no sequence has a token.
    """
    per_sequence = []
    for new_seq, old_seq, adv_seq in zip(logp_new, logp_old, advantages, strict=True):
        losses = []
        for new, old, a in zip(new_seq, old_seq, adv_seq, strict=True):
            ratio = math.exp(new - old)
            clipped = min(max(ratio, 1.0 - eps), 1.0 + eps)
            losses.append(-min(ratio * a, clipped * a))
        if losses:
            per_sequence.append(sum(losses) / len(losses))
    if not per_sequence:
        return 0.0
    return sum(per_sequence) / len(per_sequence)
