"""Where the steps lie, as tensors (pure-algorithm.md section 1).

Steps themselves are split once, on token ids, by contract/steps.py (`split_steps`: the PRM
service returns those spans); this module turns step ends into the batch structure credit
assignment needs. Conventions used across trainer/algo:
    B  responses in a batch, L  padded response length, K  padded number of steps.
    token_mask [B, L] bool: valid response tokens (EOS included when generated), right-padded:
        each response's valid tokens come first.
    step_end_mask [B, L] bool: the last token of every step (a separator token, or the last
        valid token for the final step). Always a subset of token_mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    step_mask [B, K] bool: valid steps (left-aligned: steps 0..K_i-1 of response i).
    step_lengths [B, K] long: n_{i,k}, tokens per step including its end token (0 on padding).
    response_lengths [B] long: L_i, valid tokens per response.
    end_rows, end_cols, end_steps [E] long: response, token position and step number of every
        step end, in row-major order (E = total number of steps in the batch).
    step_end_mask, token_mask [B, L] bool: the step ends (restricted to valid tokens) and the
        valid tokens.
    """

    step_mask: torch.Tensor
    step_lengths: torch.Tensor
    response_lengths: torch.Tensor
    end_rows: torch.Tensor
    end_cols: torch.Tensor
    end_steps: torch.Tensor
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

    @property
    def step_index(self) -> torch.Tensor:
        """[B, L] long: the step each valid token belongs to (0 on padding). Costs a cumsum."""
        ends = self.step_end_mask.long()
        return torch.where(self.token_mask, ends.cumsum(-1) - ends, 0)


def step_layout(step_end_mask: torch.Tensor, token_mask: torch.Tensor) -> StepLayout:
    """Derive per-step structure from step ends.

    step_end_mask, token_mask: [B, L] bool. Responses must be right-padded (valid tokens
    first) and the last valid token of every non-empty response must end a step: ValueError
    otherwise. Works from the sparse list of step ends, so that the cost over [B, L] is a few
    elementwise passes.
    """
    if step_end_mask.shape != token_mask.shape or token_mask.dim() != 2:
        raise ValueError(
            f"masks must both be [B, L]: {tuple(step_end_mask.shape)} vs {tuple(token_mask.shape)}"
        )
    batch, width = token_mask.shape
    device = token_mask.device
    # Right-padded means no valid token ever follows a padding token.
    if bool((token_mask[:, 1:] > token_mask[:, :-1]).any()):
        raise ValueError("token_mask must be right-padded: each response's valid tokens come first")
    ends = step_end_mask & token_mask
    end_rows, end_cols = ends.nonzero(as_tuple=True)
    num_steps = torch.bincount(end_rows, minlength=batch)
    # With right padding, a response's length is one past its last step end, provided the
    # token there is padding (checked below): no pass over [B, L] is needed to count tokens.
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    lengths.scatter_reduce_(0, end_rows, end_cols + 1, reduce="amax")
    rows = torch.arange(batch, device=device)
    if width and bool((token_mask[rows, lengths.clamp(max=width - 1)] & (lengths < width)).any()):
        raise ValueError("the last valid token of a response must end a step")
    first_end = num_steps.cumsum(0) - num_steps
    end_steps = torch.arange(end_rows.numel(), device=device) - first_end[end_rows]
    previous_end = torch.cat([end_cols.new_full((1,), -1), end_cols[:-1]])
    previous_end = torch.where(end_steps == 0, -1, previous_end)
    steps = max(int(num_steps.max()) if batch else 0, 1)
    step_mask = torch.arange(steps, device=device) < num_steps.unsqueeze(-1)
    step_lengths = torch.zeros(batch, steps, dtype=torch.long, device=device)
    step_lengths[end_rows, end_steps] = end_cols - previous_end
    return StepLayout(step_mask, step_lengths, lengths, end_rows, end_cols, end_steps, ends, token_mask)


def scatter_to_step_ends(step_values: torch.Tensor, layout: StepLayout) -> torch.Tensor:
    """[B, K] per-step values -> [B, L] tensor holding each step's value at its end token."""
    out = step_values.new_zeros(layout.token_mask.shape)
    out[layout.end_rows, layout.end_cols] = step_values[layout.end_rows, layout.end_steps]
    return out
