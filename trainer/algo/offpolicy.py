"""Off-policy correction of the PPO loss: per-token weights against the behaviour policy.

PPO's ratio is taken against logp_old, the learner's own log-probabilities under the weights it
holds when the update starts (version v). The tokens were drawn by another policy, the
behaviour policy mu: the rollout replica's weights of version v - s (s <= max_staleness), run by
its engine's kernels and dtype, after its sampling transform (temperature, top-p; see
contract/sampling.py: `Sample.logprobs` is log mu). The surrogate's gradient is an expectation
under pi_old, so each token's term is weighted by the importance ratio pi_old / mu. Truncated
importance sampling (tis) caps that ratio at C, trading a small bias for bounded variance:

    w_t = min(exp(logp_old_t - logp_behaviour_t), C)       (a constant: no gradient flows)

`none` gives every token weight 1 (PPO as pure-algorithm.md section 5 writes it). Pure: torch
only, plain tensors in and out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .options import DEFAULT_TIS_CAP, OffPolicyCorrection


def truncated_importance_weights(
    logp_old: torch.Tensor,
    logp_behaviour: torch.Tensor,
    token_mask: torch.Tensor,
    cap: float = DEFAULT_TIS_CAP,
) -> torch.Tensor:
    """[B, L] weights min(pi_old / mu, cap) of each valid token, 0 under padding.

    logp_old, logp_behaviour float [B, L], token_mask bool [B, L]; cap >= 1 (a cap below 1 would
    down-weight even on-policy tokens).
    """
    if not cap >= 1:
        raise ValueError(f"the importance-weight cap must be >= 1, got {cap}")
    log_ratio = torch.where(token_mask, logp_old - logp_behaviour, torch.zeros_like(logp_old))
    weights = torch.exp(log_ratio.clamp(max=math.log(cap)))
    return torch.where(token_mask, weights, torch.zeros_like(weights)).detach()


def _no_correction(
    logp_old: torch.Tensor, logp_behaviour: torch.Tensor, token_mask: torch.Tensor, cap: float
) -> torch.Tensor:
    return token_mask.to(logp_old.dtype)


OFF_POLICY_WEIGHTS: dict[
    OffPolicyCorrection, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
] = {
    OffPolicyCorrection.NONE: _no_correction,
    OffPolicyCorrection.TIS: truncated_importance_weights,
}


def off_policy_weights(
    correction: OffPolicyCorrection,
    logp_old: torch.Tensor,
    logp_behaviour: torch.Tensor,
    token_mask: torch.Tensor,
    cap: float = DEFAULT_TIS_CAP,
) -> torch.Tensor:
    """[B, L] per-token loss weights of `correction` (1 on valid tokens for none, 0 on padding)."""
    return OFF_POLICY_WEIGHTS[OffPolicyCorrection(correction)](logp_old, logp_behaviour, token_mask, cap)
