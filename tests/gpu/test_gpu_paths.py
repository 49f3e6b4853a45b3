"""The GPU paths for real (issue 15): skipped without CUDA, as in CI; none has run yet (README
"GPU paths").

- Two versions cross real NCCL (vLLM's PyNcclCommunicator from a unique id, nccl_group.VllmNccl)
  from the learner's WeightService, wired as cli/learner.py wires it, sending from cuda:0, to a
  replica's fetcher receiving on cuda:1: the bytes land on the GPU, intact, without a fallback.
  NCCL needs one device per rank, so this needs two GPUs.
- vLLM's CUDA build with CUDA graphs (enforce_eager false): after each in-place weight reload its
  greedy tokens equal transformers' with the same weights (float32 on both sides).

The same transport logic on CPU, with a loopback double for NCCL: tests/service/test_weight_nccl.py.
"""

from __future__ import annotations

import pytest
import torch

from puremesh.cli.learner import weight_servicer, weight_store
from puremesh.contract.sampling import SamplingSpec
from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import ServerSettings
from puremesh.trainer.settings import WeightServerSettings
from puremesh.weights.v1 import weights_pb2
from puremesh.weightsync import nccl, nccl_sender
from puremesh.weightsync.fetcher import WeightFetcher
from puremesh.weightsync.servicer import weight_service
from puremesh.weightsync.transport import FetchOptions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GREEDY = SamplingSpec(n=1, temperature=0.0, max_new_tokens=24)
PROMPT = "Question: Tom has 5 apples. Tom gets 3 more. How many apples does Tom have now?\n"


def perturbed(model, version: int) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(version)
    return [
        (n, p.detach().cpu() + 0.05 * torch.randn(p.shape, generator=generator))
        for n, p in model.named_parameters()
    ]


@pytest.fixture
def policy(tiny_policy_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(tiny_policy_dir), local_files_only=True, dtype=torch.float32
    )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one device per rank: two GPUs")
async def test_two_versions_cross_real_nccl_onto_the_gpu(policy) -> None:
    weights = WeightServerSettings(nccl=True, nccl_device="cuda:0")
    store, bulk = weight_store(weights)
    servicer = weight_servicer(store, weights)
    assert servicer.nccl is not None  # CUDA and NCCL are here
    host = ServiceHost([weight_service(servicer)], ServerSettings(port=0, metrics_port=None))
    await host.start()
    fallbacks = sum(sample.value for metric in nccl.NCCL_FALLBACKS.collect() for sample in metric.samples)
    try:
        async with WeightFetcher(host.target, "gpu-replica", FetchOptions(nccl_device="cuda:1")) as fetcher:
            for version in (1, 2):
                published = perturbed(policy, version)
                info = store.publish(version, published)
                announced = await fetcher.current(version - 1)
                assert announced.transport == weights_pb2.TRANSPORT_NCCL
                sent = nccl_sender.NCCL_SENT_BYTES._value.get()
                fetched = await fetcher.download(announced)
                assert fetched.buffer.device == torch.device("cuda:1")
                assert nccl_sender.NCCL_SENT_BYTES._value.get() == sent + info.total_bytes
                for (name, got), (_, want) in zip(fetched.tensors(), published, strict=True):
                    assert torch.equal(got.cpu(), want), name
                await fetcher.confirm(fetched)
    finally:
        servicer.nccl.close()
        store.close()
        if bulk is not None:
            bulk.close()
        await host.drain(grace=1)
    after = sum(sample.value for metric in nccl.NCCL_FALLBACKS.collect() for sample in metric.samples)
    assert after == fallbacks


async def test_vllm_cuda_graphs_reload_matches_transformers(tiny_policy_dir, policy) -> None:
    from puremesh.services.rollout.vllm_device import vllm_platform
    from puremesh.services.rollout.vllm_engine import VllmEngine

    if vllm_platform() != "cuda":
        pytest.skip(f"the installed vLLM build runs on {vllm_platform()!r}")
    engine = VllmEngine(
        tiny_policy_dir, dtype="float32", max_model_len=256, enforce_eager=False, device="cuda",
        engine_kwargs={"gpu_memory_utilization": 0.3},
    )  # fmt: skip
    await engine.start()
    try:
        prompt = engine.tokenize(PROMPT)
        for version in (1, 2):
            weights = perturbed(policy, version)
            await engine.load_weights([(n, t.cuda()) for n, t in weights], version)
            [sample] = [s async for s in engine.generate(prompt, GREEDY)]
            policy.load_state_dict(dict(weights), strict=False)
            reference = policy.to("cuda").eval()
            ids = torch.tensor([prompt], device="cuda")
            with torch.no_grad():
                out = reference.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=GREEDY.max_new_tokens,
                    eos_token_id=engine.eos_token_id, pad_token_id=engine.eos_token_id,
                )  # fmt: skip
            assert sample.token_ids == out[0, ids.shape[1] :].tolist(), f"version {version}"
    finally:
        await engine.close()
