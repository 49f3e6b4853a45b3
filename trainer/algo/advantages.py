"""Returns and advantages, S1 semantics (pure-algorithm.md section 4).

Shapes: B responses, L padded tokens, K padded steps; G prompt groups. `group_index` [B] long
gives each response's group (any ids; each group needs at least two responses).
`pure_advantages` runs credit assignment end to end; the choices it takes are the enums of
options.py, dispatched through `BASELINE_SHARES` and `KL_ESTIMATES` here and
`CREDIT_TRANSFORMS` in credit.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .credit import credit_transform, outcome_reward
from .options import (
    DEFAULT_BASELINE,
    DEFAULT_CREDIT,
    DEFAULT_KL_COEF,
    DEFAULT_KL_ESTIMATOR,
    DEFAULT_NORMALIZE,
    DEFAULT_REWARD_MODE,
    DEFAULT_TEMPERATURE,
    DEFAULT_VR_COEF,
    NORMALIZE_EPS,
    BaselineKind,
    CreditMethod,
    KlEstimator,
    RewardMode,
    parse_choice,
)
from .steps import StepLayout, step_layout

Pair = tuple[torch.Tensor, torch.Tensor]


def _group_sums(values: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """[B] values -> [B]: the sum over each response's group (itself included)."""
    dense = torch.unique(group_index, return_inverse=True)[1]
    totals = torch.zeros(
        int(dense.max()) + 1 if dense.numel() else 0, dtype=values.dtype, device=values.device
    )
    totals.index_add_(0, dense, values)
    return totals[dense]


def leave_one_out(values: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the other members of the group, number of other members); both [B].

    ValueError if a group has a single response: a leave-one-out baseline needs n >= 2.
    """
    others = _group_sums(torch.ones_like(values), group_index) - 1
    if bool((others < 1).any()):
        raise ValueError("every prompt group needs at least two responses")
    return _group_sums(values, group_index) - values, others


def token_level_baseline(
    outcome: torch.Tensor, response_lengths: torch.Tensor, group_index: torch.Tensor
) -> torch.Tensor:
    """abar_i = sum_{j != i} O_j / sum_{j != i} L_j: the others' reward per token. All [B]."""
    reward_others, _ = leave_one_out(outcome, group_index)
    tokens_others, _ = leave_one_out(response_lengths.to(outcome.dtype), group_index)
    return reward_others / tokens_others.clamp(min=1)


def step_level_baseline(
    outcome: torch.Tensor, num_steps: torch.Tensor, group_index: torch.Tensor
) -> torch.Tensor:
    """b_i = (1 / (n - 1)) sum_{j != i} O_j / K_j: the others' mean reward per step. All [B]."""
    per_step = outcome / num_steps.to(outcome.dtype).clamp(min=1)
    total, count = leave_one_out(per_step, group_index)
    return total / count


def _token_share(outcome: torch.Tensor, layout: StepLayout, group_index: torch.Tensor) -> Pair:
    """abar_i [B] and its share of each step, abar_i * m_{i,k} [B, K]."""
    per_response = token_level_baseline(outcome, layout.response_lengths, group_index)
    return per_response, per_response.unsqueeze(-1) * layout.content_tokens.to(outcome.dtype)


def _step_share(outcome: torch.Tensor, layout: StepLayout, group_index: torch.Tensor) -> Pair:
    """b_i [B] and its share of each step, b_i [B, K]."""
    per_response = step_level_baseline(outcome, layout.num_steps, group_index)
    return per_response, per_response.unsqueeze(-1).expand(-1, layout.step_mask.shape[1])


# (outcome [B], layout, group_index [B]) -> (baseline [B], share of each step [B, K])
BASELINE_SHARES: dict[BaselineKind, Callable[[torch.Tensor, StepLayout, torch.Tensor], Pair]] = {
    BaselineKind.TOKEN: _token_share,
    BaselineKind.STEP: _step_share,
}


def verifiable_advantage(
    solved: torch.Tensor, has_ground_truth: torch.Tensor, group_index: torch.Tensor
) -> torch.Tensor:
    """vt_i = v_i - mean_{j != i} v_j with v = solved - 1 (0 without ground truth). All [B]."""
    v = torch.where(has_ground_truth, solved.double() - 1.0, 0.0)
    others_total, others_count = leave_one_out(v, group_index)
    return v - others_total / others_count


def _k1(logp_old: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    return logp_old - logp_ref


def _k3(logp_old: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    d = logp_ref - logp_old
    return torch.expm1(d) - d


# (logp_old [B, L], logp_ref [B, L]) -> per-token estimate [B, L]
KL_ESTIMATES: dict[KlEstimator, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    KlEstimator.K1: _k1,
    KlEstimator.K3: _k3,
}


def kl_estimate(
    logp_old: torch.Tensor,
    logp_ref: torch.Tensor,
    token_mask: torch.Tensor,
    estimator: KlEstimator | str = DEFAULT_KL_ESTIMATOR,
) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate, [B, L] (0 on padding).

    k1 = logp_old - logp_ref (S1); k3 = exp(d) - d - 1 with d = logp_ref - logp_old
    (non-negative, lower variance; S2).
    """
    kl = KL_ESTIMATES[parse_choice(KlEstimator, estimator, "KL estimator")](logp_old, logp_ref)
    return torch.where(token_mask, kl, torch.zeros_like(kl))


def returns_to_go(token_rewards: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """G_t = sum_{t' >= t} rho_t' (gamma = 1) over valid tokens. [B, L] -> [B, L]."""
    rho = torch.where(token_mask, token_rewards, 0.0)
    returns = rho.flip(-1).cumsum(-1).flip(-1)
    return returns.masked_fill_(~token_mask, 0.0)


def normalize_advantages(
    advantages: torch.Tensor, token_mask: torch.Tensor, eps: float = NORMALIZE_EPS
) -> torch.Tensor:
    """Batch normalisation of S1 (pure-algorithm.md section 4). [B, L] -> [B, L].

    Z = valid tokens whose advantage is exactly 0, N = #valid - |Z|; mu = sum(A) / N;
    var = sum over all valid tokens of (A - mu)^2 / N; A_hat = (A - mu) / sqrt(max(var, eps)),
    and 0 on Z and on padding. If N = 0 the result is all zeros.
    """
    masked = torch.where(token_mask, advantages, 0.0)
    return _normalize_zero_padded(masked, int(token_mask.sum()), eps)


def _normalize_zero_padded(a: torch.Tensor, valid_tokens: int, eps: float = NORMALIZE_EPS) -> torch.Tensor:
    """normalize_advantages for advantages already 0 on padding, given the number of valid tokens.

    Written with float arithmetic and in-place updates: on CPU, boolean masks over [B, L] cost
    more than the arithmetic itself.
    """
    nonzero = a.sign().abs_()  # 1.0 where A != 0, else 0.0
    count = int(nonzero.sum())
    if count == 0:
        return torch.zeros_like(a)
    mean = float(a.sum()) / count
    centered = nonzero.mul_(-mean).add_(a)  # A - mean on non-zero tokens, 0 elsewhere
    # The zeros of Z sit at distance |mean| from it: both parts are positive, nothing cancels.
    flat = centered.view(-1)
    squares = float(torch.dot(flat, flat)) + (valid_tokens - count) * mean * mean
    return centered.mul_(1.0 / max(squares / count, eps) ** 0.5)


@dataclass(frozen=True)
class PureAdvantages:
    """Everything credit assignment computed, for training and for explaining it.

    Per step [B, K]: scores (as used: 0 in `vr` mode), step_weights, transformed (r*),
    baseline_share (what the baseline took from each step), step_rewards (rt, VR included).
    Per response [B]: outcome (O), baseline (abar for `token`, b for `step`), vr_advantage (vt,
    0 in `prm` mode). Per token [B, L]: token_rewards (rho, KL included), returns (G),
    advantages (G with step ends and padding at 0), normalized (A_hat; equals advantages when
    normalisation is off).
    """

    layout: StepLayout
    scores: torch.Tensor
    step_weights: torch.Tensor
    transformed: torch.Tensor
    outcome: torch.Tensor
    baseline: torch.Tensor
    baseline_share: torch.Tensor
    vr_advantage: torch.Tensor
    step_rewards: torch.Tensor
    token_rewards: torch.Tensor
    returns: torch.Tensor
    advantages: torch.Tensor
    normalized: torch.Tensor


def pure_advantages(
    step_scores: torch.Tensor,
    step_end_mask: torch.Tensor,
    token_mask: torch.Tensor,
    group_index: torch.Tensor,
    *,
    solved: torch.Tensor | None = None,
    has_ground_truth: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    credit: CreditMethod | str = DEFAULT_CREDIT,
    temperature: float = DEFAULT_TEMPERATURE,
    reward_mode: RewardMode | str = DEFAULT_REWARD_MODE,
    baseline: BaselineKind | str = DEFAULT_BASELINE,
    kl_coef: float = DEFAULT_KL_COEF,
    vr_coef: float = DEFAULT_VR_COEF,
    normalize: bool = DEFAULT_NORMALIZE,
) -> PureAdvantages:
    """PURE credit assignment for a batch of prompt groups, end to end.

    step_scores [B, K'] PRM scores in [-1, 1], left-aligned per response; only the first K_i
        (the number of step ends of response i) are read, the rest may hold anything.
    step_end_mask, token_mask [B, L] bool (see steps.py); group_index [B] long.
    solved, has_ground_truth [B] bool (default: no ground truth anywhere).
    kl [B, L] per-token KL estimate (see kl_estimate); None = no KL penalty.
    credit, reward_mode, baseline: the enums of options.py or their strings.
    Returns PureAdvantages; `normalized` is what the PPO loss consumes.
    """
    mode = parse_choice(RewardMode, reward_mode, "reward mode")
    share_of = BASELINE_SHARES[parse_choice(BaselineKind, baseline, "baseline")]
    layout = step_layout(step_end_mask, token_mask)
    scores = _used_scores(step_scores, layout, mode)
    weights, transformed = credit_transform(scores, layout.step_mask, credit, temperature)
    outcome = outcome_reward(transformed, layout.step_mask)
    per_response, share = share_of(outcome, layout, group_index)
    share = torch.where(layout.step_mask, share, torch.zeros_like(share))
    step_rewards = transformed - share
    vt = torch.zeros_like(outcome)
    if mode.verifiable:
        vt = _verifiable(outcome, solved, has_ground_truth, group_index)
        step_rewards = step_rewards + _last_step_bonus(vr_coef * vt, layout)
    token_rewards = _token_rewards(step_rewards, layout, token_mask, kl, kl_coef)
    returns, advantages = _returns_and_advantages(token_rewards, layout)
    valid_tokens = int(layout.response_lengths.sum())
    normalized = _normalize_zero_padded(advantages, valid_tokens) if normalize else advantages
    return PureAdvantages(
        layout=layout,
        scores=scores,
        step_weights=weights,
        transformed=transformed,
        outcome=outcome,
        baseline=per_response,
        baseline_share=share,
        vr_advantage=vt,
        step_rewards=step_rewards,
        token_rewards=token_rewards,
        returns=returns,
        advantages=advantages,
        normalized=normalized,
    )


def _used_scores(step_scores: torch.Tensor, layout: StepLayout, mode: RewardMode) -> torch.Tensor:
    """The step scores [B, K] as credit assignment reads them: K columns, 0 on padding and in
    `vr` mode. ValueError if step_scores [B, K'] has fewer columns than a response has steps."""
    width = layout.step_mask.shape[1]
    if step_scores.shape[1] < width:
        raise ValueError(f"step_scores has {step_scores.shape[1]} columns but a response has {width} steps")
    scores = step_scores[:, :width]
    if not mode.process:
        scores = torch.zeros_like(scores)
    return torch.where(layout.step_mask, scores, torch.zeros_like(scores))


def _verifiable(
    outcome: torch.Tensor,
    solved: torch.Tensor | None,
    has_ground_truth: torch.Tensor | None,
    group_index: torch.Tensor,
) -> torch.Tensor:
    """vt [B] in the dtype of outcome [B]; no ground truth anywhere when either mask is None."""
    if solved is None or has_ground_truth is None:
        solved = torch.zeros_like(outcome, dtype=torch.bool)
        has_ground_truth = torch.zeros_like(outcome, dtype=torch.bool)
    return verifiable_advantage(solved, has_ground_truth, group_index).to(outcome.dtype)


def _last_step_bonus(bonus: torch.Tensor, layout: StepLayout) -> torch.Tensor:
    """bonus [B] placed on each response's last step: [B, K], 0 elsewhere."""
    last_step = (layout.num_steps - 1).clamp(min=0).unsqueeze(-1)
    width = layout.step_mask.shape[1]
    placed = bonus.new_zeros(bonus.shape[0], width).scatter_(1, last_step, bonus.unsqueeze(-1))
    return torch.where(layout.step_mask, placed, torch.zeros_like(placed))


def _token_rewards(
    step_rewards: torch.Tensor,
    layout: StepLayout,
    token_mask: torch.Tensor,
    kl: torch.Tensor | None,
    kl_coef: float,
) -> torch.Tensor:
    """rho [B, L]: rt [B, K] on each step's end token, minus kl_coef * kl [B, L] on every token."""
    if kl is not None and kl_coef != 0:
        token_rewards = torch.where(token_mask, kl.to(step_rewards.dtype), 0.0).mul_(-kl_coef)
    else:
        token_rewards = step_rewards.new_zeros(token_mask.shape)
    token_rewards.index_put_(
        (layout.end_rows, layout.end_cols),
        step_rewards[layout.end_rows, layout.end_steps],
        accumulate=True,
    )
    return token_rewards


def _returns_and_advantages(token_rewards: torch.Tensor, layout: StepLayout) -> Pair:
    """(returns G [B, L], advantages [B, L]: G with step ends at 0) from rho [B, L]."""
    # Reverse cumulative sum as total - prefix + own (cheaper than flipping twice). Right
    # padding holds no reward, so returns are already 0 there.
    returns = token_rewards.cumsum(-1)
    totals = returns[:, -1:].clone()
    returns.neg_().add_(totals).add_(token_rewards)
    # Step ends (EOS included) get advantage 0; padding already holds 0.
    advantages = returns.clone()
    advantages[layout.end_rows, layout.end_cols] = 0.0
    return returns, advantages
