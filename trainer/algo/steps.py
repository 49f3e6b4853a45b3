"""Step splitting on token ids (pure-algorithm.md section 1).

Conventions used across trainer/algo:
    B  responses in a batch, L  padded response length, K  padded number of steps.
    token_mask [B, L] bool: valid response tokens (EOS included when generated). Valid tokens
        need not be left-aligned, but steps follow token order.
    step_end_mask [B, L] bool: the last token of every step (a separator token, or the last
        valid token for the final step). Always a subset of token_mask.
Nothing here reads a tokenizer: adapters pass decoded vocabulary strings in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

STEP_SEPARATOR = "\n\n"


def separator_token_ids(
    vocabulary: Mapping[int, str] | Iterable[str], suffix: str = STEP_SEPARATOR
) -> frozenset[int]:
    """Every token id whose decoded text ends with `suffix` (default "\\n\\n").

    `vocabulary` maps id -> decoded text, or is a sequence of decoded texts indexed by id.
    Compute it once per tokenizer.
    """
    items = vocabulary.items() if isinstance(vocabulary, Mapping) else enumerate(vocabulary)
    return frozenset(int(i) for i, text in items if text.endswith(suffix))


def last_valid_token_mask(token_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool -> [B, L] bool, True at the last valid token of each non-empty row."""
    positions = torch.arange(token_mask.shape[-1], device=token_mask.device)
    last = torch.where(token_mask, positions, -1).amax(dim=-1)  # [B], -1 for empty rows
    return (positions == last.unsqueeze(-1)) & token_mask


def step_end_mask_from_ids(
    token_ids: torch.Tensor, token_mask: torch.Tensor, separator_ids: Iterable[int]
) -> torch.Tensor:
    """Step ends of responses given as token ids.

    token_ids [B, L] int, token_mask [B, L] bool -> step_end_mask [B, L] bool: separator tokens
    plus the last valid token. A response with no separator is one step.
    """
    separators = torch.tensor(sorted(separator_ids), dtype=token_ids.dtype, device=token_ids.device)
    is_separator = torch.isin(token_ids, separators) & token_mask
    return is_separator | last_valid_token_mask(token_mask)


def step_end_mask_from_lengths(
    step_lengths: list[list[int]], pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and step-end masks of left-aligned responses given as tokens per step.

    step_lengths: per response, the token count n_k of each step (end token included, each
    n_k >= 1). Returns (token_mask [B, L], step_end_mask [B, L]) with L = pad_to or the
    longest response.
    """
    totals = [sum(lengths) for lengths in step_lengths]
    width = max(totals, default=0) if pad_to is None else pad_to
    if width < max(totals, default=0):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest response")
    token_mask = torch.zeros(len(step_lengths), width, dtype=torch.bool)
    step_end_mask = torch.zeros_like(token_mask)
    for row, lengths in enumerate(step_lengths):
        if any(n < 1 for n in lengths):
            raise ValueError(f"response {row}: every step needs at least one token")
        token_mask[row, : totals[row]] = True
        ends = torch.tensor(lengths, dtype=torch.long).cumsum(0) - 1
        step_end_mask[row, ends] = True
    return token_mask, step_end_mask


@dataclass(frozen=True)
class StepLayout:
    """Where the steps of each response lie.

    step_index [B, L] long: the step each valid token belongs to (0 on padding).
    step_mask [B, K] bool: valid steps (left-aligned: steps 0..K_i-1 of response i).
    step_lengths [B, K] long: n_{i,k}, tokens per step including its end token (0 on padding).
    step_end_mask [B, L] bool: as given.
    token_mask [B, L] bool: as given.
    """

    step_index: torch.Tensor
    step_mask: torch.Tensor
    step_lengths: torch.Tensor
    step_end_mask: torch.Tensor
    token_mask: torch.Tensor

    @property
    def num_steps(self) -> torch.Tensor:
        """[B] long: K_i."""
        return self.step_mask.sum(dim=-1)

    @property
    def content_tokens(self) -> torch.Tensor:
        """[B, K] long: m_{i,k} = n_{i,k} - 1 (0 on padding)."""
        return (self.step_lengths - 1).clamp(min=0)


def step_layout(step_end_mask: torch.Tensor, token_mask: torch.Tensor) -> StepLayout:
    """Derive per-step structure from step ends.

    step_end_mask, token_mask: [B, L] bool. The last valid token of every non-empty row must
    be a step end (otherwise trailing tokens would belong to no step): ValueError if not.
    """
    if step_end_mask.shape != token_mask.shape:
        raise ValueError(f"mask shapes differ: {tuple(step_end_mask.shape)} vs {tuple(token_mask.shape)}")
    ends = step_end_mask & token_mask
    if bool((last_valid_token_mask(token_mask) & ~ends).any()):
        raise ValueError("the last valid token of a response must end a step")
    ends_long = ends.long()
    # Tokens of step k come after k step ends; a step's own end token is still in step k.
    step_index = torch.where(token_mask, ends_long.cumsum(-1) - ends_long, 0)
    num_steps = ends_long.sum(-1)
    width = max(int(num_steps.max()) if num_steps.numel() else 0, 1)
    step_mask = torch.arange(width, device=ends.device) < num_steps.unsqueeze(-1)
    step_lengths = torch.zeros(ends.shape[0], width, dtype=torch.long, device=ends.device)
    step_lengths.scatter_add_(1, step_index, token_mask.long())
    return StepLayout(step_index, step_mask, step_lengths, ends, token_mask)


def scatter_to_step_ends(step_values: torch.Tensor, layout: StepLayout) -> torch.Tensor:
    """[B, K] per-step values -> [B, L] tensor holding each step's value at its end token."""
    at_tokens = step_values.gather(1, layout.step_index)
    return torch.where(layout.step_end_mask, at_tokens, torch.zeros_like(at_tokens))
