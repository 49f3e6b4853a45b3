"""A wake-up call across threads and event loops, for the learner's version store.

`publish` runs on the training loop's thread, the WeightService on an event loop: `Broadcast`
lets the one wake every coroutine waiting on the other, without lost wake-ups.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class Broadcast:
    """Wakes every waiter, on whatever event loop it waits, when `notify` is called from any
    thread. `epoch` counts notifications: read it before checking a condition, then
    `wait(epoch)` returns at once if anything changed in between (no lost wake-ups)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.epoch = 0

    def notify(self) -> None:
        with self._lock:
            self.epoch += 1
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there
                loop.call_soon_threadsafe(_resolve, future)

    async def wait(self, epoch: int) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._lock:
            if self.epoch != epoch:
                return
            self._waiters.append(entry)
        try:
            await future
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove(entry)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
