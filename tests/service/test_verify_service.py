"""VerifyService: a real server on port 0 with a real grading pool, called over a real channel."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import grpc
import pytest

from puremesh.common.v1 import common_pb2
from puremesh.contract.verdict import Verdict
from puremesh.rpc.client import RpcError
from puremesh.rpc.server import ServiceHost
from puremesh.services.verify.app import verify_service
from puremesh.services.verify.client import VerifyClient
from puremesh.services.verify.settings import VerifySettings
from puremesh.verify.v1 import verify_pb2, verify_pb2_grpc

HANGS = r"So the result is \boxed{9^{9^{9^{9^{9}}}}}"  # sympy evaluates the power tower exactly


@pytest.fixture
async def verify_host():
    settings = VerifySettings(workers=2, item_timeout_seconds=1.5, max_items=16, max_response_chars=5000)
    host = ServiceHost([verify_service(settings)], settings.server)
    await host.start()
    yield host
    await host.drain(grace=1)


async def test_mixed_batch_gets_a_verdict_per_item(verify_host):
    items = [
        ("Step 1: 3 + 4 = 7\n\nThe answer is \\boxed{7}", "7"),
        ("Half of it: \\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{(x+1)^2}", "x^2+2x+1"),
        ("I think it is \\boxed{8}", "7"),
        ("I am not sure.", "7"),
        ("\\boxed{7}", None),
        ("\\boxed{7}", "null"),
        (HANGS, "1"),
        ("x" * 6000, "7"),
        ("\\boxed{3}", "3"),
    ]
    async with VerifyClient(verify_host.target) as client:
        outcomes = await client.verify(items)
    verdicts = [o.verdict for o in outcomes]
    assert verdicts[:8] == [
        Verdict.CORRECT,
        Verdict.CORRECT,
        Verdict.CORRECT,
        Verdict.INCORRECT,
        Verdict.NO_ANSWER,
        Verdict.NO_GROUND_TRUTH,
        Verdict.NO_GROUND_TRUTH,
        Verdict.TIMEOUT,
    ]
    assert all(type(v) is Verdict for v in verdicts)
    assert [o.solved for o in outcomes] == [v is Verdict.CORRECT for v in verdicts]
    assert outcomes[0].answer == "7" and outcomes[3].answer == "8"
    assert outcomes[8].verdict is Verdict.ERROR and "characters" in outcomes[8].error
    assert verdicts[9] is Verdict.CORRECT
    # the pool recovered from the timeout and keeps serving
    async with VerifyClient(verify_host.target) as client:
        again = await client.verify([("\\boxed{42}", "42")] * 4)
    assert [o.verdict for o in again] == [Verdict.CORRECT] * 4


async def test_whole_call_limits_and_empty_batch(verify_host):
    async with VerifyClient(verify_host.target) as client:
        assert await client.verify([]) == []
        with pytest.raises(RpcError) as info:
            await client.verify([("\\boxed{1}", "1")] * 17)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "limit is 16" in info.value.details
    async with grpc.aio.insecure_channel(verify_host.target) as channel:
        reply = await verify_pb2_grpc.VerifyServiceStub(channel).Verify(
            verify_pb2.VerifyRequest(items=[verify_pb2.VerifyItem(response="y" * 6000, ground_truth="1")]),
            timeout=10,
        )
    [result] = reply.results
    assert result.error.code == common_pb2.ERROR_CODE_INVALID_ARGUMENT
    assert result.verdict == verify_pb2.VERDICT_UNSPECIFIED


async def test_wrong_types_and_unparseable_bytes_are_invalid_argument(verify_host):
    async with grpc.aio.insecure_channel(verify_host.target) as channel:
        raw = channel.unary_unary("/puremesh.verify.v1.VerifyService/Verify")
        for payload in (b"\x0a\x03\x0a\x01\xff", b"\x08\x01\x12", b"\xff\xff\xff"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw(payload, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, payload


async def test_concurrent_calls(verify_host):
    async with VerifyClient(verify_host.target) as client:
        results = await asyncio.gather(*(client.verify([(f"\\boxed{{{i}}}", str(i % 3))]) for i in range(30)))
    expected = [Verdict.CORRECT if i % 3 == i else Verdict.INCORRECT for i in range(30)]
    assert [r[0].verdict for r in results] == expected


async def test_cli_grpcurl_and_metrics(verify_host, run_cli, run_grpcurl):
    result = await asyncio.to_thread(
        run_cli,
        "verify",
        "--target",
        verify_host.target,
        "--response",
        "so \\boxed{\\frac{6}{4}}",
        "--ground-truth",
        "1.5",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"verdict": "correct", "answer": "\\frac{6}{4}"}
    for truth in ("", "null"):
        result = await asyncio.to_thread(
            run_cli,
            "verify",
            "--target",
            verify_host.target,
            "--response",
            "\\boxed{2}",
            "--ground-truth",
            truth,
            "--json",
        )
        assert json.loads(result.stdout) == {"verdict": "no_ground_truth", "answer": "2"}
    table = await asyncio.to_thread(
        run_cli, "verify", "--target", verify_host.target, "--response", "\\boxed{2}", "--ground-truth", "3"
    )
    assert "incorrect" in table.stdout

    described = await asyncio.to_thread(
        run_grpcurl, verify_host.target, "describe", "puremesh.verify.v1.VerifyService"
    )
    assert "rpc Verify" in described.stdout
    body = json.dumps({"items": [{"response": "\\boxed{5}", "ground_truth": "5"}]})
    called = await asyncio.to_thread(
        run_grpcurl, "-d", body, verify_host.target, "puremesh.verify.v1.VerifyService/Verify"
    )
    assert json.loads(called.stdout)["results"][0]["verdict"] == "VERDICT_CORRECT"

    url = f"http://127.0.0.1:{verify_host.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'puremesh_verify_verdicts_total{verdict="correct"}' in text


def test_serve_verify_subprocess_and_cli_errors(served, run_cli, run_grpcurl):
    server = served("verify")
    assert '"SERVING"' in run_grpcurl(server.target, "grpc.health.v1.Health/Check").stdout
    ok = run_cli(
        "verify", "--target", server.target, "--response", "\\boxed{4}", "--ground-truth", "4", "--json"
    )
    assert json.loads(ok.stdout)["verdict"] == "correct"
    assert server.terminate() == 0
    dead = run_cli("verify", "--target", server.target, "--response", "x", "--timeout", "2")
    assert dead.returncode == 1 and "UNAVAILABLE" in dead.stderr and dead.stderr.strip().count("\n") == 0
