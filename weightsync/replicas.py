"""What the learner knows about each rollout replica, and waiting until replicas hold a version
(the training loop's barrier after a publish). Part of the learner's version store (store.py).

The rules (weights.proto's header, "Holding a version"):

- a replica id becomes *known* when it opens WatchVersions (a subscriber); nothing else creates
  a record, so ids that only download are not tracked at all;
- the learner notes the byte ranges it serves to a known id, per version (FetchWeights chunks,
  bulk ranges, noted as they go out); a transfer is *complete* once they cover the version;
- ConfirmVersion after a complete transfer, with the version's run and SHA-256, makes the
  replica hold that version. Nothing else does: the version a replica reports when it
  subscribes is kept as `reported`, for logs, and never trusted;
- records of replicas that are not watching expire after `ttl_s`, and there are at most
  `max_records` of them (the oldest that are not watching go first): made-up ids cannot grow
  the memory or the metrics' label sets without bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .broadcast import Broadcast

DEFAULT_TTL_S = 600.0
DEFAULT_MAX_RECORDS = 4096
# A subscriber that has never completed a transfer and has watched this long is not waited for.
DEFAULT_IDLE_GRACE_S = 10.0
# How often a waiting barrier looks again although nothing changed (idle subscribers age).
_WAIT_TICK_S = 1.0


class ConfirmRefused(ValueError):
    """A ConfirmVersion that does not meet the rules above; the message says which."""


@dataclass(frozen=True)
class ReplicaState:
    """What the learner knows about one rollout replica.

    version: the newest version it confirmed (0: none yet).
    last_seen: time.time() of its last subscription, transfer or confirmation.
    watching: it holds a WatchVersions stream open now.
    reported / reported_run: the version, and its run, it said it held when it last subscribed
        (not trusted; a fresh learner looks at the runs to see replicas of an earlier run).
    """

    version: int
    last_seen: float
    watching: bool
    reported: int = 0
    reported_run: str = ""


@dataclass
class _Record:
    subscribed_at: float
    last_seen: float
    watching: int = 0
    version: int = 0
    reported: int = 0
    reported_run: str = ""
    complete: int = 0  # complete transfers seen
    sent: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # version -> merged ranges

    def state(self) -> ReplicaState:
        return ReplicaState(self.version, self.last_seen, self.watching > 0, self.reported, self.reported_run)


def _merge(ranges: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """`ranges` (sorted, disjoint) with [start, stop) added, adjacent ranges joined."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted([*ranges, (start, stop)]):
        if merged and low <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


class ReplicaBook:
    """The replicas' records, thread-safe; every change notifies `changed`."""

    def __init__(
        self,
        changed: Broadcast,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_records: int = DEFAULT_MAX_RECORDS,
        idle_grace_s: float = DEFAULT_IDLE_GRACE_S,
    ) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._changed = changed
        self.ttl_s = ttl_s
        self.max_records = max_records
        self.idle_grace_s = idle_grace_s

    def states(self) -> dict[str, ReplicaState]:
        """replica_id -> ReplicaState, a copy (expired records dropped first)."""
        with self._lock:
            self._expire(time.time())
            return {rid: record.state() for rid, record in self._records.items()}

    def subscribed(self, replica_id: str, reported: int, reported_run: str = "") -> None:
        """`replica_id` opened a WatchVersions stream, saying it holds `reported` of `reported_run`."""
        now = time.time()
        with self._lock:
            record = self._records.get(replica_id)
            if record is None:
                self._expire(now, room_for=1)
                record = self._records[replica_id] = _Record(subscribed_at=now, last_seen=now)
            record.watching += 1
            record.reported, record.reported_run, record.last_seen = int(reported), reported_run, now
        self._changed.notify()

    def unsubscribed(self, replica_id: str) -> None:
        with self._lock:
            record = self._records.get(replica_id)
            if record is not None:
                record.watching = max(0, record.watching - 1)
                record.last_seen = time.time()
        self._changed.notify()

    def sent(self, replica_id: str, version: int, start: int, stop: int) -> None:
        """The bytes [start, stop) of `version` went out to `replica_id` (ignored unless known)."""
        with self._lock:
            record = self._records.get(replica_id)
            if record is None or stop < start:
                return
            record.sent[version] = _merge(record.sent.get(version, []), start, stop)
            record.last_seen = time.time()

    def confirm(self, replica_id: str, version: int, total_bytes: int) -> None:
        """`replica_id` holds `version` (run and SHA-256 checked by the caller); ConfirmRefused
        unless it is known and the version went out to it in full."""
        with self._lock:
            record = self._records.get(replica_id)
            if record is None:
                raise ConfirmRefused(f"replica {replica_id!r} never subscribed (WatchVersions)")
            if record.sent.get(version, [(0, 0)]) != [(0, total_bytes)] and total_bytes:
                raise ConfirmRefused(
                    f"no complete transfer of version {version} to replica {replica_id!r} was seen"
                )
            record.sent.pop(version, None)
            record.complete += 1
            record.version = max(record.version, version)
            record.last_seen = time.time()
        self._changed.notify()

    def forget(self, version: int) -> None:
        """An evicted version: its transfer records go."""
        with self._lock:
            for record in self._records.values():
                record.sent.pop(version, None)

    def _expire(self, now: float, room_for: int = 0) -> None:
        """Drop records not watching for ttl_s; then the oldest not watching beyond max_records."""
        stale = [rid for rid, r in self._records.items() if not r.watching and now - r.last_seen > self.ttl_s]
        for rid in stale:
            del self._records[rid]
        excess = len(self._records) + room_for - self.max_records
        if excess > 0:
            idle = sorted((r.last_seen, rid) for rid, r in self._records.items() if not r.watching)
            for _, rid in idle[:excess]:
                del self._records[rid]

    # ------------------------------------------------------------------ the barrier

    def _waited_for(self, now: float) -> dict[str, _Record]:
        """The watching replicas a barrier waits for: not those that never completed a transfer
        and have watched longer than idle_grace_s (idle subscribers, made-up ids)."""
        return {
            rid: r
            for rid, r in self._records.items()
            if r.watching and (r.complete or now - r.subscribed_at <= self.idle_grace_s)
        }

    def _there(self, version: int, wanted: frozenset[str] | int) -> dict[str, ReplicaState] | None:
        with self._lock:
            now = time.time()
            self._expire(now)
            there = {rid: r.state() for rid, r in self._records.items() if r.version >= version}
            if isinstance(wanted, int):
                enough = min(wanted, len(self._waited_for(now)))
                return there if len(there) >= enough else None
            return there if wanted <= there.keys() else None

    async def wait_for(
        self,
        version: int,
        replicas: Iterable[str] | int,
        timeout: float | None,
        closed: Callable[[], bool],
    ) -> dict[str, ReplicaState]:
        """Wait until replicas hold `version` or newer: every id in `replicas`; or, for an int n,
        n of them, or every watching replica that is not idle when fewer watch. Returns the
        replicas that do; TimeoutError after `timeout` s (naming the laggards); RuntimeError
        once `closed()`."""
        wanted = replicas if isinstance(replicas, int) else frozenset(replicas)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    epoch = self._changed.epoch
                    result = self._there(version, wanted)
                    if result is not None:
                        return result
                    if closed():
                        raise RuntimeError("the publisher closed while waiting for replicas")
                    try:
                        async with asyncio.timeout(_WAIT_TICK_S):
                            await self._changed.wait(epoch)
                    except TimeoutError:
                        continue
        except TimeoutError:
            detail = _laggards(self.states(), version, wanted)
            raise TimeoutError(f"replicas not at version {version} after {timeout} s; {detail}") from None


def _laggards(states: dict[str, ReplicaState], version: int, wanted: frozenset[str] | int) -> str:
    if isinstance(wanted, int):
        there = sum(state.version >= version for state in states.values())
        return f"{there} of the {wanted} wanted are"
    lagging = {rid: states[rid].version if rid in states else None for rid in sorted(wanted)}
    return "versions now: " + ", ".join(
        f"{rid} {'never seen' if v is None else v}" for rid, v in lagging.items() if v is None or v < version
    )
