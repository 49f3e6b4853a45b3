"""The identity of a tokenizer, as the PRM service reports it and the learner checks it.

Two tokenizers agree when their fingerprints are equal: the same vocabulary (every token's text
and id, added tokens included), the same special tokens, and the same step separator ids
(contract/steps.py `separator_ids`). Then the policy's token ids mean the same to the PRM and
are sent as they are; otherwise the learner sends step texts (prm.proto, ScoreItem
response_steps) and the PRM tokenises them itself. Pure: stdlib only, plain values in and out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

FINGERPRINT_PREFIX = "sha256:"


def tokenizer_fingerprint(
    vocabulary: Mapping[str, int], special_tokens: Mapping[str, int], separator_ids: Iterable[int]
) -> str:
    """ "sha256:<hex>" over the vocabulary (token -> id, as `get_vocab()` gives it), the special
    tokens (token -> id) and the separator ids, each in a canonical order."""
    document = json.dumps(
        {
            "vocabulary": sorted((str(token), int(i)) for token, i in vocabulary.items()),
            "special": sorted((str(token), int(i)) for token, i in special_tokens.items()),
            "separators": sorted({int(i) for i in separator_ids}),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return FINGERPRINT_PREFIX + hashlib.sha256(document.encode()).hexdigest()
