"""Qwen2's real vocabulary (151,643 BPE ranks and 22 special tokens, tests/qwen2.py) through the
step path: separators that real vocabularies merge into other tokens (".\\n\\n" 382, ":\\n\\n" 1447,
"\\n\\n\\n" 1406 besides "\\n\\n" 271), step splitting, the PRM input layout and its read-out on a
tiny PRM with the full 151,665-row embedding, the credit path, and one learner step of a tiny
random Qwen2 policy with the full output layer, whose log-prob passes stay within the
micro-batch token budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import qwen2
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForTokenClassification

from puremesh.contract import steps as layout
from puremesh.contract.sampling import FinishReason, Sample
from puremesh.contract.verdict import Verdict
from puremesh.services.prm.scorer import PrmScorer
from puremesh.tinyworld.models import build_policy, model_shape
from puremesh.trainer.collector import ScoredGroup
from puremesh.trainer.controller import build_trainable
from puremesh.trainer.data import Problem
from puremesh.trainer.ranks import start_ranks
from puremesh.trainer.settings import LearnerSettings
from puremesh.trainer.sharding import gather_weights
from puremesh.trainer.update import UpdateSettings, assign_credit, build_experience, ppo_update

VOCAB = 151_665  # 151,643 ranks + 22 special tokens
NEWLINE, SEP, DOT_SEP, COLON_SEP, TRIPLE = 198, 271, 382, 1447, 1406
PROMPT = "Tom has 3 apples and buys 4 more. How many apples does he have?\n"
STEPS = [
    "Step 1: 3 + 4 = 7.\n\n",
    "Step 2: he has 7 apples:\n\n",
    "Step 3: so 7\n\n\n",
    "The answer is \\boxed{7}",
]
SHAPE = model_shape(32, 1)  # narrow and shallow; the embedding and output layer keep the full vocabulary


@pytest.fixture(scope="module")
def qwen_dir(request) -> Path:
    return qwen2.cached_dir(request.config)


@pytest.fixture(scope="module")
def tokenizer(qwen_dir):
    return AutoTokenizer.from_pretrained(str(qwen_dir), local_files_only=True)


@pytest.fixture(scope="module")
def response(tokenizer) -> list[int]:
    return [*tokenizer("".join(STEPS))["input_ids"], tokenizer.eos_token_id]


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory, tokenizer) -> Path:
    """A random tiny Qwen2ForTokenClassification PRM (2 labels) over the full vocabulary."""
    out = tmp_path_factory.mktemp("qwen2-prm")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), max_position_embeddings=512, num_labels=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, use_sliding_window=False, **SHAPE,
    )  # fmt: skip
    Qwen2ForTokenClassification(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def scorer(prm_dir) -> PrmScorer:
    return PrmScorer(prm_dir)


def test_the_vocabulary_merges_separators_into_other_tokens(tokenizer) -> None:
    assert len(tokenizer) == VOCAB and tokenizer.eos_token_id == 151_643
    encode = {
        text: tokenizer.encode(text, add_special_tokens=False)
        for text in ("\n", "\n\n", ".\n\n", ":\n\n", "\n\n\n")
    }
    assert encode == {
        "\n": [NEWLINE],
        "\n\n": [SEP],
        ".\n\n": [DOT_SEP],
        ":\n\n": [COLON_SEP],
        "\n\n\n": [TRIPLE],
    }


def test_separator_ids_of_the_real_vocabulary(tokenizer, scorer) -> None:
    separators = scorer.separator_ids
    assert {SEP, DOT_SEP, COLON_SEP, TRIPLE} <= separators and NEWLINE not in separators
    assert all(tokenizer.decode([i]).endswith("\n\n") for i in separators)
    assert len(separators) > 100  # merged forms are the rule in a real vocabulary, not the exception


def test_steps_end_at_merged_separators(tokenizer, scorer, response) -> None:
    spans = layout.split_steps(response, scorer.separator_ids)
    assert [response[end - 1] for _, end in spans] == [DOT_SEP, COLON_SEP, TRIPLE, tokenizer.eos_token_id]
    texts = [tokenizer.decode(response[a:b], skip_special_tokens=True) for a, b in spans]
    assert texts == STEPS


def test_the_prm_layout_and_read_out_at_the_full_vocabulary(tokenizer, scorer, response) -> None:
    prompt = tokenizer(PROMPT)["input_ids"]
    spans, input_ids, positions = scorer.prepare(prompt, response)
    assert scorer.vocab_size == VOCAB and scorer.newline_id == NEWLINE
    # Each step's end token (a merged separator, and the final EOS) is replaced by one "\n":
    # the layout of pure-algorithm.md section 2, on token ids (the merged "." goes with it).
    expected = list(prompt)
    for start, end in spans:
        expected += [*response[start : end - 1], NEWLINE]
    assert input_ids == expected and [input_ids[p] for p in positions] == [NEWLINE] * 4
    assert tokenizer.decode(input_ids[len(prompt) :]) == (
        "Step 1: 3 + 4 = 7\nStep 2: he has 7 apples\nStep 3: so 7\nThe answer is \\boxed{7}\n"
    )
    [scores] = scorer.score([(input_ids, positions)])
    with torch.no_grad():
        z = scorer.model(input_ids=torch.tensor([input_ids])).logits[0, positions].float()
    assert scores == pytest.approx(torch.tanh((z[:, 1] - z[:, 0]) / 2).tolist(), abs=1e-5)
    assert scores == pytest.approx([layout.read_score(row, layout.Readout.DIFFERENCE) for row in z.tolist()])


def group(tokenizer, scorer, responses: list[list[int]]) -> ScoredGroup:
    prompt = tokenizer(PROMPT)["input_ids"]
    scored = scorer.score_responses([(prompt, r) for r in responses])
    samples = [
        Sample(i, r, [-1.0] * len(r), FinishReason.STOP, 0, len(prompt), tokenizer.decode(r), "")
        for i, r in enumerate(responses)
    ]
    return ScoredGroup(Problem(PROMPT, "7"), prompt, samples, scored, [Verdict.CORRECT, Verdict.INCORRECT])


def test_the_credit_path_puts_step_rewards_at_the_merged_separators(tokenizer, scorer, response) -> None:
    other = [
        *tokenizer("Step 1: 3 + 4 = 8:\n\nThe answer is \\boxed{8}")["input_ids"],
        tokenizer.eos_token_id,
    ]
    experience = build_experience([group(tokenizer, scorer, [response, other])], tokenizer.pad_token_id, 0)
    ends = experience.step_end_mask
    assert experience.sequences.response_ids[0][ends[0]].tolist() == [DOT_SEP, COLON_SEP, TRIPLE, 151_643]
    assert experience.sequences.response_ids[1][ends[1]].tolist() == [COLON_SEP, 151_643]
    settings = LearnerSettings(policy_path="p", train_path="t", algo={"normalize": False})
    credit = assign_credit(experience, torch.zeros(ends.shape), settings.algo)
    for row, spans in enumerate(layout.split_steps(r, scorer.separator_ids) for r in (response, other)):
        # every step's tokens together carry that step's reward (rt_k, pure-algorithm.md 4)
        sums = [float(credit.token_rewards[row, a:b].sum()) for a, b in spans]
        assert sums == pytest.approx(credit.step_rewards[row, : len(spans)].tolist(), abs=1e-5)


def test_one_learner_step_at_the_full_vocabulary(tmp_path, tokenizer, scorer, response) -> None:
    policy = tmp_path / "qwen2-policy"
    build_policy(policy, tokenizer, seed=0, max_position_embeddings=512, tie_word_embeddings=False, **SHAPE)
    budget = 80  # the two short rows share a pass, each long one runs alone
    config = LearnerSettings(
        policy_path=str(policy), train_path="t", out_dir=str(tmp_path / "out"),
        optim={"lr": 1e-3, "minibatches": 1}, memory={"micro_batch_tokens": budget},
    )  # fmt: skip
    ranks = start_ranks(config.distributed, "cpu")
    try:
        trainable = build_trainable(config, ranks)
        logits: list[tuple[int, ...]] = []
        trainable.model.lm_head.register_forward_hook(lambda m, a, out: logits.append(tuple(out.shape)))
        short = [*tokenizer("Step 1: 3 + 4 = 8:\n\nSo \\boxed{8}")["input_ids"], tokenizer.eos_token_id]
        groups = [group(tokenizer, scorer, [response, short]) for _ in range(2)]
        experience = build_experience(groups, tokenizer.pad_token_id, 0)
        before = {k: v.clone() for k, v in gather_weights(trainable.model, torch.float32, ranks)}
        update = UpdateSettings(config.algo, config.optim, config.memory)
        stats = ppo_update(
            trainable.model,
            trainable.reference,
            trainable.optimizer,
            experience,
            update,
            trainable.generator,
            ranks,
        )
        after = dict(gather_weights(trainable.model, torch.float32, ranks))
    finally:
        ranks.close()
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values() if isinstance(v, float) and v == v)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert after["lm_head.weight"].shape == (VOCAB, 32)
    assert float((after["lm_head.weight"] - before["lm_head.weight"]).abs().max()) > 0
    # The old log-prob pass and the update's forward passes ran in micro-batches of at most the
    # token budget (rows x padded length), so no pass held logits for more than `budget` tokens
    # x 151,665 entries: the 4 rows went in 3 passes each, the two short ones together.
    lengths = experience.sequences.lengths.tolist()
    assert max(lengths) <= budget < sum(lengths)
    assert all(shape[-1] == VOCAB and shape[0] * shape[1] <= budget for shape in logits)
    assert sorted(shape[0] for shape in logits) == [1, 1, 1, 1, 2, 2]
