"""The policy's view of a rollout batch: packed sequences and per-token log-probabilities.

`response_logprobs` runs one micro-batch (trainer/batching.py cuts them by a token budget). It
asks the model for the logits of the response positions only (`logits_to_keep`, a 1-D index of
the columns from the first to the last predicting position of the micro-batch), so the largest
[rows, columns, vocab] tensor is one micro-batch's, never the batch's.
Loading and sharding are trainer/sharding.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Module attributes that hold a dropout probability (nn.Dropout's `p`, and the float that
# transformers' attention modules pass to their attention kernel).
DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout", "hidden_dropout", "resid_dropout")


@dataclass(frozen=True)
class SequenceBatch:
    """Prompts and responses packed for one forward pass.

    input_ids, attention_mask [B, T]: prompt + response, right-padded.
    response_ids, response_mask [B, L]: the responses alone, right-padded.
    positions [B, L]: where in input_ids the logits that predict each response token sit.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    positions: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.attention_mask, self.response_ids, self.response_mask, self.positions)

    def to(self, device: str | torch.device) -> SequenceBatch:
        return SequenceBatch(*(t.to(device) for t in self.tensors()))

    def rows(self, index: torch.Tensor) -> SequenceBatch:
        """The rows `index`, trimmed to their own longest sequence and response."""
        index = index.to(self.input_ids.device)
        lengths = self.attention_mask[index].sum(-1)
        width = self.response_mask[index].sum(-1)
        total = int(lengths.max()) if len(index) else 0
        responses = int(width.max()) if len(index) else 0
        return SequenceBatch(
            self.input_ids[index, :total],
            self.attention_mask[index, :total],
            self.response_ids[index, :responses],
            self.response_mask[index, :responses],
            self.positions[index, :responses],
        )

    @property
    def lengths(self) -> torch.Tensor:
        """[B] tokens of each packed sequence (prompt + response)."""
        return self.attention_mask.sum(-1)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> SequenceBatch:
    """Pack (prompt, response) pairs; every response needs at least one token."""
    total = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    width = max(len(r) for r in responses)
    rows = len(prompts)
    input_ids = torch.full((rows, total), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, total), dtype=torch.long)
    response_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((rows, width), dtype=torch.bool)
    positions = torch.zeros((rows, width), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if not prompt or not response:
            raise ValueError(f"row {row}: prompt and response need at least one token each")
        sequence = prompt + response
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        response_ids[row, : len(response)] = torch.tensor(response)
        response_mask[row, : len(response)] = True
        # the logits at position p predict token p + 1
        positions[row, : len(response)] = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
    return SequenceBatch(input_ids, attention_mask, response_ids, response_mask, positions)


def response_logprobs(model, batch: SequenceBatch) -> torch.Tensor:
    """log pi(response token | prefix) of every response token of one micro-batch: [b, l] float32
    (0 on padding). Keeps the graph when grad is on.

    Only the logits of the columns first..last predicting position are computed: [b, kept, V].
    """
    valid = batch.response_mask
    first = int(batch.positions[valid].min())
    last = int(batch.positions[valid].max())
    keep = torch.arange(first, last + 1, device=batch.input_ids.device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
    # Column c predicts input token first + c + 1: its log-prob is that logit minus the logsumexp.
    following = batch.input_ids[:, first + 1 : last + 2]
    chosen = logits.gather(-1, following.unsqueeze(-1)).squeeze(-1).float()
    per_column = chosen - torch.logsumexp(logits.float(), dim=-1)  # [b, kept]
    columns = (batch.positions - first).clamp(min=0, max=last - first)
    return per_column.gather(1, columns).masked_fill(~valid, 0.0)


def disable_dropout(model) -> int:
    """Set every dropout probability of `model` to 0 (nn.Dropout and the attention modules'
    float attributes in DROPOUT_ATTRIBUTES); returns how many were nonzero."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            changed += module.p > 0
            module.p = 0.0
            continue
        for name in DROPOUT_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, float) and not isinstance(value, bool):
                changed += value > 0
                setattr(module, name, 0.0)
    return changed
