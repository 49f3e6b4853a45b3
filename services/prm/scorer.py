"""The PRM scorer adapter: the only module of the PRM service that touches model weights.

It loads a token-classification PRM (Qwen2-style; label 1 = "step is correct") and its tokenizer
from a local directory and runs forward passes. Its layout (the step tag after each step, the
read-out of the logits there, e.g. r = softmax(z)_1 - softmax(z)_0 = tanh((z1 - z0) / 2) for
PURE's PRM) comes from the settings, else from the model directory's layout file, else the
default; layouts, input layout and step splitting are contract/steps.py's, the tokenizer's
fingerprint contract/tokenizer.py's; dynamic batching lives in batcher.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from puremesh.contract import steps as layout
from puremesh.contract.tokenizer import tokenizer_fingerprint

# (input_ids, readout_positions): one row of a forward pass, as built by layout.prm_input.
ScoreItem = tuple[Sequence[int], Sequence[int]]

DEFAULT_MAX_TOKENS_PER_FORWARD = 16384
log = logging.getLogger(__name__)


def model_layout(
    model_dir: str | Path, step_tag: str | None, readout: layout.Readout | None
) -> layout.StepLayout:
    """The layout to serve: `step_tag` and `readout` where given, else the model directory's
    layout file (written by PRM training), else the default (PURE's PRM)."""
    path = Path(model_dir) / layout.LAYOUT_FILE
    found = (
        layout.StepLayout.from_json(path.read_text(), str(path)) if path.is_file() else layout.StepLayout()
    )
    chosen = layout.StepLayout(step_tag if step_tag is not None else found.step_tag, readout or found.readout)
    if path.is_file() and chosen != found:
        log.warning(
            "serving the PRM with layout %s, not the %s it was trained with (%s)", chosen, found, path
        )
    return chosen


def padded_tokens(lengths: Sequence[int]) -> int:
    """The cost of one right-padded batch: rows * longest row."""
    return len(lengths) * max(lengths, default=0)


class PrmScorer:
    """A token-classification PRM loaded from a LOCAL directory (no downloads).

    Args:
        model_dir: directory with the PRM (config, weights) and its tokenizer.
        device: torch device the model runs on ("cpu", "cuda", "cuda:1", ...).
        dtype: model dtype ("float32", "bfloat16", "float16" or a torch.dtype). Logits are
            converted to float32 before the read-out.
        max_tokens_per_forward: cap on the padded size (rows * longest row) of one forward pass;
            `score` splits larger batches into several passes. A single row longer than the cap
            still runs, alone.
        step_tag, readout: the layout (contract/steps.py StepLayout); None = the model
            directory's layout file, else the default.

    Thread safety: `score` may be called from a worker thread, one call at a time.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_tokens_per_forward: int = DEFAULT_MAX_TOKENS_PER_FORWARD,
        step_tag: str | None = None,
        readout: layout.Readout | None = None,
    ) -> None:
        if max_tokens_per_forward < 1:
            raise ValueError(f"max_tokens_per_forward must be >= 1, got {max_tokens_per_forward}")
        self.model_dir = str(model_dir)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        self.max_tokens_per_forward = max_tokens_per_forward

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModelForTokenClassification.from_pretrained(
            self.model_dir, local_files_only=True, dtype=self.dtype
        )
        self.model.to(self.device).eval()
        self.layout = model_layout(self.model_dir, step_tag, readout)
        layout.check_readout(self.layout.readout, self.model.config.num_labels)
        tag = self.tokenize(self.layout.step_tag)
        if len(tag) != 1:
            raise ValueError(
                f"the PRM tokenizer must encode the step tag {self.layout.step_tag!r} as one token, got {tag}"
            )
        self._newline_id = tag[0]
        self._eos_id: int | None = self.tokenizer.eos_token_id
        self.vocab_size: int = self.model.get_input_embeddings().num_embeddings
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length: int | None = int(limit) if limit else None
        texts = self.tokenizer.batch_decode(
            [[i] for i in range(len(self.tokenizer))], clean_up_tokenization_spaces=False
        )
        self._separator_ids = layout.separator_ids(texts)
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else (self._eos_id if self._eos_id is not None else 0)
        drop = set(self._separator_ids)
        if self._eos_id is not None:
            drop.add(self._eos_id)
        self._drop_ids = frozenset(drop)
        special = dict(zip(self.tokenizer.all_special_tokens, self.tokenizer.all_special_ids, strict=True))
        self.fingerprint = tokenizer_fingerprint(self.tokenizer.get_vocab(), special, self._separator_ids)

    # --- tokenizer facts ------------------------------------------------------------------

    @property
    def newline_id(self) -> int:
        """The id of the step tag ("\\n" by default): inserted after every step, read there."""
        return self._newline_id

    @property
    def eos_id(self) -> int | None:
        """The tokenizer's EOS id (dropped when it ends a response), or None."""
        return self._eos_id

    @property
    def separator_ids(self) -> frozenset[int]:
        """Every id whose decoded text ends with "\\n\\n" (computed once, at load)."""
        return self._separator_ids

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # --- layout ---------------------------------------------------------------------------

    def prepare(
        self,
        prompt_ids: Sequence[int],
        response_ids: Sequence[int],
        spans: Sequence[layout.Span] | None = None,
    ) -> tuple[list[layout.Span], list[int], list[int]]:
        """(spans, input_ids, readout_positions) of one (prompt, response) pair; see contract/steps.py.

        `spans` None: split the response at the separators; else the given steps (`step_ids`).
        An empty response gives ([], prompt, []): nothing to score.
        """
        spans = layout.split_steps(response_ids, self._separator_ids) if spans is None else list(spans)
        input_ids, positions = layout.prm_input(
            prompt_ids, response_ids, spans, self._newline_id, self._drop_ids
        )
        return spans, input_ids, positions

    def step_ids(self, step_texts: Sequence[str]) -> tuple[list[int], list[layout.Span]]:
        """The response of a client that sent step texts (its tokenizer differs from the PRM's):
        each step tokenised alone with the PRM's tokenizer, the ids concatenated, one span per
        step. An empty text is a step with no content (a lone EOS, which the layout drops);
        ValueError for one when the tokenizer has no EOS."""
        ids: list[int] = []
        spans: list[layout.Span] = []
        for k, text in enumerate(step_texts):
            tokens = self.tokenize(text) or ([self._eos_id] if self._eos_id is not None else [])
            if not tokens:
                raise ValueError(f"step {k} is empty")
            spans.append((len(ids), len(ids) + len(tokens)))
            ids.extend(tokens)
        return ids, spans

    def check_item(self, input_ids: Sequence[int], positions: Sequence[int]) -> None:
        """ValueError if one forward row is malformed: empty, longer than the model's context,
        a token id outside the vocabulary, or a read-out position outside the row."""
        if not input_ids:
            raise ValueError("empty input")
        if self.max_length is not None and len(input_ids) > self.max_length:
            raise ValueError(f"input of {len(input_ids)} tokens exceeds the PRM context of {self.max_length}")
        low, high = min(input_ids), max(input_ids)
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} outside the PRM vocabulary [0, {self.vocab_size})")
        if positions and (min(positions) < 0 or max(positions) >= len(input_ids)):
            raise ValueError(f"read-out positions must lie in [0, {len(input_ids)})")

    # --- forward --------------------------------------------------------------------------

    def score(self, batch: Sequence[ScoreItem]) -> list[list[float]]:
        """Scores at the read-out positions of each (input_ids, readout_positions) item.

        Rows are right-padded into one batch with an attention mask and run in one forward pass
        (several when the padded size exceeds max_tokens_per_forward). Result k holds one score
        in [-1, 1] per position of item k. ValueError (before any forward pass) if an item is
        malformed (see check_item).
        """
        for input_ids, positions in batch:
            self.check_item(input_ids, positions)
        results: list[list[float]] = [[] for _ in batch]
        # Longest first, so that each pass packs rows of similar length.
        order = sorted(range(len(batch)), key=lambda i: len(batch[i][0]), reverse=True)
        for chunk in self._chunks(order, [len(item[0]) for item in batch]):
            for index, scores in zip(chunk, self._forward([batch[i] for i in chunk]), strict=True):
                results[index] = scores
        return results

    def score_responses(
        self, items: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[list[layout.Span], list[float]]]:
        """Split and score (prompt_ids, response_ids) pairs: (spans, one score per step) each.

        Empty responses get ([], []) and no forward row.
        """
        prepared = [self.prepare(prompt, response) for prompt, response in items]
        rows = [(input_ids, positions) for spans, input_ids, positions in prepared if spans]
        scored = iter(self.score(rows))
        return [(spans, next(scored) if spans else []) for spans, _, _ in prepared]

    def _chunks(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        chunks: list[list[int]] = []
        current: list[int] = []
        for index in order:
            if (
                current
                and padded_tokens([lengths[i] for i in [*current, index]]) > self.max_tokens_per_forward
            ):
                chunks.append(current)
                current = []
            current.append(index)
        if current:
            chunks.append(current)
        return chunks

    @torch.inference_mode()
    def _forward(self, rows: Sequence[ScoreItem]) -> list[list[float]]:
        width = max(len(input_ids) for input_ids, _ in rows)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        row_index: list[int] = []
        position_index: list[int] = []
        for r, (ids, positions) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[r, : len(ids)] = 1
            row_index.extend([r] * len(positions))
            position_index.extend(positions)
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        ).logits
        rows_at = torch.as_tensor(row_index, dtype=torch.long, device=logits.device)
        positions_at = torch.as_tensor(position_index, dtype=torch.long, device=logits.device)
        z = logits[rows_at, positions_at].float().cpu().tolist()  # [N, labels]
        flat = [layout.read_score(row, self.layout.readout) for row in z]
        out: list[list[float]] = []
        offset = 0
        for _, positions in rows:
            out.append(flat[offset : offset + len(positions)])
            offset += len(positions)
        if not all(math.isfinite(s) for s in flat):
            raise FloatingPointError("the PRM produced a non-finite score")
        return out
