"""The read-write gate that keeps weight swaps out of running generations (see engine.py,
"Versions"): generations hold the read side, a swap holds the write side, and a waiting swap
keeps new generations out so a steady stream of requests cannot starve it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class ReadWriteGate:
    """An asyncio read-write gate that prefers writers.

    Any number of readers (generations) hold it together; a writer (a weight swap) holds it
    alone. A writer that is waiting keeps new readers out, so it gets in as soon as the readers
    already inside have left. Releases are synchronous, so they are safe in callbacks and
    `finally` blocks. Use from one event loop only.
    """

    def __init__(self) -> None:
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def readers(self) -> int:
        return self._readers

    @property
    def writing(self) -> bool:
        return self._writing

    @property
    def writers_waiting(self) -> int:
        return self._writers_waiting

    async def acquire_read(self) -> None:
        while self._writing or self._writers_waiting:
            await self._wait()
        self._readers += 1

    def release_read(self) -> None:
        if self._readers <= 0:
            raise RuntimeError("release_read without a matching acquire_read")
        self._readers -= 1
        if self._readers == 0:
            self._wake()

    async def acquire_write(self) -> None:
        self._writers_waiting += 1
        try:
            while self._writing or self._readers:
                await self._wait()
        except BaseException:
            self._writers_waiting -= 1
            self._wake()  # readers held back by this writer may go on
            raise
        self._writers_waiting -= 1
        self._writing = True

    def release_write(self) -> None:
        if not self._writing:
            raise RuntimeError("release_write without a matching acquire_write")
        self._writing = False
        self._wake()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        await self.acquire_write()
        try:
            yield
        finally:
            self.release_write()

    async def _wait(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        finally:
            if future in self._waiters:
                self._waiters.remove(future)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
