"""Step splitting, the PRM input layout and its score read-out, on token ids (pure-algorithm.md
sections 1 and 2).

The one definition of steps, shared by the PRM service, PRM training and the learner (which
turns the spans into tensors in trainer/algo/steps.py). Pure: stdlib only, plain values in and
out, no I/O.

* A *separator* is every vocabulary id whose decoded text ends with "\\n\\n".
* Step ends are the separator tokens of the response plus its last token. A response with no
  separator is one step; an empty response has no steps. Each step's last token is its *end
  token*; the step's other tokens are its *content*.

Worked example (S = a separator id, E = EOS, n = the "\\n" id, prompt = [p0, p1]):

    response        [a, b, S, c, E]
    split_steps     [(0, 3), (3, 5)]           step 1 = a b S, step 2 = c E
    prm_input       [p0, p1, a, b, n, c, n]    end tokens S and E replaced by "\\n"
    readout         [4, 6]                     the positions of the inserted "\\n" tokens

A PRM *layout* (`StepLayout`) says which token follows each step (`step_tag`, "\\n" above) and
how the score is read from the logits there (`readout`):

* PURE's PRM (PURE-PRM-7B, a Qwen2.5-Math-7B token classifier): step_tag "\\n", readout
  `difference`, r = softmax(z)_1 - softmax(z)_0 = tanh((z1 - z0) / 2).
* Qwen2.5-Math-PRM: a dedicated tag token after each step ("<extra_0>"), readout `positive`, the
  probability of the positive class p mapped to [-1, 1] as 2p - 1. For a two-label head this is
  the same number as `difference` (p1 - p0 = 2 p1 - 1); it differs for a head with one logit
  (p = sigmoid(z)) or more than two labels (p = softmax(z)_1).

PRM training writes its layout into the model directory (LAYOUT_FILE, `StepLayout.to_json`);
the PRM service reads it from there unless its settings name one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

STEP_SEPARATOR = "\n\n"
DEFAULT_STEP_TAG = "\n"
LAYOUT_FILE = "puremesh_prm_layout.json"

Span = tuple[int, int]


def separator_ids(
    vocabulary: Mapping[int, str] | Mapping[str, int] | Sequence[str], suffix: str = STEP_SEPARATOR
) -> frozenset[int]:
    """Every token id whose *decoded* text ends with `suffix` (default "\\n\\n").

    `vocabulary` is one of: a mapping id -> decoded text; a mapping decoded text -> id; a
    sequence of decoded texts indexed by id. The texts must be decoded text (what
    `tokenizer.decode([id])` returns), not a byte-level BPE's raw symbols such as "ĊĊ".
    Compute this once per tokenizer.
    """
    pairs: list[tuple[int, str]] = []
    if isinstance(vocabulary, Mapping):
        for key, value in vocabulary.items():
            token, text = (key, value) if isinstance(key, int) else (value, key)
            pairs.append((int(token), str(text)))
    else:
        pairs = list(enumerate(vocabulary))
    return frozenset(token for token, text in pairs if text.endswith(suffix))


def split_steps(response_ids: Sequence[int], separator_ids: Iterable[int]) -> list[Span]:
    """The steps of a response as half-open token spans [start, end), end token included.

    Every separator token ends a step, and the last token ends the final step (whatever it is:
    EOS, a separator, or a plain token of a truncated response). The spans tile the response in
    order: the first starts at 0, each starts where the previous ended, the last ends at
    len(response_ids). No separator -> one step [(0, len)]; empty response -> [].

        [a, b, S, c, E] -> [(0, 3), (3, 5)]      [a, S] -> [(0, 2)]      [a, b] -> [(0, 2)]
        [S, S] -> [(0, 1), (1, 2)]               [a, S, E] -> [(0, 2), (2, 3)]
    """
    separators = frozenset(separator_ids)
    spans: list[Span] = []
    start = 0
    for position, token in enumerate(response_ids):
        if token in separators:
            spans.append((start, position + 1))
            start = position + 1
    if start < len(response_ids):
        spans.append((start, len(response_ids)))
    return spans


def prm_input(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    spans: Sequence[Span],
    step_tag_id: int,
    drop_ids: Iterable[int],
) -> tuple[list[int], list[int]]:
    """The PRM's input ids and the positions at which its step scores are read.

    `spans` are the steps of `response_ids` as returned by `split_steps` (they must tile the
    response; ValueError otherwise). `drop_ids` are the ids that are dropped when they end the
    final step: pass the separator ids plus EOS.

    The input is `prompt_ids` followed, for each step k, by the step's content tokens and then one
    `step_tag_id` token (the layout's step tag: "\\n" by default), where:
      * a non-final step's end token (always a separator) is dropped;
      * the final step's end token is dropped iff it is in `drop_ids` (a separator or EOS);
        otherwise (a response truncated mid-step) it is kept as content.
    So every step contributes exactly one "\\n", possibly right after the previous one when the
    step has no content (e.g. a lone EOS after a separator).

    Returns (input_ids, readout_positions): readout_positions[k] is the index in input_ids of
    the tag inserted after step k, len(readout_positions) == len(spans). Empty spans -> the
    prompt alone and no positions.
    """
    check_spans(spans, len(response_ids))
    drop = frozenset(drop_ids)
    input_ids = list(prompt_ids)
    positions: list[int] = []
    last = len(spans) - 1
    for k, (start, end) in enumerate(spans):
        keep_end = k == last and response_ids[end - 1] not in drop
        input_ids.extend(response_ids[start : end if keep_end else end - 1])
        positions.append(len(input_ids))
        input_ids.append(step_tag_id)
    return input_ids, positions


def check_spans(spans: Sequence[Span], length: int) -> None:
    """ValueError unless `spans` are non-empty half-open spans tiling [0, length) in order."""
    expected_start = 0
    for start, end in spans:
        if start != expected_start or end <= start:
            raise ValueError(f"steps must tile the response in order; got {list(spans)} for {length} tokens")
        expected_start = end
    if expected_start != length:
        raise ValueError(f"steps must cover the response; got {list(spans)} for {length} tokens")


# --- PRM layouts -------------------------------------------------------------------------------


class Readout(StrEnum):
    """How a step's score in [-1, 1] is read from the PRM's logits z at the step tag."""

    DIFFERENCE = "difference"  # softmax(z)_1 - softmax(z)_0; a two-label head only
    POSITIVE = "positive"  # 2p - 1, p = softmax(z)_1 (>= 2 labels) or sigmoid(z) (one logit)


@dataclass(frozen=True)
class StepLayout:
    """The token placed after each step (its text must be one token of the PRM's tokenizer) and
    the read-out of the logits there. The default is PURE's PRM layout."""

    step_tag: str = DEFAULT_STEP_TAG
    readout: Readout = Readout.DIFFERENCE

    def to_json(self) -> str:
        return json.dumps({"step_tag": self.step_tag, "readout": str(self.readout)}) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "layout") -> StepLayout:
        """The layout `to_json` wrote; ValueError naming `where` if the text is not one."""
        try:
            data = json.loads(text)
            layout = cls(step_tag=data["step_tag"], readout=Readout(data["readout"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{where}: not a PRM layout ({error})") from error
        if not isinstance(layout.step_tag, str) or not layout.step_tag:
            raise ValueError(f"{where}: step_tag must be a non-empty string")
        return layout


def check_readout(readout: Readout, num_labels: int) -> None:
    """ValueError unless a head of `num_labels` outputs can be read with `readout`."""
    if readout is Readout.DIFFERENCE and num_labels != 2:
        raise ValueError(f"readout 'difference' needs a PRM with 2 labels, this one has {num_labels}")
    if num_labels < 1:
        raise ValueError("a PRM needs at least one output")


def read_score(logits: Sequence[float], readout: Readout) -> float:
    """The step score in [-1, 1] from the logits at one step tag (see `Readout`)."""
    if readout is Readout.DIFFERENCE:
        z0, z1 = logits
        return math.tanh((z1 - z0) / 2)
    if len(logits) == 1:
        return math.tanh(logits[0] / 2)  # 2 sigmoid(z) - 1
    top = max(logits)
    weights = [math.exp(z - top) for z in logits]
    return 2 * weights[1] / sum(weights) - 1
