"""The trainable policy: loading, per-token log-probabilities of responses, named weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_policy(path: str | Path, device: str = "cpu", dtype: str = "float32", trainable: bool = True):
    """(model, tokenizer) from a LOCAL directory (no downloads)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, dtype=getattr(torch, dtype)
    )
    model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model, tokenizer


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

    def to(self, device: str | torch.device) -> SequenceBatch:
        return SequenceBatch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.response_ids,
                    self.response_mask,
                    self.positions,
                )
            )
        )

    def rows(self, index: torch.Tensor) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids[index],
            self.attention_mask[index],
            self.response_ids[index],
            self.response_mask[index],
            self.positions[index],
        )


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


def response_logprobs(model, batch: SequenceBatch, chunk_rows: int = 64) -> torch.Tensor:
    """log pi(response token | prefix) for every response token: [B, L] (0 on padding).

    Runs in row chunks to bound the [rows, T, vocab] logits; keeps the graph when grad is on.
    """
    pieces = []
    for start in range(0, batch.input_ids.shape[0], chunk_rows):
        part = batch.rows(torch.arange(start, min(start + chunk_rows, batch.input_ids.shape[0])))
        logits = model(input_ids=part.input_ids, attention_mask=part.attention_mask).logits
        picked = logits.gather(1, part.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        logp = (
            torch.log_softmax(picked.float(), dim=-1).gather(-1, part.response_ids.unsqueeze(-1)).squeeze(-1)
        )
        pieces.append(logp.masked_fill(~part.response_mask, 0.0))
    return torch.cat(pieces)


def named_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The policy's weights under their checkpoint names, as rollout engines load them."""
    return [(name, parameter.detach()) for name, parameter in model.named_parameters()]
