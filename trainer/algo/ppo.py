"""The clipped PPO objective (pure-algorithm.md section 5). No critic, no entropy term."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .options import DEFAULT_CLIP_EPS


def masked_sequence_mean(values: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's valid tokens, then over sequences with at least one token.

    values, token_mask [B, L] -> scalar. Empty sequences are left out of the outer mean.
    """
    mask = token_mask.to(values.dtype)
    counts = mask.sum(-1)
    per_sequence = (values * mask).sum(-1) / counts.clamp(min=1)
    has_tokens = counts > 0
    if not bool(has_tokens.any()):
        return values.new_zeros(())
    return per_sequence[has_tokens].mean()


@dataclass(frozen=True)
class PpoLoss:
    """loss: scalar to minimise. clip_fraction: share of valid tokens whose ratio was clipped
    in the direction that mattered. mean_ratio: mean ratio over valid tokens. approx_kl: mean
    of logp_old - logp_new over valid tokens (k1)."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    mean_ratio: torch.Tensor
    approx_kl: torch.Tensor


def ppo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    token_mask: torch.Tensor,
    clip_eps: float = DEFAULT_CLIP_EPS,
    token_weights: torch.Tensor | None = None,
) -> PpoLoss:
    """Per token -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) with ratio = exp(new - old),
    times the token's weight (offpolicy.py; 1 when None), aggregated as the mean over sequences
    of each sequence's token mean.

    All inputs [B, L]; values under padding never matter.
    """
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    zeros = torch.zeros_like(logp_new)
    log_ratio = torch.where(token_mask, logp_new - logp_old, zeros)
    advantages = torch.where(token_mask, advantages, zeros)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights.detach()
    with torch.no_grad():
        count = token_mask.sum().clamp(min=1)
        was_clipped = (clipped < unclipped) & token_mask
        clip_fraction = was_clipped.sum() / count
        mean_ratio = torch.where(token_mask, ratio, zeros).sum() / count
        approx_kl = torch.where(token_mask, -log_ratio, zeros).sum() / count
    return PpoLoss(masked_sequence_mean(per_token, token_mask), clip_fraction, mean_ratio, approx_kl)
