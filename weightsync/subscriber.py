"""The replica's subscriber: keeps a sink (the rollout engine) on the learner's newest version.

`WeightSubscriber` takes a `WeightFetcher` (fetcher.py) built by its caller, and a
`WeightSink`: `sync_once` pulls the current version (a replica does it before it reports
ready), `run` follows every new one until stopped, reconnecting with backoff when the learner
goes away. The sink copies the tensors it is given (they are views of the fetcher's buffer,
which is reused for the next version).

Runs: a version is new when it is newer than the sink's, or of another learner run than the
sink's (a learner that started fresh): the replica then switches to that run, whatever the
version numbers say. After each swap the subscriber confirms the version to the learner
(ConfirmVersion), which only then counts the replica as holding it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc
import torch
from prometheus_client import Counter

from puremesh.rpc.client import RpcError
from puremesh.weights.v1 import weights_pb2

from .fetcher import WeightFetcher
from .transport import Announcement, FetchedVersion, WeightSyncError

log = logging.getLogger(__name__)

# Reconnect backoff never grows past retry.max_backoff_s; neither does the channel's own.
RECONNECT_ATTEMPT_CAP = 16

SYNC_FAILURES = Counter(
    "puremesh_rollout_weight_sync_failures_total",
    "Versions that could not be fetched or loaded, by stage",
    ["stage"],  # fetch | load | confirm
)


class WeightSink(Protocol):
    """Where versions go: the rollout Engine satisfies it."""

    @property
    def policy_version(self) -> int: ...

    @property
    def policy_run(self) -> str:
        """The learner run of policy_version ("" = the weights from disk)."""
        ...

    async def load_weights(
        self, tensors: Sequence[tuple[str, torch.Tensor]], version: int, run_id: str = ""
    ) -> None:
        """Copy the (name, tensor) pairs into the model, which now holds `version` of `run_id`."""
        ...


def held_run(sink: WeightSink) -> str:
    """The sink's run ("" for sinks that know no runs)."""
    return getattr(sink, "policy_run", "")


def is_new(announcement: Announcement, sink: WeightSink) -> bool:
    """Whether `announcement` is worth swapping in: another run, or a newer version."""
    return announcement.run_id != held_run(sink) or announcement.version > sink.policy_version


class WeightSubscriber:
    """Keeps `sink` on the newest version `fetcher`'s learner publishes.

    `await sync_once(timeout)` before reporting ready, then `start()` (or `await run()`),
    `await stop()` (which closes the fetcher: the subscriber owns it) before closing the sink.
    `on_version(v)` is called after each swap. `reuse_buffer` keeps the last version's bytes
    (host memory, one model's size) to receive the next one into; it relies on the sink copying
    the tensors, as both engine backends do.
    """

    def __init__(
        self,
        sink: WeightSink,
        fetcher: WeightFetcher,
        *,
        on_version: Callable[[int], None] | None = None,
        reuse_buffer: bool = True,
    ) -> None:
        self.sink = sink
        self.fetcher = fetcher
        self.retry = fetcher.retry
        self.reuse_buffer = reuse_buffer
        self.on_version = on_version
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def target(self) -> str:
        return self.fetcher.target

    async def fetch(self, announcement: Announcement) -> int:
        """Download the announced version and swap it into the sink (skipped unless it is new:
        `is_new`), then confirm it to the learner. Returns the sink's version."""
        sink = self.sink
        if not is_new(announcement, sink):
            return sink.policy_version
        try:
            fetched = await self.fetcher.download(announcement)
        except (RpcError, WeightSyncError):
            SYNC_FAILURES.labels("fetch").inc()
            raise
        if not is_new(announcement, sink):  # a concurrent swap got there first
            return sink.policy_version
        try:
            await sink.load_weights(fetched.tensors(), announcement.version, announcement.run_id)
        except Exception:
            SYNC_FAILURES.labels("load").inc()
            self._recycle(fetched)
            raise
        # (not after a cancellation: the sink's copy may still be reading the buffer)
        self._recycle(fetched)
        if self.on_version is not None:
            self.on_version(sink.policy_version)
        await self._confirm(fetched)
        return sink.policy_version

    async def _confirm(self, fetched: FetchedVersion) -> None:
        try:
            await self.fetcher.confirm(fetched)
        except RpcError as error:  # the swap stands; the learner just does not count it yet
            SYNC_FAILURES.labels("confirm").inc()
            log.warning(
                "weight sync: %s did not take the confirmation of version %d: %s",
                self.target,
                fetched.version,
                error,
            )

    def _recycle(self, fetched: FetchedVersion) -> None:
        if self.reuse_buffer:  # the sink is done with the tensors, views of the buffer
            self.fetcher.recycle(fetched)

    async def sync_once(self, timeout: float) -> int:
        """Pull the learner's current version if it is newer than the sink's.

        Retries with backoff while the learner does not answer or the download fails, up to
        `timeout` s for reaching it (a download that started runs to its own deadline). Returns
        the sink's version (unchanged if the learner has nothing newer, e.g. nothing published
        yet). TimeoutError if it did not succeed in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempt = 0
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    found = await self.fetcher.current(self.sink.policy_version, held_run(self.sink))
                if found is None:
                    return self.sink.policy_version
                return await self.fetch(found)
            except (RpcError, WeightSyncError) as error:
                last = error
            except TimeoutError:
                raise TimeoutError(
                    f"the learner at {self.target} did not answer within {timeout} s"
                ) from None
            pause = self.retry.backoff(min(attempt, RECONNECT_ATTEMPT_CAP))
            attempt += 1
            if loop.time() + pause >= deadline:
                raise TimeoutError(
                    f"could not pull the current version from {self.target} within {timeout} s: {last}"
                ) from last
            await asyncio.sleep(pause)

    def start(self) -> asyncio.Task[None]:
        """Run `run()` as a background task."""
        if self._task is None or self._task.done():
            self._stopped = False
            self._task = asyncio.create_task(self.run(), name=f"weight-sync {self.target}")
        return self._task

    async def run(self) -> None:
        """Follow the learner until `stop()`: swap in every announced version newer than the
        sink's (the newest only, when several came during a swap); reconnect with backoff when
        the stream ends or fails (a restarting learner answers UNAVAILABLE meanwhile). A version
        that cannot be fetched or loaded is logged and skipped; the next announcement (or
        reconnect, which announces the current version) tries again."""
        if self._task is None:
            self._task = asyncio.current_task()
        failures = 0
        while not self._stopped:
            try:
                await self._follow()
                failures = 0
            except RpcError as error:
                if error.code in self.retry.retryable:  # down, restarting or busy: once per outage
                    level = logging.DEBUG if failures else logging.WARNING
                    log.log(level, "weight sync: %s unavailable (%s); retrying", self.target, error.details)
                else:
                    log.warning("weight sync from %s: %s", self.target, error)
                failures += 1
            except (WeightSyncError, ValueError, RuntimeError) as error:
                # RuntimeError: EngineNotReadyError; ValueError: weights the engine refused
                log.warning("weight sync from %s: %s", self.target, error)
                failures += 1
            except Exception:
                log.exception("weight sync from %s failed", self.target)
                failures += 1
            await asyncio.sleep(self.retry.backoff(min(failures, RECONNECT_ATTEMPT_CAP)))

    async def _follow(self) -> None:
        """One WatchVersions stream, until it ends; returns when the learner ended it or went
        away after answering (reconnect at once), raises if it never answered."""
        call = self.fetcher.watch(self.sink.policy_version, held_run(self.sink))
        inbox: asyncio.Queue[weights_pb2.VersionAnnouncement | RpcError | None] = asyncio.Queue()
        answered = False

        async def read() -> None:
            nonlocal answered
            try:
                await call.initial_metadata()
                answered = not call.done()  # headers came: the learner accepted the stream
                async for message in call:
                    inbox.put_nowait(message)
                inbox.put_nowait(None)
            except grpc.aio.AioRpcError as error:
                inbox.put_nowait(RpcError(error.code(), error.details() or "", self.target))

        reader = asyncio.create_task(read())
        try:
            while True:
                items = [await inbox.get()]
                while not inbox.empty():
                    items.append(inbox.get_nowait())
                announcements = [i for i in items if isinstance(i, weights_pb2.VersionAnnouncement)]
                if announcements:  # only the newest matters
                    newest = max(announcements, key=lambda a: a.version)
                    await self.fetch(Announcement.from_proto(newest))
                if None in items:
                    return
                error = next((i for i in items if isinstance(i, RpcError)), None)
                if error is not None:
                    if error.code == grpc.StatusCode.UNAVAILABLE and answered:
                        log.info("weight sync: %s went away (%s); reconnecting", self.target, error.details)
                        return
                    raise error
        finally:
            call.cancel()
            reader.cancel()

    async def stop(self) -> None:
        """Stop following and close the fetcher (an in-flight download is cancelled)."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])  # its cancellation is not ours to raise
        await self.fetcher.close()
