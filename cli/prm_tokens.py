"""Tokenizer agreement between the policy and the PRM, checked once at the learner's start.

The PRM service reports its tokenizer's fingerprint (prm.proto DescribeTokenizer;
contract/tokenizer.py). Equal to the policy's: the learner sends token ids, as always. Different:
the PRM's ids would mean other text, so the learner splits each response into steps itself
(contract/steps.py, on the policy's ids), sends the prompt as text and the steps as texts
(ScoreItem.response_steps), and keeps its own spans for the scores that come back, one per step.
A mismatch is logged once (warning) and shows on puremesh_learner_prm_tokenizer_mismatch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import Gauge

from puremesh.contract.steps import Span, separator_ids, split_steps
from puremesh.contract.tokenizer import tokenizer_fingerprint

log = logging.getLogger(__name__)
TOKENIZER_MISMATCH = Gauge(
    "puremesh_learner_prm_tokenizer_mismatch",
    "1 when the PRM's tokenizer differs from the policy's (step texts are sent), 0 when they agree",
)


class PolicySteps:
    """The policy tokenizer's side of the check: its fingerprint, and the texts of a prompt and
    of a response's steps for a PRM with another tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        texts = tokenizer.batch_decode(
            [[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False
        )
        self.separator_ids = separator_ids(texts)
        special = dict(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True))
        self.fingerprint = tokenizer_fingerprint(tokenizer.get_vocab(), special, self.separator_ids)

    def prompt_text(self, prompt_ids: Sequence[int]) -> str:
        """The prompt as the policy saw it (special tokens such as a chat template's kept)."""
        return self.tokenizer.decode(
            list(prompt_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def steps(self, response_ids: Sequence[int]) -> tuple[list[Span], list[str]]:
        """The response's steps on the policy's ids and their texts (special tokens such as EOS
        left out; a step of only EOS is an empty text, which the PRM scores as a step with no
        content)."""
        spans = split_steps(response_ids, self.separator_ids)
        texts = self.tokenizer.batch_decode(
            [list(response_ids[start:end]) for start, end in spans],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )
        return spans, texts


def agree(policy: PolicySteps, prm_fingerprint: str, prm_target: str) -> bool:
    """Whether the PRM's tokenizer is the policy's; a mismatch is logged once and set on the
    metric, as is agreement (0)."""
    same = policy.fingerprint == prm_fingerprint
    TOKENIZER_MISMATCH.set(0 if same else 1)
    if same:
        log.info(
            "the PRM at %s shares the policy's tokenizer (%s): token ids are sent",
            prm_target,
            prm_fingerprint,
        )
    else:
        log.warning(
            "the PRM at %s has another tokenizer (%s) than the policy (%s): responses are sent as step "
            "texts and tokenised by the PRM",
            prm_target,
            prm_fingerprint,
            policy.fingerprint,
        )
    return same
