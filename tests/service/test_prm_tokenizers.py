"""Tokenizer agreement between the policy and the PRM (cli/prm_tokens.py, prm.proto
DescribeTokenizer and ScoreItem.response_steps), against a real PRM server on loopback: the same
tokenizer sends ids; another one (Qwen2's real vocabulary as the policy's) sends step texts, the
PRM tokenises them itself, and the learner keeps its own spans; the mismatch is logged once and
shows on the metric."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import qwen2
from prometheus_client import REGISTRY
from transformers import AutoTokenizer

from puremesh.cli.adapters import MeshScorer
from puremesh.cli.prm_tokens import PolicySteps
from puremesh.rpc.server import ServiceHost
from puremesh.services.prm.app import prm_service
from puremesh.services.prm.client import PrmClient, Steps
from puremesh.services.prm.scorer import PrmScorer
from puremesh.services.prm.settings import PrmSettings
from puremesh.trainer.data import format_prompt

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?\n"
# Under Qwen2's vocabulary the three steps end in the merged separators ".\n\n", ":\n\n", "\n\n\n".
RESPONSE = "Step 1: 3 + 4 = 7.\n\nStep 2: he has 7 apples:\n\nStep 3: 7\n\n\nThe answer is \\boxed{7}"
METRIC = "puremesh_learner_prm_tokenizer_mismatch"


@pytest.fixture
async def prm_host(tiny_prm_dir):
    settings = PrmSettings(model_path=str(tiny_prm_dir), max_wait_ms=5)
    definition = prm_service(settings)
    host = ServiceHost([definition], settings.server)
    await host.start()
    yield host
    await host.drain(grace=1)


@pytest.fixture(scope="module")
def scorer(tiny_prm_dir):
    return PrmScorer(tiny_prm_dir)


@pytest.fixture(scope="module")
def qwen_policy(request) -> PolicySteps:
    directory = qwen2.cached_dir(request.config)
    return PolicySteps(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))


async def test_the_prm_reports_its_tokenizer_and_layout(prm_host, scorer, tiny_tokenizer_dir):
    async with PrmClient(prm_host.target) as client:
        identity = await client.describe_tokenizer()
    policy = PolicySteps(AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True))
    assert identity.fingerprint == scorer.fingerprint == policy.fingerprint
    assert identity.fingerprint.startswith("sha256:") and len(identity.fingerprint) == 7 + 64
    assert (identity.vocab_size, identity.step_tag, identity.readout) == (
        scorer.vocab_size,
        "\n",
        "difference",
    )


async def test_a_shared_tokenizer_sends_token_ids(prm_host, scorer, tiny_tokenizer_dir, caplog):
    policy = PolicySteps(AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True))
    mesh = MeshScorer([prm_host.target], timeout=10)
    try:
        with caplog.at_level(logging.INFO, logger="puremesh.cli.prm_tokens"):
            assert await mesh.check_tokenizer(policy) is True
        assert mesh.texts is None and REGISTRY.get_sample_value(METRIC) == 0
        prompt, response = scorer.tokenize(QUESTION), [*scorer.tokenize(RESPONSE), scorer.eos_id]
        [scored] = await mesh.score(prompt, [response])
    finally:
        await mesh.pool.close()
    [(spans, expected)] = scorer.score_responses([(prompt, response)])
    assert scored.spans == spans and scored.scores == pytest.approx(expected, abs=1e-5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_another_tokenizer_sends_step_texts_and_keeps_the_policys_spans(
    prm_host, scorer, qwen_policy, caplog
):
    tokenizer = qwen_policy.tokenizer
    prompt = tokenizer(QUESTION)["input_ids"]
    responses = [
        [*tokenizer(RESPONSE)["input_ids"], tokenizer.eos_token_id],
        tokenizer("no separator at all")["input_ids"],  # one step, truncated
        [*tokenizer("7.\n\n")["input_ids"], tokenizer.eos_token_id],  # a final step of only EOS
    ]
    mesh = MeshScorer([prm_host.target], timeout=10)
    try:
        with caplog.at_level(logging.INFO, logger="puremesh.cli.prm_tokens"):
            assert await mesh.check_tokenizer(qwen_policy) is False
        assert REGISTRY.get_sample_value(METRIC) == 1
        scored = await mesh.score(prompt, responses)
    finally:
        await mesh.pool.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "another tokenizer" in warnings[0].getMessage()
    # The policy's own spans: the merged separators 382 ".\n\n", 1447 ":\n\n", 1406 "\n\n\n" end steps.
    ends = [responses[0][end - 1] for _, end in scored[0].spans]
    assert ends == [382, 1447, 1406, tokenizer.eos_token_id]
    assert [len(s.spans) for s in scored] == [4, 1, 2]
    # Each score is the PRM's on its own tokenisation of the step texts.
    for response, result in zip(responses, scored, strict=True):
        spans, texts = qwen_policy.steps(response)
        assert result.spans == spans and "".join(texts) == tokenizer.decode(
            response, skip_special_tokens=True
        )
        ids, given = scorer.step_ids(texts)
        _, input_ids, positions = scorer.prepare(scorer.tokenize(QUESTION), ids, given)
        [expected] = scorer.score([(input_ids, positions)])
        assert result.scores == pytest.approx(expected, abs=1e-5)


async def test_step_texts_on_the_wire(prm_host, scorer):
    steps = ("3 + 4 = 7\n\n", "he has 7 apples\n\n", "")  # the empty text: a step of only EOS
    async with PrmClient(prm_host.target) as client:
        [by_steps, by_text] = await client.score(
            [(QUESTION, Steps(steps)), (QUESTION, "3 + 4 = 7\n\nhe has 7 apples\n\n")]
        )
    assert by_steps.error is None and len(by_steps.steps) == 3
    assert [s.text for s in by_steps.steps[:2]] == list(steps[:2])
    # The first two steps read the same scores as the same text split by the PRM itself.
    assert by_steps.scores[:2] == pytest.approx(by_text.scores[:2], abs=1e-5)


async def test_the_score_client_renders_its_question_with_a_template(prm_host, scorer, run_cli):
    cli = await asyncio.to_thread(
        run_cli, "score", "--target", prm_host.target, "--question", "What is 3 + 4?",
        "--response", "3 + 4 = 7\n\nso 7", "--template", "tinyworld", "--json",
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    scores = [step["score"] for step in json.loads(cli.stdout)["steps"]]
    prompt = scorer.tokenize(format_prompt("What is 3 + 4?"))
    [(_, expected)] = scorer.score_responses([(prompt, scorer.tokenize("3 + 4 = 7\n\nso 7"))])
    assert scores == pytest.approx(expected, abs=1e-5)
