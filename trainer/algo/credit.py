"""Credit transforms over the steps of each response (pure-algorithm.md section 3).

All functions take step scores r [B, K] with a step mask [B, K] (valid steps left-aligned) and
return tensors of the same shape, zero on padded steps. Values under the mask never matter.
`CREDIT_TRANSFORMS` maps each CreditMethod to its transform; `credit_transform` dispatches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .options import DEFAULT_CREDIT, DEFAULT_TEMPERATURE, CreditMethod, parse_choice

Pair = tuple[torch.Tensor, torch.Tensor]
# (scores [B, K], step_mask [B, K], temperature) -> (weights [B, K], transformed [B, K])
CreditTransform = Callable[[torch.Tensor, torch.Tensor, float], Pair]


def _zero_padding(values: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    return torch.where(step_mask, values, torch.zeros_like(values))


def softmin_weights(scores: torch.Tensor, step_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """w_k = softmax_k(-r_k / T) over each response's valid steps. [B, K] -> [B, K].

    As T -> 0 the weight concentrates on the lowest-scoring step (ties share it).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = torch.where(step_mask, -scores / temperature, torch.full_like(scores, -torch.inf))
    # Rows without any step would be all -inf (NaN after softmax); they are zeroed below.
    return _zero_padding(torch.softmax(logits, dim=-1), step_mask)


def suffix_min(scores: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """g_k = min_{k' >= k} r_k' over valid steps. [B, K] -> [B, K] (0 on padding)."""
    padded = torch.where(step_mask, scores, torch.full_like(scores, torch.inf))
    g = padded.flip(-1).cummin(dim=-1).values.flip(-1)
    return _zero_padding(g, step_mask)


def _min_form(scores: torch.Tensor, step_mask: torch.Tensor, temperature: float) -> Pair:
    """w = softmin(-r / T), the PURE default."""
    weights = softmin_weights(scores, step_mask, temperature)
    return weights, weights * scores


def _sum_form(scores: torch.Tensor, step_mask: torch.Tensor, temperature: float) -> Pair:
    """w = 1 (T unused)."""
    return step_mask.to(scores.dtype), scores.clone()


def _mean_form(scores: torch.Tensor, step_mask: torch.Tensor, temperature: float) -> Pair:
    """w = 1 / K_i (T unused)."""
    count = step_mask.sum(dim=-1, keepdim=True).clamp(min=1).to(scores.dtype)
    weights = step_mask.to(scores.dtype) / count
    return weights, weights * scores


def _strict_min_form(scores: torch.Tensor, step_mask: torch.Tensor, temperature: float) -> Pair:
    """r*_k = g_k - g_{k+1}, g the suffix minimum, g_{K+1} = 0; weights one-hot (T unused)."""
    g = suffix_min(scores, step_mask)
    g_next = torch.cat([g[:, 1:], torch.zeros_like(g[:, :1])], dim=-1)
    transformed = _zero_padding(g - g_next, step_mask)
    masked = torch.where(step_mask, scores, torch.full_like(scores, torch.inf))
    first_lowest = masked.argmin(dim=-1, keepdim=True)
    weights = torch.zeros_like(scores).scatter_(1, first_lowest, 1.0)
    return _zero_padding(weights, step_mask), transformed


CREDIT_TRANSFORMS: dict[CreditMethod, CreditTransform] = {
    CreditMethod.MIN: _min_form,
    CreditMethod.SUM: _sum_form,
    CreditMethod.MEAN: _mean_form,
    CreditMethod.STRICT_MIN: _strict_min_form,
}


def credit_transform(
    scores: torch.Tensor,
    step_mask: torch.Tensor,
    method: CreditMethod | str = DEFAULT_CREDIT,
    temperature: float = DEFAULT_TEMPERATURE,
) -> Pair:
    """Transformed step rewards r* and the weights that produced them.

    scores [B, K] in [-1, 1], step_mask [B, K] bool -> (weights [B, K], transformed [B, K]),
    with transformed = weights * scores for every method:
        min:        w = softmin(-r / T), the PURE default;
        sum:        w = 1;
        mean:       w = 1 / K_i;
        strict-min: r*_k = g_k - g_{k+1} with g the suffix minimum and g_{K+1} = 0, so the
                    suffix sum from step k is exactly min_{k' >= k} r_k'. Its reported weights
                    are the T -> 0 limit of min: one-hot on the first lowest step (so that
                    sum_k w_k r_k = O_i); transformed is not w * r for it.
    """
    transform = CREDIT_TRANSFORMS[parse_choice(CreditMethod, method, "credit method")]
    return transform(_zero_padding(scores, step_mask), step_mask, temperature)


def outcome_reward(transformed: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """O_i = sum_k r*_{i,k}. [B, K] -> [B]."""
    return _zero_padding(transformed, step_mask).sum(dim=-1)
