"""What the learner knows about each rollout replica: the version it holds, when it was last
seen, whether it watches now; and waiting until replicas hold a version (the training loop's
barrier after a publish). Part of the learner's version store (store.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .broadcast import Broadcast


@dataclass(frozen=True)
class ReplicaState:
    """What the learner knows about one rollout replica.

    version: the version it reported when it opened WatchVersions, or the last version it
        fetched in full (FetchWeights, or the whole range over the bulk data plane), whichever
        happened last.
    last_seen: time.time() of its last WatchVersions open/close or full fetch.
    watching: it holds a WatchVersions stream open now.
    """

    version: int
    last_seen: float
    watching: bool


class ReplicaBook:
    """The replicas' states, thread-safe; every change notifies `changed`."""

    def __init__(self, changed: Broadcast) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, ReplicaState] = {}
        self._watching: dict[str, int] = {}
        self._changed = changed

    def states(self) -> dict[str, ReplicaState]:
        """replica_id -> ReplicaState, a copy."""
        with self._lock:
            return dict(self._states)

    def record(self, replica_id: str, version: int | None = None, watching: int = 0) -> None:
        """`replica_id` holds `version` (None: unchanged) and opened (+1) or closed (-1) a
        WatchVersions stream."""
        with self._lock:
            count = self._watching.get(replica_id, 0) + watching
            self._watching[replica_id] = count
            previous = self._states.get(replica_id)
            if version is None:
                version = previous.version if previous is not None else 0
            self._states[replica_id] = ReplicaState(int(version), time.time(), count > 0)
        self._changed.notify()

    async def wait_for(
        self,
        version: int,
        replicas: Iterable[str] | int,
        timeout: float | None,
        closed: Callable[[], bool],
    ) -> dict[str, ReplicaState]:
        """Wait until replicas hold `version` or newer: every id in `replicas`, or (an int) at
        least that many replicas. Returns the replicas that do; TimeoutError after `timeout` s
        (naming the laggards); RuntimeError once `closed()`."""
        wanted = replicas if isinstance(replicas, int) else frozenset(replicas)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    epoch = self._changed.epoch
                    result = _there(self.states(), version, wanted)
                    if result is not None:
                        return result
                    if closed():
                        raise RuntimeError("the publisher closed while waiting for replicas")
                    await self._changed.wait(epoch)
        except TimeoutError:
            detail = _laggards(self.states(), version, wanted)
            raise TimeoutError(f"replicas not at version {version} after {timeout} s; {detail}") from None


def _there(
    states: dict[str, ReplicaState], version: int, wanted: frozenset[str] | int
) -> dict[str, ReplicaState] | None:
    """The replicas at `version` or newer, if they are the wanted ones; else None."""
    there = {rid: state for rid, state in states.items() if state.version >= version}
    if isinstance(wanted, int):
        return there if len(there) >= wanted else None
    return there if wanted <= there.keys() else None


def _laggards(states: dict[str, ReplicaState], version: int, wanted: frozenset[str] | int) -> str:
    if isinstance(wanted, int):
        there = sum(state.version >= version for state in states.values())
        return f"{there} of the {wanted} wanted are"
    lagging = {rid: states[rid].version if rid in states else None for rid in sorted(wanted)}
    return "versions now: " + ", ".join(
        f"{rid} {'never seen' if v is None else v}" for rid, v in lagging.items() if v is None or v < version
    )
