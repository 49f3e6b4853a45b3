"""RolloutService: real servers on port 0 with the tiny policy (hf engine in-process, vLLM in a
subprocess), called over real channels."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import torch

from puremesh.common.v1 import common_pb2
from puremesh.contract.sampling import FinishReason, SamplingSpec
from puremesh.rollout.v1 import rollout_pb2, rollout_pb2_grpc
from puremesh.rpc.client import RpcError
from puremesh.rpc.server import ServiceHost
from puremesh.services.rollout.app import rollout_service
from puremesh.services.rollout.client import RolloutClient
from puremesh.services.rollout.settings import RolloutSettings

PROMPT = "Tom has 3 apples and buys 4 more. How many apples does he have?\n\n"
GREEDY = SamplingSpec(n=1, temperature=0.0, max_new_tokens=24)


@pytest.fixture
async def rollout_host(tiny_policy_dir):
    settings = RolloutSettings(model_path=str(tiny_policy_dir), max_in_flight=2, max_new_tokens=256, max_n=8)
    definition = rollout_service(settings)
    host = ServiceHost([definition], settings.server)
    await host.start()
    host.engine = definition.servicer.engine
    yield host
    await host.drain(grace=1)


async def collect(client: RolloutClient, prompt, sampling: SamplingSpec, **kwargs):
    return sorted(
        [s async for s in client.generate(prompt, sampling, **kwargs)], key=lambda s: s.sample_index
    )


async def test_generate_streams_n_samples_with_versions_and_logprobs(rollout_host):
    async with RolloutClient(rollout_host.target) as client:
        status = await client.status()
        assert status.ready and status.engine == "hf" and status.policy_version == 0
        samples = await collect(client, PROMPT, SamplingSpec(n=4, temperature=1.0, max_new_tokens=16, seed=7))
        assert [s.sample_index for s in samples] == [0, 1, 2, 3]
        for sample in samples:
            assert len(sample.logprobs) == len(sample.token_ids) >= 1
            assert all(lp <= 0 for lp in sample.logprobs)
            assert sample.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
            assert sample.policy_version == 0
        again = await collect(client, PROMPT, SamplingSpec(n=4, temperature=1.0, max_new_tokens=16, seed=7))
        assert [s.token_ids for s in again] == [s.token_ids for s in samples]
        # text and token-id prompts are the same request
        by_text = await collect(client, PROMPT, GREEDY)
        ids = rollout_host.engine.tokenize(PROMPT)
        by_ids = await collect(client, ids, GREEDY)
        assert by_text[0].token_ids == by_ids[0].token_ids
        assert by_text[0].prompt_token_count == len(ids)


@pytest.mark.parametrize(
    ("sampling", "words"),
    [
        (SamplingSpec(n=0), "n must be"),
        (SamplingSpec(n=9), "n must be"),
        (SamplingSpec(temperature=-1.0), "temperature"),
        (SamplingSpec(top_p=1.5), "top_p"),
        (SamplingSpec(max_new_tokens=0), "max_new_tokens"),
        (SamplingSpec(max_new_tokens=5000), "max_new_tokens"),
        (SamplingSpec(stop=[""]), "stop"),
    ],
)
async def test_invalid_sampling_is_invalid_argument(rollout_host, sampling, words):
    async with RolloutClient(rollout_host.target) as client:
        with pytest.raises(RpcError) as info:
            await collect(client, PROMPT, sampling)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details


async def test_invalid_prompts_stale_versions_and_overload(rollout_host):
    async with grpc.aio.insecure_channel(rollout_host.target) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        sampling = rollout_pb2.SamplingParams(n=1, max_new_tokens=4)
        bad_requests = [
            rollout_pb2.GenerateRequest(sampling=sampling),
            rollout_pb2.GenerateRequest(prompt_token_ids=common_pb2.TokenIds(ids=[]), sampling=sampling),
            rollout_pb2.GenerateRequest(prompt_token_ids=common_pb2.TokenIds(ids=[10**6]), sampling=sampling),
            rollout_pb2.GenerateRequest(prompt_text="x" * 300_000, sampling=sampling),
        ]
        for request in bad_requests:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [m async for m in stub.Generate(request, timeout=30)]
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:
            stale = rollout_pb2.GenerateRequest(prompt_text=PROMPT, sampling=sampling, min_policy_version=3)
            [m async for m in stub.Generate(stale, timeout=30)]
        assert info.value.code() == grpc.StatusCode.ABORTED

        long = rollout_pb2.GenerateRequest(
            prompt_text=PROMPT, sampling=rollout_pb2.SamplingParams(n=8, max_new_tokens=256, temperature=1.0)
        )
        busy = [stub.Generate(long, timeout=120) for _ in range(2)]
        readers = [asyncio.ensure_future(call.read()) for call in busy]
        while rollout_host.engine.requests_in_flight < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [m async for m in stub.Generate(long, timeout=30)]
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in busy:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_weight_update_reaches_samples_and_status(rollout_host, tiny_policy_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, local_files_only=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    async with RolloutClient(rollout_host.target) as client:
        before = await collect(client, PROMPT, GREEDY)
        await rollout_host.engine.load_weights(list(model.named_parameters()), version=1)
        after = await collect(client, PROMPT, GREEDY, min_policy_version=1)
        assert (await client.status()).policy_version == 1
    assert before[0].policy_version == 0 and after[0].policy_version == 1
    assert before[0].token_ids != after[0].token_ids


async def test_cli_and_grpcurl(rollout_host, run_cli, run_grpcurl):
    result = await asyncio.to_thread(
        run_cli,
        "generate",
        "--target",
        rollout_host.target,
        "--prompt",
        PROMPT,
        "-n",
        "2",
        "--max-new-tokens",
        "8",
        "--seed",
        "3",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    samples = json.loads(result.stdout)["samples"]
    assert [s["sample_index"] for s in samples] == [0, 1]
    assert all(len(s["token_ids"]) == len(s["logprobs"]) for s in samples)
    bad = await asyncio.to_thread(
        run_cli, "generate", "--target", rollout_host.target, "--prompt", "x", "-n", "0"
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and bad.stderr.strip().count("\n") == 0

    listed = await asyncio.to_thread(
        run_grpcurl, rollout_host.target, "list", "puremesh.rollout.v1.RolloutService"
    )
    assert "puremesh.rollout.v1.RolloutService.Generate" in listed.stdout
    status = await asyncio.to_thread(
        run_grpcurl, rollout_host.target, "puremesh.rollout.v1.RolloutService/GetStatus"
    )
    assert json.loads(status.stdout)["engine"] == "hf"


def test_vllm_service_matches_hf_greedy(served, tiny_policy_dir, run_cli):
    """The vLLM backend behind the same servicer gives the hf backend's greedy tokens."""
    env = {"PUREMESH_ROLLOUT__MODEL_PATH": str(tiny_policy_dir), "PUREMESH_ROLLOUT__DTYPE": "float32"}
    vllm = served("rollout", env={**env, "PUREMESH_ROLLOUT__ENGINE": "vllm"}, ready_timeout=300)
    hf = served("rollout", env=env)
    outputs = []
    for server in (vllm, hf):
        result = run_cli(
            "generate",
            "--target",
            server.target,
            "--prompt",
            PROMPT,
            "--temperature",
            "0",
            "--max-new-tokens",
            "24",
            "--json",
        )
        assert result.returncode == 0, result.stderr
        outputs.append(json.loads(result.stdout)["samples"][0])
    assert outputs[0]["token_ids"] == outputs[1]["token_ids"]
    assert outputs[0]["logprobs"] == pytest.approx(outputs[1]["logprobs"], abs=1e-3)
    assert vllm.terminate(timeout=120) == 0
