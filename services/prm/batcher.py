"""Dynamic batching: concurrent scoring requests are coalesced into few forward passes.

Each `submit` is one request: a list of items (input_ids, readout_positions), as built by
layout.prm_input. A single worker task collects queued requests into a batch and runs ONE call
of `forward` (for example PrmScorer.score) on all their items, in a worker thread
(asyncio.to_thread), so the event loop stays free while the model runs. A batch closes when

* the next queued request would push it over `max_batch_tokens` (padded tokens: rows * longest
  row, the size of the right-padded tensor), or
* `max_wait_ms` have passed since its oldest request was queued,

whichever comes first. Requests are never split across batches, except that a request that is
over the budget by itself runs alone, split into as many forward calls as it needs (a single
item over the budget still runs, alone). Forward calls run one at a time. When `forward` raises,
exactly the requests of that call fail with its exception; the batcher keeps serving.

With `enabled=False` every submit runs its own forward call (same splitting and one-at-a-time
rule): the "batching off" baseline of the benchmark.

Give `forward` a per-call cap at least `max_batch_tokens` (PrmScorer's max_tokens_per_forward)
so that one batch is one forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Item = tuple[Sequence[int], Sequence[int]]
Forward = Callable[[list[Item]], list[list[float]]]

log = logging.getLogger(__name__)


class BatcherStopped(RuntimeError):
    """The batcher is not running (not started yet, or stopped): the request was not scored."""


class BatcherFull(RuntimeError):
    """The queue holds `max_queue` requests already: retry later (overload)."""


class BatcherTimeout(RuntimeError):
    """The request's scores did not come within its `timeout` (it is withdrawn if not run yet)."""


@dataclass(frozen=True)
class BatchStats:
    """What one forward call did; passed to the `on_batch` hook after every call."""

    requests: int  # requests (submits) served by this call, 1 for a part of a split request
    items: int  # rows of the forward pass
    tokens: int  # padded tokens: rows * longest row
    real_tokens: int  # sum of row lengths
    seconds: float  # wall time of the forward call
    ok: bool  # False when forward raised


@dataclass
class _Request:
    items: list[Item]
    future: asyncio.Future[list[list[float]]]
    queued_at: float
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [len(input_ids) for input_ids, _ in self.items]


def padded_tokens(lengths: Sequence[int]) -> int:
    """rows * longest row: the size of a right-padded batch."""
    return len(lengths) * max(lengths, default=0)


def split_by_budget(lengths: Sequence[int], budget: int) -> list[range]:
    """Consecutive index ranges whose padded size stays within `budget` (each range holds at
    least one index, so a single row over the budget gets a range of its own)."""
    ranges: list[range] = []
    start, rows, longest = 0, 0, 0
    for i, length in enumerate(lengths):
        if rows and (rows + 1) * max(longest, length) > budget:
            ranges.append(range(start, i))
            start, rows, longest = i, 0, 0
        rows, longest = rows + 1, max(longest, length)
    if rows:
        ranges.append(range(start, len(lengths)))
    return ranges


class DynamicBatcher:
    """Coalesces concurrent `submit` calls into few `forward` calls (see the module docstring).

    Args:
        forward: blocking function items -> one score list per item, in order. Runs in a worker
            thread, one call at a time.
        max_batch_tokens: budget of one forward call in padded tokens (rows * longest row).
        max_wait_ms: how long the oldest queued request may wait for company.
        enabled: False = no coalescing, one forward call per submit.
        max_queue: most requests waiting at once; a submit beyond it raises BatcherFull.
            None = unbounded.
        on_batch: called with a BatchStats after every forward call (on the event loop; must
            not block). Exceptions it raises are logged and ignored.

    Metrics read as attributes: `queue_depth` / `queued_items` (waiting now), `last_batch_requests`,
    `last_batch_items`, `last_batch_tokens` (padded), `forward_calls` (total).

    Lifecycle: `await start()` inside the running event loop; `await stop()` lets the forward
    call in flight finish, then fails every request still waiting with BatcherStopped.
    """

    def __init__(
        self,
        forward: Forward,
        *,
        max_batch_tokens: int,
        max_wait_ms: float,
        enabled: bool = True,
        max_queue: int | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None, got {max_queue}")
        self._forward = forward
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.enabled = enabled
        self.max_queue = max_queue
        self.on_batch = on_batch

        self.last_batch_requests = 0
        self.last_batch_items = 0
        self.last_batch_tokens = 0
        self.forward_calls = 0

        self._pending: deque[_Request] = deque()
        self._wakeup: asyncio.Event | None = None
        self._forward_lock: asyncio.Lock | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running = False

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    async def start(self) -> None:
        """Start the worker task on the running event loop. Idempotent while running."""
        if self._running:
            return
        self._wakeup = asyncio.Event()
        self._forward_lock = asyncio.Lock()
        self._running = True
        if self.enabled:
            self._worker = asyncio.create_task(self._work(), name="prm-dynamic-batcher")

    async def stop(self) -> None:
        """Stop taking requests, let the forward call in flight finish (its callers get their
        scores), and fail every request still waiting with BatcherStopped. Idempotent."""
        if not self._running:
            return
        self._running = False
        if self._wakeup is not None:
            self._wakeup.set()
        if self._worker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(
                    BatcherStopped("the PRM batcher stopped before this request ran")
                )

    # --- metrics --------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a forward call (not counting the one in flight)."""
        return len(self._pending)

    @property
    def queued_items(self) -> int:
        """Items (forward rows) waiting for a forward call."""
        return sum(len(request.items) for request in self._pending)

    # --- requests -------------------------------------------------------------------------

    async def submit(self, items: Sequence[Item], timeout: float | None = None) -> list[list[float]]:
        """Score `items`; returns one score list per item, in order.

        Raises BatcherStopped when not running, BatcherFull when the queue is full,
        BatcherTimeout when the scores took longer than `timeout` s (None: no bound), and
        whatever `forward` raised for the forward call this request was part of.
        Cancelling the caller withdraws the request if it has not run yet.
        """
        try:
            async with asyncio.timeout(timeout):
                return await self._submit(items)
        except TimeoutError:
            raise BatcherTimeout(f"the PRM scores did not come within {timeout:.1f} s") from None

    async def _submit(self, items: Sequence[Item]) -> list[list[float]]:
        items = list(items)
        if not self._running:
            raise BatcherStopped("the PRM batcher is not running")
        if not items:
            return []
        if not self.enabled:
            return await self._run_alone(items)
        if self.max_queue is not None and len(self._pending) >= self.max_queue:
            raise BatcherFull(f"the PRM scoring queue is full ({self.max_queue} requests waiting)")
        loop = asyncio.get_running_loop()
        request = _Request(items, loop.create_future(), loop.time())
        self._pending.append(request)
        assert self._wakeup is not None
        self._wakeup.set()
        return await request.future

    # --- the worker -----------------------------------------------------------------------

    async def _work(self) -> None:
        assert self._wakeup is not None
        while self._running:
            self._drop_withdrawn()
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = await self._collect()
            if not self._running:
                # stop() fails whatever is still queued; put the collected requests back first.
                self._pending.extendleft(reversed(batch))
                return
            if batch:
                try:
                    await self._dispatch(batch)
                except Exception as error:  # a bug here must not kill the worker
                    log.exception("PRM batch dispatch failed")
                    for request in batch:
                        if not request.future.done():
                            request.future.set_exception(error)

    async def _collect(self) -> list[_Request]:
        """Wait until the batch at the head of the queue is full or its oldest request has
        waited max_wait_s, then pop and return it."""
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            self._drop_withdrawn()
            if not self._pending or not self._running:
                return []
            take, full = self._plan()
            remaining = self._pending[0].queued_at + self.max_wait_s - loop.time()
            if full or remaining <= 0:
                return [self._pending.popleft() for _ in range(take)]
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _plan(self) -> tuple[int, bool]:
        """(how many head requests form the next batch, whether it is full)."""
        rows, longest = 0, 0
        for taken, request in enumerate(self._pending):
            new_rows = rows + len(request.items)
            new_longest = max(longest, *request.lengths)
            if new_rows * new_longest > self.max_batch_tokens:
                # The head request alone is over budget: it runs alone (split).
                return max(taken, 1), True
            rows, longest = new_rows, new_longest
        return len(self._pending), rows * longest >= self.max_batch_tokens

    def _drop_withdrawn(self) -> None:
        if any(request.future.done() for request in self._pending):
            self._pending = deque(request for request in self._pending if not request.future.done())

    async def _dispatch(self, batch: list[_Request]) -> None:
        if len(batch) == 1:
            request = batch[0]
            try:
                scores = await self._run_alone(request.items)
            except Exception as error:
                _fail(request, error)
            else:
                _resolve(request, scores)
            return
        items = [item for request in batch for item in request.items]
        try:
            scores = await self._call(items, len(batch))
        except Exception as error:
            for request in batch:
                _fail(request, error)
            return
        offset = 0
        for request in batch:
            _resolve(request, scores[offset : offset + len(request.items)])
            offset += len(request.items)

    async def _run_alone(self, items: list[Item]) -> list[list[float]]:
        """One request by itself: as few forward calls as the budget allows."""
        lengths = [len(input_ids) for input_ids, _ in items]
        scores: list[list[float]] = []
        for part in split_by_budget(lengths, self.max_batch_tokens):
            scores.extend(await self._call(items[part.start : part.stop], 1))
        return scores

    async def _call(self, items: list[Item], requests: int) -> list[list[float]]:
        """One forward call in a worker thread, one at a time; records metrics."""
        assert self._forward_lock is not None
        lengths = [len(input_ids) for input_ids, _ in items]
        async with self._forward_lock:
            started = time.perf_counter()
            ok = False
            try:
                scores = await asyncio.to_thread(self._forward, items)
                if len(scores) != len(items):
                    raise RuntimeError(f"forward returned {len(scores)} results for {len(items)} items")
                ok = True
                return scores
            finally:
                self.forward_calls += 1
                self.last_batch_requests = requests
                self.last_batch_items = len(items)
                self.last_batch_tokens = padded_tokens(lengths)
                stats = BatchStats(
                    requests,
                    len(items),
                    self.last_batch_tokens,
                    sum(lengths),
                    time.perf_counter() - started,
                    ok,
                )
                if self.on_batch is not None:
                    try:
                        self.on_batch(stats)
                    except Exception:
                        log.exception("on_batch hook failed")


def _resolve(request: _Request, scores: list[list[float]]) -> None:
    if not request.future.done():
        request.future.set_result(scores)


def _fail(request: _Request, error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)
