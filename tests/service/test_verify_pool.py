"""GradingPool (services/verify/pool.py): real worker processes, real math-verify, a real
pathological answer for the hard timeout.

The pathological answer is ``9^{9^{9^{9^{9}}}}`` against the ground truth ``1``: math-verify
calls ``doit()`` on the parsed power and sympy starts computing 9^(9^9) exactly (a 370-million
digit integer, pure-Python big-int arithmetic, then a power tower beyond any memory). It was
still running after 60 s, at about 110 MB, when it was killed, so any timeout below that is a
real timeout, not a race.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import AsyncIterator

import pytest

from puremesh.contract.verdict import Verdict
from puremesh.services.verify.pool import GradeResult, GradingPool, PoolNotRunningError

WORKERS = 2
TIMEOUT_S = 1.5  # per item; warm workers grade the normal items below in milliseconds
PATHOLOGICAL = r"So the value is $\boxed{9^{9^{9^{9^{9}}}}}$."
PATHOLOGICAL_ANSWER = "9^{9^{9^{9^{9}}}}"

# (response, ground truth) -> (verdict, extracted answer)
MIXED: list[tuple[tuple[str, str | None], tuple[Verdict, str]]] = [
    ((r"\boxed{42}", "42"), (Verdict.CORRECT, "42")),
    ((r"\boxed{\frac{1}{2}}", "0.5"), (Verdict.CORRECT, r"\frac{1}{2}")),
    ((r"\boxed{(x+1)^2}", "x^2+2x+1"), (Verdict.CORRECT, "(x+1)^2")),
    (("The answer is 3.0", "3"), (Verdict.CORRECT, "3.0")),
    ((r"\boxed{\sqrt{12}}", r"2\sqrt{3}"), (Verdict.CORRECT, r"\sqrt{12}")),
    ((r"\boxed{7}", "8"), (Verdict.INCORRECT, "7")),
    ((r"\boxed{(x-1)^2}", "x^2+2x+1"), (Verdict.INCORRECT, "(x-1)^2")),
    (("I give up.", "5"), (Verdict.NO_ANSWER, "")),
    ((r"\boxed{5}", None), (Verdict.NO_GROUND_TRUTH, "5")),
]


def expected_for(batch: list[tuple[tuple[str, str | None], tuple[Verdict, str]]]) -> list[GradeResult]:
    return [GradeResult(verdict, answer) for _, (verdict, answer) in batch]


def process_gone(pid: int) -> bool:
    """True once the process is gone (or only a zombie awaiting its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def pool() -> AsyncIterator[GradingPool]:
    grading_pool = GradingPool(WORKERS)
    await grading_pool.start()
    try:
        yield grading_pool
    finally:
        await grading_pool.close()


async def test_start_warms_up_every_worker(pool: GradingPool) -> None:
    assert pool.size == pool.ready == WORKERS
    assert len(set(pool.pids())) == WORKERS
    assert pool.busy == pool.queue_depth == 0
    # warm workers answer a real comparison quickly
    start = time.monotonic()
    assert await pool.grade_many([(r"\boxed{(x+1)^2}", "x^2+2x+1")], TIMEOUT_S) == [
        GradeResult(Verdict.CORRECT, "(x+1)^2")
    ]
    assert time.monotonic() - start < 1.0


async def test_mixed_batch_only_the_pathological_item_times_out(pool: GradingPool) -> None:
    batch = [*MIXED[:4], ((PATHOLOGICAL, "1"), (Verdict.TIMEOUT, PATHOLOGICAL_ANSWER)), *MIXED[4:]]
    start = time.monotonic()
    results = await pool.grade_many([item for item, _ in batch], TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert results == expected_for(batch)
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2.0  # the hard timeout, not the hours sympy needs
    assert pool.timeouts_total == pool.restarts_total == 1


async def test_pool_recovers_after_timeouts(pool: GradingPool) -> None:
    before = set(pool.pids())
    # Both workers hang at once: every worker is killed.
    results = await pool.grade_many([(PATHOLOGICAL, "1"), (PATHOLOGICAL, "0")], TIMEOUT_S)
    assert [r.verdict for r in results] == [Verdict.TIMEOUT, Verdict.TIMEOUT]
    # The next batch is served at once (it waits for the replacements, not for a timeout) ...
    assert await pool.grade_many([item for item, _ in MIXED], TIMEOUT_S) == expected_for(MIXED)
    # ... by a full set of fresh workers, and the stuck ones are gone.
    await wait_until(lambda: pool.ready == WORKERS)
    after = set(pool.pids())
    assert len(after) == WORKERS and not after & before
    await wait_until(lambda: all(process_gone(pid) for pid in before))
    assert pool.restarts_total == 2
    # Both new workers take work: two items that each hold a worker for TIMEOUT_S finish in
    # about TIMEOUT_S, not twice that.
    start = time.monotonic()
    results = await pool.grade_many([(PATHOLOGICAL, "1"), (PATHOLOGICAL, "2")], TIMEOUT_S)
    assert [r.verdict for r in results] == [Verdict.TIMEOUT, Verdict.TIMEOUT]
    assert time.monotonic() - start < 2 * TIMEOUT_S


async def test_fifty_concurrent_callers(pool: GradingPool) -> None:
    def batch(i: int) -> list[tuple[tuple[str, str | None], tuple[Verdict, str]]]:
        return [
            ((rf"\boxed{{{i}}}", str(i)), (Verdict.CORRECT, str(i))),
            ((rf"\boxed{{\frac{{{i}}}{{2}}}}", f"{i / 2}"), (Verdict.CORRECT, rf"\frac{{{i}}}{{2}}")),
            ((rf"\boxed{{{i + 1}}}", str(i)), (Verdict.INCORRECT, str(i + 1))),
            (("no answer", str(i)), (Verdict.NO_ANSWER, "")),
        ]

    depth_seen = 0

    async def sample_depth() -> None:
        nonlocal depth_seen
        while True:
            depth_seen = max(depth_seen, pool.queue_depth)
            assert pool.busy <= pool.size
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample_depth())
    batches = [batch(i) for i in range(50)]
    results = await asyncio.gather(*(pool.grade_many([it for it, _ in b], TIMEOUT_S) for b in batches))
    sampler.cancel()
    assert results == [expected_for(b) for b in batches]
    assert depth_seen > 0  # callers really queued for the two workers
    assert pool.busy == pool.queue_depth == 0
    assert pool.ready == WORKERS and pool.timeouts_total == 0


async def test_cancelled_caller_does_not_lose_a_worker(pool: GradingPool) -> None:
    caller = asyncio.create_task(pool.grade_many([(PATHOLOGICAL, "1")], TIMEOUT_S))
    await wait_until(lambda: pool.busy == 1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # The abandoned item still times out and its worker is replaced.
    await wait_until(lambda: pool.timeouts_total == 1 and pool.ready == WORKERS)
    assert await pool.grade_many([item for item, _ in MIXED], TIMEOUT_S) == expected_for(MIXED)


async def test_a_dead_worker_fails_only_its_item(pool: GradingPool) -> None:
    victim = pool.pids()[0]
    os.kill(victim, 9)
    await wait_until(lambda: process_gone(victim))
    items = [(rf"\boxed{{{i}}}", str(i)) for i in range(2 * WORKERS)]
    results = await pool.grade_many(items, TIMEOUT_S)
    failed = [r for r in results if r.error is not None]
    assert len(failed) == 1
    assert failed[0].verdict is Verdict.ERROR and "died" in failed[0].error
    assert all(r.verdict is Verdict.CORRECT for r in results if r.error is None)
    await wait_until(lambda: pool.ready == WORKERS)
    assert victim not in pool.pids()


async def test_malformed_items_fail_alone(pool: GradingPool) -> None:
    results = await pool.grade_many([(r"\boxed{1}", "1"), (None, "1"), ("x", "2", "3")], TIMEOUT_S)  # type: ignore[list-item]
    assert results[0] == GradeResult(Verdict.CORRECT, "1")
    assert all(r.error is not None and r.error.startswith("malformed item") for r in results[1:])
    assert [r.verdict for r in results[1:]] == [Verdict.ERROR, Verdict.ERROR]


async def test_arguments_and_lifecycle_errors() -> None:
    with pytest.raises(ValueError):
        GradingPool(0)
    with pytest.raises(ValueError):
        GradingPool(1, start_method="fork")
    grading_pool = GradingPool(1)
    with pytest.raises(PoolNotRunningError):
        await grading_pool.grade_many([(r"\boxed{1}", "1")], TIMEOUT_S)
    async with grading_pool:
        for bad in (0.0, -1.0, float("inf"), float("nan")):
            with pytest.raises(ValueError):
                await grading_pool.grade_many([(r"\boxed{1}", "1")], bad)
        assert await grading_pool.grade_many([], TIMEOUT_S) == []
    with pytest.raises(PoolNotRunningError):
        await grading_pool.grade_many([(r"\boxed{1}", "1")], TIMEOUT_S)


async def test_close_leaves_no_worker_alive() -> None:
    grading_pool = GradingPool(WORKERS)
    await grading_pool.start()
    pids = grading_pool.pids()
    # One item stuck in a worker and more callers queued behind the pool when it closes.
    stuck = asyncio.create_task(grading_pool.grade_many([(PATHOLOGICAL, "1")], 60.0))
    queued = asyncio.create_task(grading_pool.grade_many([(PATHOLOGICAL, "2")] * 2, 60.0))
    await wait_until(lambda: grading_pool.busy == WORKERS and grading_pool.queue_depth == 1)
    start = time.monotonic()
    await grading_pool.close()
    assert time.monotonic() - start < 5.0  # close does not wait for the stuck items
    for caller in (stuck, queued):
        with pytest.raises(PoolNotRunningError):
            await caller
    assert all(process_gone(pid) for pid in pids)
    assert not [p for p in multiprocessing.active_children() if p.name == "puremesh-verify-grader"]
    assert grading_pool.ready == 0
    await grading_pool.close()  # idempotent
