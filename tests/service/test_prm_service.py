"""PrmService: a real server on port 0 with the tiny PRM, called over a real channel."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import grpc
import pytest

from puremesh.common.v1 import common_pb2
from puremesh.prm.v1 import prm_pb2, prm_pb2_grpc
from puremesh.rpc.client import RpcError
from puremesh.rpc.server import ServiceHost
from puremesh.services.prm.app import prm_service
from puremesh.services.prm.client import PrmClient
from puremesh.services.prm.scorer import PrmScorer
from puremesh.services.prm.settings import PrmSettings

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
RESPONSE = "Step 1: 3 + 4 = 7\n\nStep 2: he has 7 apples\n\nThe answer is \\boxed{7}"


@pytest.fixture
async def prm_host(tiny_prm_dir):
    settings = PrmSettings(model_path=str(tiny_prm_dir), max_wait_ms=20, max_items=64)
    definition = prm_service(settings)
    host = ServiceHost([definition], settings.server)
    await host.start()
    host.servicer = definition.servicer
    yield host
    await host.drain(grace=1)


@pytest.fixture(scope="module")
def scorer(tiny_prm_dir):
    return PrmScorer(tiny_prm_dir)


async def test_text_and_token_inputs_match_direct_scoring(prm_host, scorer):
    prompt_ids, response_ids = scorer.tokenize(QUESTION), scorer.tokenize(RESPONSE)
    [(spans, expected)] = scorer.score_responses([(prompt_ids, response_ids)])
    async with PrmClient(prm_host.target) as client:
        by_text, by_ids, mixed = await client.score(
            [(QUESTION, RESPONSE), (prompt_ids, response_ids), (QUESTION, response_ids)]
        )
    assert len(by_text.steps) == 3 == len(spans)
    for result in (by_text, by_ids, mixed):
        assert result.error is None
        assert result.scores == pytest.approx(expected, abs=1e-5)
        assert [(s.token_start, s.token_end) for s in result.steps] == list(spans)
        assert all(-1 <= s <= 1 for s in result.scores)
    assert "".join(step.text for step in by_text.steps) == RESPONSE
    assert by_text.steps[0].text.endswith("\n\n")


async def test_bad_items_fail_alone(prm_host, scorer):
    items = [
        prm_pb2.ScoreItem(prompt_text=QUESTION, response_text=RESPONSE),
        prm_pb2.ScoreItem(response_text=RESPONSE),  # no prompt
        prm_pb2.ScoreItem(prompt_text=QUESTION, response_token_ids=common_pb2.TokenIds(ids=[1, 10**6])),
        prm_pb2.ScoreItem(prompt_text=QUESTION, response_text="x" * 300_000),
        prm_pb2.ScoreItem(prompt_text=QUESTION, response_token_ids=common_pb2.TokenIds(ids=[-5])),
        prm_pb2.ScoreItem(prompt_text=QUESTION, response_text=""),  # nothing to score: no steps
    ]
    async with grpc.aio.insecure_channel(prm_host.target) as channel:
        reply = await prm_pb2_grpc.PrmServiceStub(channel).ScoreSteps(
            prm_pb2.ScoreStepsRequest(items=items), timeout=30
        )
    ok, no_prompt, out_of_vocab, too_long, negative, empty = reply.results
    assert len(ok.steps) == 3 and not ok.HasField("error")
    for bad, words in (
        (no_prompt, "no prompt"),
        (out_of_vocab, "outside"),
        (too_long, "limit"),
        (negative, "-5"),
    ):
        assert bad.error.code == common_pb2.ERROR_CODE_INVALID_ARGUMENT
        assert words in bad.error.message
    assert not empty.HasField("error") and len(empty.steps) == 0


async def test_whole_call_errors(prm_host):
    async with PrmClient(prm_host.target) as client:
        assert await client.score([]) == []
        with pytest.raises(RpcError) as info:
            await client.score([(QUESTION, RESPONSE)] * 65)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_100_concurrent_calls_are_batched_with_identical_scores(prm_host, scorer):
    responses = [
        "\n\n".join(f"Step {k}: {i} + {k} = {i + k}" for k in range(1 + i % 4)) + f"\n\nAnswer \\boxed{{{i}}}"
        for i in range(100)
    ]
    alone = [
        scorer.score_responses([(scorer.tokenize(QUESTION), scorer.tokenize(r))])[0][1] for r in responses
    ]
    before = prm_host.servicer.batcher.forward_calls
    async with PrmClient(prm_host.target) as client:
        results = await asyncio.gather(*(client.score([(QUESTION, r)]) for r in responses))
    forward_calls = prm_host.servicer.batcher.forward_calls - before
    assert forward_calls <= 50, f"{forward_calls} forward passes for 100 concurrent calls"
    for (result,), expected in zip(results, alone, strict=True):
        assert result.scores == pytest.approx(expected, abs=1e-5)


async def test_metrics_cli_and_grpcurl(prm_host, run_cli, run_grpcurl):
    cli = await asyncio.to_thread(
        run_cli,
        "score",
        "--target",
        prm_host.target,
        "--question",
        QUESTION,
        "--response",
        RESPONSE,
        "--json",
    )
    assert cli.returncode == 0, cli.stderr
    steps = json.loads(cli.stdout)["steps"]
    assert len(steps) == 3 and all(-1 <= s["score"] <= 1 for s in steps) and "Step 1" in steps[0]["text"]
    table = await asyncio.to_thread(
        run_cli, "score", "--target", prm_host.target, "--question", QUESTION, "--response", RESPONSE
    )
    assert table.returncode == 0 and "score" in table.stdout.splitlines()[0]

    listed = await asyncio.to_thread(run_grpcurl, prm_host.target, "list")
    assert "puremesh.prm.v1.PrmService" in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()
    body = json.dumps({"items": [{"prompt_text": QUESTION, "response_text": RESPONSE}]})
    called = await asyncio.to_thread(
        run_grpcurl, "-d", body, prm_host.target, "puremesh.prm.v1.PrmService/ScoreSteps"
    )
    assert called.returncode == 0, called.stderr
    assert len(json.loads(called.stdout)["results"][0]["steps"]) == 3

    url = f"http://127.0.0.1:{prm_host.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert "puremesh_prm_batch_tokens_count" in text
    assert 'puremesh_service_batch_size_items_count{service="prm"}' in text


async def test_cli_reports_server_errors_in_one_line(run_cli):
    dead = await asyncio.to_thread(
        run_cli, "score", "--target", "127.0.0.1:1", "--question", "q", "--response", "r", "--timeout", "2"
    )
    assert dead.returncode == 1
    assert dead.stderr.strip().count("\n") == 0 and "UNAVAILABLE" in dead.stderr


def test_serve_prm_subprocess_drains_on_sigterm(served, tiny_prm_dir, run_grpcurl):
    server = served("prm", env={"PUREMESH_PRM__MODEL_PATH": str(tiny_prm_dir)})
    health = run_grpcurl(server.target, "grpc.health.v1.Health/Check")
    assert '"SERVING"' in health.stdout
    assert server.terminate() == 0


def test_serve_without_model_fails_clearly(run_cli):
    result = run_cli("serve", "prm", "--port", "0", "--metrics-port", "0", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "model_path is not set" in result.stderr.strip().splitlines()[-1]
