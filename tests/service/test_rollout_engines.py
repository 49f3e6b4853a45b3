"""Rollout engines (transformers "hf" and "vllm") behind one interface, on the tiny policy.

Every engine test runs for both backends; the vLLM cases carry the `vllm` marker
(`pytest -m vllm` selects them, `-m "not vllm"` skips them). The engines live for the whole
module (vLLM keeps process-global state: one engine per process); a test that loads other
weights puts the original ones back before it ends.

The key test: vLLM and transformers produce identical greedy token ids for the same prompts
before and after the same weight update (every weight perturbed with seeded noise), and the
update really changes the output.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from collections.abc import Callable

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM
from transformers.generation import TemperatureLogitsWarper, TopPLogitsWarper

from puremesh.contract.sampling import FinishReason, Sample, SamplingSpec
from puremesh.services.rollout.engine import Engine, EngineNotReadyError
from puremesh.services.rollout.gate import ReadWriteGate
from puremesh.services.rollout.hf_engine import HfEngine

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache for the CPU backend

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_MODEL_LEN = 512
LIMITS = {"max_n": 8, "max_new_tokens": 128}
NOISE_SCALE = 0.1  # std of the seeded noise added to every weight (init std is 0.02)
NOISE_SEED = 1234
PROMPTS = (
    "Question: What is (3 + 4) * 2?\n",
    "Question: Tom has 5 apples. Tom gets 3 more. How many apples does Tom have now?\n",
    "Step 1: 7 * 2 = 14\n\n",
    "The answer is",
)
ATOL_LOGPROB = 1e-4


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference_model(tiny_policy_dir):
    """The policy in transformers, never modified: the reference for log-probabilities."""
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_policy_dir), local_files_only=True, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def base_weights(reference_model) -> list[tuple[str, torch.Tensor]]:
    return [(name, p.detach().clone()) for name, p in reference_model.named_parameters()]


@pytest.fixture(scope="module")
def perturbed_weights(base_weights) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(NOISE_SEED)
    return [(name, t + NOISE_SCALE * torch.randn(t.shape, generator=generator)) for name, t in base_weights]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hf_engine(tiny_policy_dir):
    engine = HfEngine(tiny_policy_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, **LIMITS)
    await engine.start()
    yield engine
    await engine.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm_engine(tiny_policy_dir):
    pytest.importorskip("vllm")
    from puremesh.services.rollout.vllm_engine import VllmEngine

    engine = VllmEngine(
        tiny_policy_dir, dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, **LIMITS
    )
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def engine(request) -> Engine:
    return request.getfixturevalue(f"{request.param}_engine")


# ---------------------------------------------------------------------------------- helpers


async def collect(engine: Engine, prompt: list[int], spec: SamplingSpec) -> list[Sample]:
    """The samples in arrival order."""
    return [sample async for sample in engine.generate(prompt, spec)]


def by_index(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: s.sample_index)


async def greedy(engine: Engine, text: str, max_new_tokens: int = 32) -> Sample:
    spec = SamplingSpec(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    [sample] = await collect(engine, engine.tokenize(text), spec)
    return sample


async def load(engine: Engine, weights: list[tuple[str, torch.Tensor]]) -> int:
    version = engine.policy_version + 1
    await engine.load_weights(weights, version)
    return version


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def check_sample(sample: Sample, engine: Engine, prompt: list[int], spec: SamplingSpec) -> None:
    assert 1 <= len(sample.token_ids) <= spec.max_new_tokens
    assert len(sample.logprobs) == len(sample.token_ids)
    assert all(lp <= 0.0 and math.isfinite(lp) for lp in sample.logprobs)
    assert sample.prompt_token_count == len(prompt)
    assert sample.text == engine.decode(sample.token_ids)
    assert sample.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


def reference_logprobs(model, prompt: list[int], tokens: list[int], spec: SamplingSpec) -> torch.Tensor:
    """Teacher-forced log-probabilities of `tokens` under the processed sampling distribution."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    if not spec.greedy:
        logits = TemperatureLogitsWarper(spec.sampling_temperature)(None, logits)
        if spec.top_p < 1:
            logits = TopPLogitsWarper(spec.top_p)(None, logits)
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def stop_position(engine: Engine, tokens: list[int], stop: str) -> int | None:
    """How many tokens a sample keeps with stop string `stop` (vLLM's rule, engine.py)."""
    previous = ""
    for count in range(1, len(tokens) + 1):
        text = engine.decode(tokens[:count])
        if text.find(stop, max(0, len(previous) - len(stop) + 1)) != -1:
            return count
        previous = text
    return None


# ---------------------------------------------------------------------------------- the gate (gate.py)


async def test_gate_writer_waits_for_readers_and_holds_new_readers_back() -> None:
    gate = ReadWriteGate()
    await gate.acquire_read()
    writer = asyncio.create_task(gate.acquire_write())
    await asyncio.sleep(0)
    assert not writer.done() and gate.writers_waiting == 1
    late_reader = asyncio.create_task(gate.acquire_read())
    await asyncio.sleep(0)
    assert not late_reader.done(), "a waiting writer must keep new readers out"
    gate.release_read()
    await writer
    assert gate.writing and not late_reader.done()
    gate.release_write()
    await late_reader
    assert gate.readers == 1
    gate.release_read()


async def test_gate_cancelled_writer_lets_readers_in() -> None:
    gate = ReadWriteGate()
    await gate.acquire_read()
    writer = asyncio.create_task(gate.acquire_write())
    await asyncio.sleep(0)
    reader = asyncio.create_task(gate.acquire_read())
    await asyncio.sleep(0)
    writer.cancel()
    await asyncio.wait_for(reader, 5)
    assert gate.readers == 2 and gate.writers_waiting == 0
    gate.release_read()
    gate.release_read()


# ---------------------------------------------------------------------------------- both engines


async def test_engine_reports_its_identity(engine: Engine) -> None:
    assert engine.ready and engine.name in ("hf", "vllm")
    assert engine.vocab_size > 0 and engine.max_model_len == MAX_MODEL_LEN
    assert engine.eos_token_id is not None and engine.requests_in_flight == 0
    ids = engine.tokenize("a\n\nb")
    assert len(ids) == 3 and engine.decode(ids) == "a\n\nb"


@pytest.mark.parametrize(
    ("prompt", "spec", "message"),
    [
        ([], SamplingSpec(max_new_tokens=8), "empty"),
        ([10**6], SamplingSpec(max_new_tokens=8), "outside the vocabulary"),
        ([-1], SamplingSpec(max_new_tokens=8), "outside the vocabulary"),
        ([1] * (MAX_MODEL_LEN - 10), SamplingSpec(max_new_tokens=20), "exceeds the model context"),
        ([1, 2], SamplingSpec(n=0), "n must be"),
        ([1, 2], SamplingSpec(top_p=0.0), "top_p"),
        ([1, 2], SamplingSpec(max_new_tokens=1000), "max_new_tokens"),
        ([1, 2], SamplingSpec(max_new_tokens=8, stop=[""]), "stop string"),
    ],
)
async def test_engine_rejects_bad_requests(engine: Engine, prompt, spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        await collect(engine, prompt, spec)
    assert engine.requests_in_flight == 0


async def test_engine_rejects_bad_weights_and_keeps_its_version(
    engine: Engine, base_weights, reference_model
) -> None:
    version = engine.policy_version
    bad_weights = {
        "unknown weight": [*base_weights, ("model.extra.weight", torch.zeros(2))],
        "has shape": [(n, t[..., :1] if n == base_weights[0][0] else t) for n, t in base_weights],
        "missing": base_weights[1:],
        "given twice": [*base_weights, base_weights[0]],
        "floating-point": [(n, t.long() if n == base_weights[0][0] else t) for n, t in base_weights],
    }
    for message, weights in bad_weights.items():
        with pytest.raises(ValueError, match=message):
            await engine.load_weights(weights, version + 1)
    with pytest.raises(ValueError, match="version"):
        await engine.load_weights(base_weights, version)
    assert engine.policy_version == version
    # state_dict() also lists the tied output embedding: accepted, and ignored.
    before = await greedy(engine, PROMPTS[0])
    await engine.load_weights(list(reference_model.state_dict().items()), version + 1)
    assert engine.policy_version == version + 1
    after = await greedy(engine, PROMPTS[0])
    assert after.token_ids == before.token_ids and after.policy_version == version + 1


async def test_greedy_generation_is_deterministic(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPTS[1])
    spec = SamplingSpec(n=3, temperature=0.0, max_new_tokens=24)
    first, second = (
        by_index(await collect(engine, prompt, spec)),
        by_index(await collect(engine, prompt, spec)),
    )
    assert [s.sample_index for s in first] == [0, 1, 2]
    for sample in first + second:
        check_sample(sample, engine, prompt, spec)
        assert sample.token_ids == first[0].token_ids
        assert sample.policy_version == engine.policy_version
    for a, b in zip(first, second, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)


async def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPTS[0])
    spec = SamplingSpec(n=4, temperature=1.0, top_p=0.9, max_new_tokens=16, seed=7)
    first, second = (
        by_index(await collect(engine, prompt, spec)),
        by_index(await collect(engine, prompt, spec)),
    )
    assert [s.token_ids for s in first] == [s.token_ids for s in second]
    assert len({tuple(s.token_ids) for s in first}) > 1, "the n samples should differ from each other"
    for sample in first:
        check_sample(sample, engine, prompt, spec)
    other = by_index(await collect(engine, prompt, dataclasses.replace(spec, seed=8)))
    assert [s.token_ids for s in other] != [s.token_ids for s in first]
    unseeded = [
        by_index(await collect(engine, prompt, dataclasses.replace(spec, seed=None))) for _ in range(2)
    ]
    assert [s.token_ids for s in unseeded[0]] != [s.token_ids for s in unseeded[1]]


@pytest.mark.parametrize(
    "spec",
    [
        SamplingSpec(n=2, temperature=0.0, max_new_tokens=12),
        SamplingSpec(n=3, temperature=1.0, max_new_tokens=12, seed=3),
        SamplingSpec(n=3, temperature=0.7, top_p=0.8, max_new_tokens=12, seed=5),
    ],
    ids=["greedy", "t1", "t0.7-p0.8"],
)
async def test_logprobs_are_those_of_the_sampling_distribution(engine: Engine, reference_model, spec) -> None:
    prompt = engine.tokenize(PROMPTS[1])
    for sample in await collect(engine, prompt, spec):
        expected = reference_logprobs(reference_model, prompt, sample.token_ids, spec)
        assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=ATOL_LOGPROB), (
            sample.logprobs,
            expected.tolist(),
        )


async def test_finish_reasons_length_stop_string_and_eos(engine: Engine, base_weights) -> None:
    prompt = engine.tokenize(PROMPTS[2])
    spec = SamplingSpec(n=1, temperature=1.0, max_new_tokens=40, seed=12)
    [free] = await collect(engine, prompt, spec)
    assert free.finish_reason is FinishReason.LENGTH and len(free.token_ids) == 40

    # A stop string taken from the free sample's text: the same seed stops exactly there.
    stop = next(
        piece
        for piece in (engine.decode([t]) for t in free.token_ids[5:])
        if piece.strip() and "\ufffd" not in piece
    )
    keep = stop_position(engine, free.token_ids, stop)
    [stopped] = await collect(engine, prompt, dataclasses.replace(spec, stop=[stop]))
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.token_ids == free.token_ids[:keep] and stop in stopped.text
    assert stopped.logprobs == pytest.approx(free.logprobs[:keep], abs=1e-5)

    # EOS: with the final norm zeroed every logit is 0 and greedy decoding picks id 0, the eos.
    if engine.eos_token_id != 0:
        pytest.skip("the eos check needs eos id 0")
    silenced = [(n, torch.zeros_like(t) if n == "model.norm.weight" else t) for n, t in base_weights]
    try:
        await load(engine, silenced)
        [eos] = await collect(engine, prompt, SamplingSpec(n=1, temperature=0.0, max_new_tokens=8))
        assert eos.finish_reason is FinishReason.STOP
        assert eos.token_ids == [engine.eos_token_id] and eos.text == ""
        assert eos.logprobs == pytest.approx([-math.log(engine.vocab_size)], abs=1e-4)
    finally:
        await load(engine, base_weights)


async def test_samples_stream_as_they_finish(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPTS[0])
    spec = SamplingSpec(n=6, temperature=1.0, max_new_tokens=100, seed=2, stop=["k"])
    arrivals: list[tuple[int, int]] = []  # (tokens, requests in flight) at arrival
    async for sample in engine.generate(prompt, spec):
        arrivals.append((len(sample.token_ids), engine.requests_in_flight))
    lengths = [length for length, _ in arrivals]
    assert lengths == sorted(lengths), f"samples should arrive in completion order, got lengths {lengths}"
    assert lengths[-1] - lengths[0] >= 20, f"the seed should give samples of varied length: {lengths}"
    assert arrivals[0][1] == 1, "the first sample should arrive while the others still run"
    assert engine.requests_in_flight == 0


async def test_closing_the_stream_early_aborts_the_rest(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPTS[0])
    stream = engine.generate(
        prompt, SamplingSpec(n=6, temperature=1.0, max_new_tokens=100, seed=2, stop=["k"])
    )
    first = await anext(stream)
    await stream.aclose()
    assert first.finish_reason is FinishReason.STOP
    await wait_until(lambda: engine.requests_in_flight == 0)
    assert len(await collect(engine, prompt, SamplingSpec(n=2, max_new_tokens=4, seed=1))) == 2


async def test_load_weights_bumps_the_version_of_every_later_sample(
    engine: Engine, base_weights, perturbed_weights
) -> None:
    before = await greedy(engine, PROMPTS[0])
    try:
        version = await load(engine, perturbed_weights)
        assert engine.policy_version == version
        samples = await collect(
            engine, engine.tokenize(PROMPTS[0]), SamplingSpec(n=3, max_new_tokens=8, seed=4)
        )
        assert {s.policy_version for s in samples} == {version}
        changed = await greedy(engine, PROMPTS[0])
        assert changed.policy_version == version and changed.token_ids != before.token_ids
    finally:
        restored = await load(engine, base_weights)
    again = await greedy(engine, PROMPTS[0])
    assert again.policy_version == restored and again.token_ids == before.token_ids


async def test_weight_load_waits_for_running_generations(
    engine: Engine, base_weights, perturbed_weights
) -> None:
    prompt = engine.tokenize(PROMPTS[1])
    spec = SamplingSpec(n=2, temperature=0.0, max_new_tokens=120)
    old_reference = await collect(engine, prompt, spec)
    old_version = engine.policy_version
    try:
        running = asyncio.create_task(collect(engine, prompt, spec))
        await wait_until(lambda: engine.requests_in_flight == 1)
        swap = asyncio.create_task(engine.load_weights(perturbed_weights, old_version + 1))
        await wait_until(lambda: engine.swapping)
        assert not running.done() and not swap.done()
        # Arrives while the swap waits: it must queue behind the swap (writer preference).
        queued = asyncio.create_task(collect(engine, prompt, spec))
        await wait_until(lambda: engine.requests_in_flight == 2)
        old, _, new = await asyncio.gather(running, swap, queued)
        assert {s.policy_version for s in old} == {old_version}
        assert {s.policy_version for s in new} == {old_version + 1}
        # No sample mixes versions: each equals a run made entirely with its version's weights.
        assert [s.token_ids for s in by_index(old)] == [s.token_ids for s in by_index(old_reference)]
        new_reference = await collect(engine, prompt, spec)
        assert [s.token_ids for s in by_index(new)] == [s.token_ids for s in by_index(new_reference)]
        assert new[0].token_ids != old[0].token_ids
    finally:
        await load(engine, base_weights)
    assert engine.requests_in_flight == 0 and not engine.swapping


# ---------------------------------------------------------------------------------- hf only


async def test_hf_engine_lifecycle_not_started_close_aborts_then_refuses(
    tiny_policy_dir, base_weights
) -> None:
    engine = HfEngine(tiny_policy_dir, dtype="float32", max_new_tokens=1000)
    with pytest.raises(EngineNotReadyError):
        await collect(engine, [1, 2], SamplingSpec())
    with pytest.raises(EngineNotReadyError):
        engine.tokenize("hello")
    await engine.start()
    prompt = engine.tokenize(PROMPTS[0])
    running = asyncio.create_task(
        collect(engine, prompt, SamplingSpec(n=2, temperature=0.0, max_new_tokens=900))
    )
    await wait_until(lambda: engine.requests_in_flight == 1)
    await asyncio.sleep(0.05)
    await engine.close()
    samples = await running
    assert {s.finish_reason for s in samples} == {FinishReason.ABORT} and len(samples) == 2
    assert all(len(s.logprobs) == len(s.token_ids) < 900 for s in samples)
    assert not engine.ready and engine.requests_in_flight == 0
    with pytest.raises(EngineNotReadyError):
        await collect(engine, prompt, SamplingSpec())
    with pytest.raises(EngineNotReadyError):
        await engine.load_weights(base_weights, 1)
    await engine.close()  # idempotent


# ---------------------------------------------------------------------------------- vllm only


@pytest.mark.vllm
async def test_vllm_matches_transformers_before_and_after_the_same_weight_update(
    vllm_engine: Engine, hf_engine: Engine, base_weights, perturbed_weights
) -> None:
    async def both() -> tuple[list[Sample], list[Sample]]:
        # vLLM gets all prompts at once (one batch); transformers one by one.
        from_vllm = await asyncio.gather(*(greedy(vllm_engine, p) for p in PROMPTS))
        from_hf = [await greedy(hf_engine, p) for p in PROMPTS]
        return list(from_vllm), from_hf

    before_vllm, before_hf = await both()
    for v, h in zip(before_vllm, before_hf, strict=True):
        assert v.token_ids == h.token_ids
        assert v.logprobs == pytest.approx(h.logprobs, abs=ATOL_LOGPROB)
    try:
        versions = (await load(vllm_engine, perturbed_weights), await load(hf_engine, perturbed_weights))
        after_vllm, after_hf = await both()
        for v, h, old in zip(after_vllm, after_hf, before_hf, strict=True):
            assert v.token_ids == h.token_ids
            assert v.logprobs == pytest.approx(h.logprobs, abs=ATOL_LOGPROB)
            assert v.token_ids != old.token_ids, "the update should change the greedy output"
            assert (v.policy_version, h.policy_version) == versions
    finally:
        await load(vllm_engine, base_weights)
        await load(hf_engine, base_weights)


@pytest.mark.vllm
async def test_vllm_batches_concurrent_requests_and_streams_across_them(vllm_engine: Engine) -> None:
    prompt = vllm_engine.tokenize(PROMPTS[0])
    order: list[str] = []

    async def run(tag: str, max_new_tokens: int) -> None:
        async for _ in vllm_engine.generate(prompt, SamplingSpec(n=2, max_new_tokens=max_new_tokens, seed=1)):
            order.append(tag)

    long = asyncio.create_task(run("long", 120))
    await wait_until(lambda: vllm_engine.requests_in_flight == 1)
    await asyncio.gather(long, run("short", 2))
    assert order == ["short", "short", "long", "long"]
