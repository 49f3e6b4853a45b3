"""A process pool that grades answers with a hard per-item timeout (asyncio API).

Design
------
- One dedicated worker process (worker.py) per slot, each with its own duplex pipe. Workers
  start with the "forkserver" method (never "fork": the host process runs gRPC threads); the
  fork server imports and warms up sympy and math-verify once (module `_forkserver_warmup`), so
  a replacement worker starts in tens of milliseconds. Every worker also runs one real
  comparison before it takes work.
- Idle workers wait in an asyncio queue. An item takes a worker, sends ``(answer, ground_truth)``
  down its pipe and waits for the reply with ``loop.add_reader`` (no threads). Replies are read
  in the event loop; nothing else blocks it.
- The cheap part of grading (`grading.classify`: answer extraction, NO_GROUND_TRUTH, NO_ANSWER)
  runs in the host process, on a thread (never on the event loop: a call of 4096 long
  responses would stall it); only the math-verify comparison goes to a worker.
- Waiting for a free worker is bounded (`queue_timeout_s`): past it the call fails with
  `PoolBusyError` (the service answers RESOURCE_EXHAUSTED, or DEADLINE_EXCEEDED when the
  caller's deadline was the bound).
- Hard timeout: a worker that has not answered ``timeout_s`` seconds after it got the item is
  killed (SIGKILL) at once; that item alone yields ``Verdict.TIMEOUT``; a background task
  starts a replacement, which joins the idle queue once warm. A worker that dies (EOF on its
  pipe) is replaced the same way.
- Once a worker has an item, the exchange runs to completion even if the caller is cancelled
  (it is shielded), so a worker always goes back to the queue or is replaced, and a late reply
  can never be read as the answer to another item.

Results are `GradeResult` values: the verdict, the extracted answer and ``error``. ``error`` is
None unless grading itself failed (an exception inside the worker, a crashed worker, an item
that is not a pair of strings); the verdict is then ``Verdict.ERROR`` (never rewarded) and
``error`` says why. A pool that is not running raises `PoolNotRunningError` from `grade_many`.

The pool lives on one event loop: start it, use it and close it from the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass

from puremesh.contract.verdict import Verdict

from .grading import classify
from .worker import Worker, close_quietly, receive, stop_processes, worker_main

__all__ = ["DEFAULT_START_TIMEOUT_S", "GradeResult", "GradingPool", "PoolBusyError", "PoolNotRunningError"]

log = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT_S = 60.0
"""How long a new worker may take to import and warm up before its start counts as failed."""

_RESPAWN_FIRST_DELAY_S = 0.1  # backoff between failed attempts to replace a worker ...
_RESPAWN_MAX_DELAY_S = 10.0  # ... doubling up to this
_START_METHODS = ("forkserver", "spawn")
_FORKSERVER_PRELOAD = "puremesh.services.verify._forkserver_warmup"


@dataclass(frozen=True, slots=True)
class GradeResult:
    """The grade of one item. ``error`` is set only when grading itself failed."""

    verdict: Verdict
    answer: str
    error: str | None = None


class PoolNotRunningError(RuntimeError):
    """The pool was not started yet, or it is closed."""


class PoolBusyError(RuntimeError):
    """No worker became free within the call's queue timeout."""


def _classified(item: tuple[str, str | None]) -> tuple[GradeResult | None, str, str | None]:
    """(the grade if the host decides it alone, else None; the extracted answer; ground truth)."""
    try:
        response, ground_truth = item
        verdict, answer = classify(response, ground_truth)
    except Exception as exc:  # not a (str, str | None) pair
        return GradeResult(Verdict.ERROR, "", error=f"malformed item: {type(exc).__name__}: {exc}"), "", None
    if verdict is not None:
        return GradeResult(verdict, answer), answer, ground_truth
    return None, answer, ground_truth


class GradingPool:
    """``workers`` grading processes with a hard per-item timeout. See the module docstring.

    Usage::

        pool = GradingPool(workers=4)
        await pool.start()
        results = await pool.grade_many([(response, ground_truth), ...], timeout_s=5.0)
        await pool.close()

    or ``async with GradingPool(4) as pool: ...``.
    """

    def __init__(
        self,
        workers: int,
        *,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        start_method: str = "forkserver",
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if start_method not in _START_METHODS:
            raise ValueError(f"start_method must be one of {_START_METHODS}, got {start_method!r}")
        self._size = workers
        self._start_timeout_s = start_timeout_s
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # A hint that takes effect when the (process-wide) fork server starts: import sympy
            # and math-verify and warm them up once there instead of in every worker.
            self._ctx.set_forkserver_preload(["__main__", _FORKSERVER_PRELOAD])
        self._free: asyncio.Queue[Worker | None] = asyncio.Queue()
        self._workers: set[Worker] = set()  # live, warmed-up workers (idle or busy)
        self._exchanges: set[asyncio.Future[GradeResult]] = set()  # items in a worker
        self._replacements: set[asyncio.Task[None]] = set()  # workers being replaced
        self._started = False
        self._closed = False
        self._busy = 0
        self._waiting = 0
        self.timeouts_total = 0
        """Items that hit the timeout since start."""
        self.restarts_total = 0
        """Workers killed or lost and replaced since start."""

    # ---- metrics -----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The configured number of workers."""
        return self._size

    @property
    def ready(self) -> int:
        """Live, warmed-up workers (idle or busy); below `size` while replacements start."""
        return len(self._workers)

    @property
    def busy(self) -> int:
        """Workers grading an item right now."""
        return self._busy

    @property
    def queue_depth(self) -> int:
        """Items waiting for a free worker."""
        return self._waiting

    @property
    def running(self) -> bool:
        return self._started and not self._closed

    def pids(self) -> list[int]:
        """Process ids of the live, warmed-up workers."""
        return sorted(w.pid for w in self._workers if w.pid is not None)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start all workers and wait until each has warmed up.

        With "forkserver" the first pool in a process also boots the fork server, which blocks
        the event loop while it imports sympy (about a second); later starts are quick.
        """
        if self._started or self._closed:
            raise RuntimeError("GradingPool.start() called twice or after close()")
        self._started = True
        try:
            workers = await asyncio.gather(*(self._spawn() for _ in range(self._size)))
        except BaseException:
            await self.close()
            raise
        for worker in workers:
            self._free.put_nowait(worker)
        log.info("grading pool ready: %d workers, pids %s", self._size, self.pids())

    async def close(self) -> None:
        """Terminate every worker and wait for them to exit. Idempotent.

        Items waiting for a worker or in flight raise `PoolNotRunningError`.
        """
        if self._closed:
            return
        self._closed = True
        for task in list(self._replacements):
            task.cancel()
        idle: list[Worker] = []
        while not self._free.empty():
            worker = self._free.get_nowait()
            if worker is not None:
                idle.append(worker)
        self._free.put_nowait(None)  # wakes the waiters, each passes it on
        workers = list(self._workers)
        self._workers.clear()
        for worker in workers:
            with contextlib.suppress(OSError, ValueError):
                worker.process.terminate()
        await asyncio.to_thread(stop_processes, workers)
        for worker in idle:  # busy workers' pipes are closed by their exchanges
            with contextlib.suppress(OSError):
                worker.conn.close()
        log.info("grading pool closed")

    async def __aenter__(self) -> GradingPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- grading -----------------------------------------------------------------------------

    async def grade_many(
        self,
        items: Sequence[tuple[str, str | None]],
        timeout_s: float,
        queue_timeout_s: float | None = None,
    ) -> list[GradeResult]:
        """Grade ``(response, ground_truth)`` pairs concurrently; one result per item, in order.

        ``timeout_s`` bounds the time each item spends in a worker. An item that exceeds it gets
        ``Verdict.TIMEOUT`` and its worker is replaced; no other item is affected. Waiting for
        a free worker is bounded by ``queue_timeout_s`` (None: unbounded), after which the call
        raises `PoolBusyError`. Raises ValueError for a non-positive or infinite ``timeout_s``
        and `PoolNotRunningError` before `start` or after `close`.
        """
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s!r}")
        if not self.running:
            raise PoolNotRunningError("grading pool is not running")
        classified = await asyncio.to_thread(lambda: [_classified(item) for item in items])
        loop = asyncio.get_running_loop()
        deadline = None if queue_timeout_s is None else loop.time() + queue_timeout_s
        return list(await asyncio.gather(*(self._grade_one(c, timeout_s, deadline) for c in classified)))

    async def _grade_one(
        self, classified: tuple[GradeResult | None, str, str | None], timeout_s: float, deadline: float | None
    ) -> GradeResult:
        decided, answer, ground_truth = classified
        if decided is not None:
            return decided
        worker = await self._acquire(deadline)
        # From here the worker is ours; the exchange completes even if our caller is cancelled.
        exchange = asyncio.ensure_future(self._exchange(worker, answer, ground_truth, timeout_s))
        self._exchanges.add(exchange)
        exchange.add_done_callback(self._exchange_done)
        return await asyncio.shield(exchange)

    def _exchange_done(self, exchange: asyncio.Future[GradeResult]) -> None:
        self._exchanges.discard(exchange)
        if not exchange.cancelled():
            exchange.exception()  # retrieved, also when the caller is gone (no "never retrieved")

    async def _acquire(self, deadline: float | None = None) -> Worker:
        if self._closed:
            raise PoolNotRunningError("grading pool is closed")
        self._waiting += 1
        try:
            async with asyncio.timeout_at(deadline):
                worker = await self._free.get()
        except TimeoutError:
            raise PoolBusyError(f"no grading worker was free in time ({self._size} busy)") from None
        finally:
            self._waiting -= 1
        if worker is None:  # close() woke us
            self._free.put_nowait(None)
            raise PoolNotRunningError("grading pool is closed")
        return worker

    async def _exchange(
        self, worker: Worker, answer: str, ground_truth: str | None, timeout_s: float
    ) -> GradeResult:
        self._busy += 1
        try:
            try:
                worker.conn.send((answer, ground_truth))
                ok, payload = await receive(worker.conn, timeout_s)
            except TimeoutError:
                self.timeouts_total += 1
                self._retire(worker, f"timed out after {timeout_s} s")
                return GradeResult(Verdict.TIMEOUT, answer)
            except (EOFError, OSError) as exc:
                if self._closed:
                    close_quietly(worker.conn)
                    raise PoolNotRunningError("grading pool closed during grading") from None
                self._retire(worker, f"died ({type(exc).__name__})")
                return GradeResult(Verdict.ERROR, answer, error="grading worker died")
        finally:
            self._busy -= 1
        if self._closed:
            close_quietly(worker.conn)
        else:
            self._free.put_nowait(worker)
        if ok:
            return GradeResult(Verdict.CORRECT if payload else Verdict.INCORRECT, answer)
        log.warning("grading failed in worker %s: %s", worker.pid, payload)
        return GradeResult(Verdict.ERROR, answer, error=f"grading failed: {payload}")

    # ---- workers -----------------------------------------------------------------------------

    async def _spawn(self) -> Worker:
        """Start one worker and wait until it has warmed up."""
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main, args=(child_conn,), name="puremesh-verify-grader", daemon=True
        )
        worker = Worker(process, parent_conn)
        try:
            process.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()  # so that the worker's death reads as EOF here
        try:
            pid = await receive(parent_conn, self._start_timeout_s)
        except BaseException:
            worker.kill()
            worker.reap()
            raise
        if self._closed:
            worker.kill()
            worker.reap()
            raise PoolNotRunningError("grading pool closed while a worker started")
        worker.pid = pid
        self._workers.add(worker)
        return worker

    def _retire(self, worker: Worker, reason: str) -> None:
        """Kill a worker now and replace it in the background."""
        worker.kill()
        if self._closed:  # close() reaps it
            close_quietly(worker.conn)
            return
        self._workers.discard(worker)
        self.restarts_total += 1
        log.warning("grading worker %s %s; replacing it", worker.pid, reason)
        task = asyncio.get_running_loop().create_task(self._replace(worker))
        self._replacements.add(task)
        task.add_done_callback(self._replacements.discard)

    async def _replace(self, old: Worker) -> None:
        await asyncio.to_thread(old.reap)
        delay = _RESPAWN_FIRST_DELAY_S
        while not self._closed:
            try:
                worker = await self._spawn()
            except PoolNotRunningError:
                return
            except Exception:
                log.exception("could not start a grading worker; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, _RESPAWN_MAX_DELAY_S)
                continue
            self._free.put_nowait(worker)
            return
