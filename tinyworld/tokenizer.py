"""The tiny world's tokenizer: a byte-level BPE trained locally (rule 8: no downloads).

Layout (what the services and the trainer rely on):
    "<|endoftext|>"  the only special token (id 0): eos and pad; also the models' bos id. The
                     tokenizer itself adds no special tokens when encoding.
    "\\n\\n"          ONE added token: the step separator (pure-algorithm.md section 1) is always a
                     single id, and it is the only id whose decoded text ends with "\\n\\n".
    "\\n"            its own token (the byte-level symbol); the PRM reads step scores at it.
No merged token contains a newline. Pre-tokenisation is Qwen2's (digits are single tokens).
`check_tokenizer` asserts this layout; the build is deterministic in its corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

from puremesh.contract.steps import STEP_SEPARATOR

from .corpus import NEWLINE, synthetic_corpus

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_VOCAB_SIZE = 768  # BPE target; the trained vocabulary may stop a little short of it
BPE_MIN_FREQUENCY = 2
MAX_POSITIONS = 1024  # the tokenizer's model_max_length and the models' context


def _train_bpe(corpus: Iterable[str] | None = None) -> Tokenizer:
    """A byte-level BPE with exactly the normaliser and pre-tokeniser of `Qwen2Tokenizer`.

    It is trained line by line, so that no merge contains a newline: every "\n" encodes to the
    byte-level newline token, and no id except the added "\n\n" decodes to text ending in "\n\n".
    `corpus` defaults to `synthetic_corpus()`.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=BPE_MIN_FREQUENCY,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = synthetic_corpus() if corpus is None else corpus
    lines = (line for text in texts for line in text.split(NEWLINE) if line)
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def build_tokenizer(out_dir: str | Path, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE, save it to `out_dir` (save_pretrained) and return it.

    `corpus` (texts; default `synthetic_corpus()`) is what the merges are learnt from: the
    bootstrap passes the task's own texts so that its prompts and solutions tokenise short.

    The result is a `Qwen2Tokenizer` (a `PreTrainedTokenizerFast`): `AutoTokenizer` picks that
    class for any directory whose config says qwen2 and rebuilds the pre-tokeniser from its own
    code, so the tokenizer is built that way from the start and every loader (transformers,
    vLLM) encodes identically.
    """
    model = json.loads(_train_bpe(corpus).to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    # Added tokens are matched before pre-tokenisation: "\n\n" always encodes to this one id.
    tokenizer.add_tokens([AddedToken(STEP_SEPARATOR, normalized=False, special=False)])
    check_tokenizer(tokenizer)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def check_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise AssertionError unless "\\n\\n" and "\\n" are single tokens as documented above."""
    ids = tokenizer.encode("a\n\nb", add_special_tokens=False)
    separators = [i for i in ids if tokenizer.decode([i]) == STEP_SEPARATOR]
    if len(separators) != 1 or len(ids) != 3:
        raise AssertionError(f'"a\\n\\nb" should encode to a, "\\n\\n", b; got {ids}')
    newline = tokenizer.encode(NEWLINE, add_special_tokens=False)
    if len(newline) != 1 or tokenizer.decode(newline) != NEWLINE:
        raise AssertionError(f'"\\n" should be one token; got {newline}')
