"""Reward-hacking diagnostics (pure-algorithm.md section 7). Pure functions, [B]-shaped results."""

from __future__ import annotations

import torch


def steps_per_response(step_end_mask: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool masks -> [B] long: number of steps of each response."""
    return (step_end_mask & token_mask).sum(-1)


def repeat_score(token_ids: torch.Tensor, token_mask: torch.Tensor, ngram: int = 4) -> torch.Tensor:
    """Share of each response's token n-grams that already occurred earlier in it.

    token_ids [B, L] int, token_mask [B, L] bool -> [B] float in [0, 1]; 0 for responses with
    fewer than `ngram` tokens. Degenerate, looping outputs score close to 1.
    """
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    scores = torch.zeros(token_ids.shape[0], dtype=torch.float32)
    for row in range(token_ids.shape[0]):
        ids = token_ids[row][token_mask[row]].tolist()
        total = len(ids) - ngram + 1
        if total <= 0:
            continue
        distinct = len({tuple(ids[i : i + ngram]) for i in range(total)})
        scores[row] = (total - distinct) / total
    return scores


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
