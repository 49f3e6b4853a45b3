"""The PRM scoring core: PrmScorer (read-out, batching invariance) and DynamicBatcher
(coalescing, budget, failure isolation, lifecycle), on the tiny local PRM."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest
import torch

from puremesh.contract import steps as layout
from puremesh.services.prm.batcher import BatcherFull, BatcherStopped, BatchStats, DynamicBatcher
from puremesh.services.prm.scorer import PrmScorer
from puremesh.tinyworld.corpus import synthetic_corpus

ATOL = 1e-5


@pytest.fixture(scope="module")
def scorer(tiny_prm_dir: Path) -> PrmScorer:
    return PrmScorer(tiny_prm_dir, device="cpu", dtype="float32", max_tokens_per_forward=1 << 16)


@pytest.fixture(scope="module")
def pairs(scorer: PrmScorer) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) of synthetic solutions, responses ending in EOS."""
    out = []
    for text in synthetic_corpus(size=120, seed=7):
        question, solution = text.split("\n", 1)
        out.append((scorer.tokenize(question + "\n"), [*scorer.tokenize(solution), scorer.eos_id]))
    return out


@pytest.fixture(scope="module")
def items(scorer: PrmScorer, pairs) -> list[tuple[list[int], list[int]]]:
    """Ragged forward rows (input_ids, readout_positions)."""
    return [scorer.prepare(prompt, response)[1:] for prompt, response in pairs]


@pytest.fixture(scope="module")
def alone(scorer: PrmScorer, items) -> list[list[float]]:
    """Every item scored in a forward pass of its own."""
    return [scorer.score([item])[0] for item in items]


def assert_scores_close(got: list[list[float]], expected: list[list[float]]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert len(g) == len(e)
        assert torch.allclose(torch.tensor(g), torch.tensor(e), atol=ATOL, rtol=0), (g, e)


# --- PrmScorer ------------------------------------------------------------------------------


def test_tokenizer_facts(scorer: PrmScorer) -> None:
    tok = scorer.tokenizer
    assert scorer.newline_id == tok.encode("\n", add_special_tokens=False)[0]
    assert tok.decode([scorer.newline_id]) == "\n"
    separator = tok.convert_tokens_to_ids("\n\n")
    assert scorer.separator_ids == frozenset({separator})
    assert scorer.tokenize("a\n\nb").count(separator) == 1
    assert scorer.eos_id == tok.eos_token_id == 0


def test_score_responses_gives_one_score_in_range_per_step(scorer: PrmScorer, pairs) -> None:
    results = scorer.score_responses([*pairs[:8], ([1, 2], [])])
    for (_, response), (spans, scores) in zip(pairs[:8], results, strict=False):
        assert spans == layout.split_steps(response, scorer.separator_ids)
        assert len(scores) == len(spans) == response.count(next(iter(scorer.separator_ids))) + 1
        assert all(-1.0 <= s <= 1.0 for s in scores)
    assert results[-1] == ([], [])


def test_readout_is_tanh_half_logit_gap_at_each_inserted_newline(scorer: PrmScorer, items) -> None:
    input_ids, positions = items[0]
    assert all(input_ids[p] == scorer.newline_id for p in positions)
    with torch.inference_mode():
        logits = scorer.model(input_ids=torch.tensor([input_ids])).logits[0].float()
    z = logits[positions]
    expected = torch.tanh((z[:, 1] - z[:, 0]) / 2)
    softmax = torch.softmax(z, dim=-1)
    assert torch.allclose(expected, softmax[:, 1] - softmax[:, 0], atol=1e-6)
    assert torch.allclose(torch.tensor(scorer.score([items[0]])[0]), expected, atol=ATOL, rtol=0)


def test_batched_ragged_scores_equal_one_by_one(scorer: PrmScorer, items, alone) -> None:
    assert len({len(ids) for ids, _ in items}) > 5  # really ragged
    assert_scores_close(scorer.score(items), alone)


def test_splitting_into_several_forward_passes_changes_nothing(tiny_prm_dir: Path, items, alone) -> None:
    small = PrmScorer(tiny_prm_dir, max_tokens_per_forward=300)
    assert_scores_close(small.score(items[:30]), alone[:30])


def test_malformed_rows_are_rejected_before_any_forward(scorer: PrmScorer) -> None:
    with pytest.raises(ValueError, match="outside the PRM vocabulary"):
        scorer.score([([1, 2, 3], [2]), ([1, scorer.vocab_size], [1])])
    with pytest.raises(ValueError, match="outside the PRM vocabulary"):
        scorer.score([([1, -1], [1])])
    with pytest.raises(ValueError, match="exceeds the PRM context"):
        scorer.score([([1] * (scorer.max_length + 1), [0])])
    with pytest.raises(ValueError, match="read-out positions"):
        scorer.score([([1, 2], [2])])
    with pytest.raises(ValueError, match="empty input"):
        scorer.score([([], [])])
    assert scorer.score([]) == []


# --- DynamicBatcher -------------------------------------------------------------------------


class CountingForward:
    """Wraps a forward function and records the items of every call."""

    def __init__(self, forward) -> None:
        self.forward = forward
        self.calls: list[list] = []

    def __call__(self, items):
        self.calls.append(list(items))
        return self.forward(items)


async def test_concurrent_submits_are_coalesced(scorer: PrmScorer, items, alone) -> None:
    forward = CountingForward(scorer.score)
    stats: list[BatchStats] = []
    batcher = DynamicBatcher(forward, max_batch_tokens=1 << 14, max_wait_ms=50, on_batch=stats.append)
    await batcher.start()
    try:
        requests = [[items[i % len(items)]] for i in range(100)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    finally:
        await batcher.stop()
    assert len(forward.calls) <= 5, [len(c) for c in forward.calls]
    assert sum(len(c) for c in forward.calls) == 100
    assert batcher.forward_calls == len(stats) == len(forward.calls)
    assert all(s.ok and s.tokens <= 1 << 14 for s in stats)
    assert max(s.requests for s in stats) > 1
    for i, got in enumerate(results):
        assert_scores_close(got, [alone[i % len(items)]])


async def test_budget_closes_batches_and_big_requests_run_alone(scorer: PrmScorer, items, alone) -> None:
    budget = 4 * max(len(ids) for ids, _ in items)
    forward = CountingForward(scorer.score)
    batcher = DynamicBatcher(forward, max_batch_tokens=budget, max_wait_ms=20)
    await batcher.start()
    try:
        small = [batcher.submit([item]) for item in items[:12]]
        big_items = items[20:40]  # over the budget by itself: split, and never mixed with others
        big = batcher.submit(big_items)
        results = await asyncio.gather(*small, big)
    finally:
        await batcher.stop()
    for call in forward.calls:
        assert len(call) * max(len(ids) for ids, _ in call) <= budget
    big_ids = {id(item) for item in big_items}
    big_calls = [call for call in forward.calls if any(id(item) in big_ids for item in call)]
    assert len(big_calls) >= 2
    assert all(id(item) in big_ids for call in big_calls for item in call)
    assert_scores_close([r[0] for r in results[:12]], alone[:12])
    assert_scores_close(results[12], alone[20:40])


async def test_a_failing_forward_fails_only_its_own_batch(scorer: PrmScorer, items, alone) -> None:
    poison = ([1, 2, scorer.vocab_size + 5], [2])  # out of vocabulary: score() raises
    forward = CountingForward(scorer.score)
    batcher = DynamicBatcher(forward, max_batch_tokens=1 << 14, max_wait_ms=30)
    await batcher.start()
    try:
        # Same batch: the poisoned request and its batch mates fail with the scorer's error.
        first = await asyncio.gather(
            batcher.submit([items[0]]),
            batcher.submit([poison]),
            batcher.submit([items[1]]),
            return_exceptions=True,
        )
        assert len(forward.calls) == 1
        assert all(isinstance(r, ValueError) for r in first), first
        assert batcher.running
        # The next requests succeed.
        second = await asyncio.gather(batcher.submit([items[2]]), batcher.submit([items[3]]))
        assert_scores_close([second[0][0], second[1][0]], alone[2:4])
    finally:
        await batcher.stop()

    # Different batches (the budget fits one row): only the poisoned request fails.
    ids, positions = items[0]
    poison = ([*ids[:-1], scorer.vocab_size + 5], positions)
    forward = CountingForward(scorer.score)
    batcher = DynamicBatcher(forward, max_batch_tokens=len(ids), max_wait_ms=30)
    await batcher.start()
    try:
        mixed = await asyncio.gather(
            batcher.submit([items[0]]),
            batcher.submit([poison]),
            batcher.submit([items[0]]),
            return_exceptions=True,
        )
    finally:
        await batcher.stop()
    assert len(forward.calls) == 3
    assert isinstance(mixed[1], ValueError)
    assert_scores_close([mixed[0][0], mixed[2][0]], [alone[0], alone[0]])


async def test_disabled_runs_one_forward_per_submit(scorer: PrmScorer, items, alone) -> None:
    forward = CountingForward(scorer.score)
    batcher = DynamicBatcher(forward, max_batch_tokens=1 << 14, max_wait_ms=50, enabled=False)
    await batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit([item]) for item in items[:10]))
    finally:
        await batcher.stop()
    assert [len(c) for c in forward.calls] == [1] * 10
    assert batcher.forward_calls == 10
    assert_scores_close([r[0] for r in results], alone[:10])


async def test_stop_finishes_the_batch_in_flight_and_fails_the_waiting_ones() -> None:
    release = threading.Event()
    entered = threading.Event()

    def slow_forward(rows):
        entered.set()
        release.wait(timeout=10)
        return [[float(len(ids))] for ids, _ in rows]

    batcher = DynamicBatcher(slow_forward, max_batch_tokens=2, max_wait_ms=0)
    with pytest.raises(BatcherStopped):
        await batcher.submit([([1], [0])])  # not started
    await batcher.start()
    in_flight = asyncio.create_task(batcher.submit([([1, 2], [0])]))
    while not entered.is_set():
        await asyncio.sleep(0.005)
    waiting = [asyncio.create_task(batcher.submit([([1], [0])])) for _ in range(3)]
    await asyncio.sleep(0.02)
    assert batcher.queue_depth == 3 and batcher.queued_items == 3
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0.02)
    release.set()
    await stopping
    assert await in_flight == [[2.0]]
    for task in waiting:
        with pytest.raises(BatcherStopped):
            await task
    assert batcher.queue_depth == 0
    with pytest.raises(BatcherStopped):
        await batcher.submit([([1], [0])])


async def test_queue_limit_withdrawal_and_metrics() -> None:
    release = threading.Event()

    def blocking_forward(rows):
        release.wait(timeout=10)
        return [[0.5] * len(positions) for _, positions in rows]

    batcher = DynamicBatcher(blocking_forward, max_batch_tokens=100, max_wait_ms=0, max_queue=2)
    await batcher.start()
    try:
        assert await batcher.submit([]) == []
        first = asyncio.create_task(batcher.submit([([1, 2, 3], [0, 2])]))
        await asyncio.sleep(0.02)  # first is in flight now
        queued = [asyncio.create_task(batcher.submit([([1], [0])])) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherFull):
            await batcher.submit([([1], [0])])
        queued[0].cancel()  # a withdrawn request never runs
        await asyncio.sleep(0.01)
        release.set()
        assert await first == [[0.5, 0.5]]
        assert await queued[1] == [[0.5]]
        assert batcher.forward_calls == 2
        assert (batcher.last_batch_requests, batcher.last_batch_items, batcher.last_batch_tokens) == (1, 1, 1)
    finally:
        release.set()
        await batcher.stop()


def test_batcher_rejects_bad_settings() -> None:
    forward = lambda rows: []  # noqa: E731
    for kwargs in ({"max_batch_tokens": 0, "max_wait_ms": 1}, {"max_batch_tokens": 1, "max_wait_ms": -1}):
        with pytest.raises(ValueError):
            DynamicBatcher(forward, **kwargs)


def test_random_ragged_batches_match_one_by_one(scorer: PrmScorer, items, alone) -> None:
    rng = random.Random(0)
    for _ in range(3):
        picked = rng.sample(range(len(items)), 17)
        assert_scores_close(scorer.score([items[i] for i in picked]), [alone[i] for i in picked])
