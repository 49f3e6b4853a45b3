"""The learner's end of TRANSPORT_NCCL: one NCCL group per replica, and the sends over them
(weights.proto "NCCL data plane"; groups and their threads: nccl_group.py).

`NcclSender.open` (OpenNcclGroup) mints a unique id for one replica id of this run, starts
joining as rank 0 on the group's own thread, and hands the id back over the authenticated
control plane; a group that is not joined within `setup_timeout_s` is destroyed. `send`
(SendNccl) broadcasts one retained version's bytes, staged through one device buffer of
`chunk_bytes`, within `transfer_deadline(bytes, setup_timeout_s, min_bytes_per_second)`. One send
runs at a time (the learner's GPU and link are shared; the replicas queue), so a dead peer holds
the others back for at most that deadline: the group is then destroyed and the call answers
DEADLINE_EXCEEDED.

A replica that leaves takes only its own group with it: its next send fails or times out, its
reopen replaces the group, or, when the groups are full, its group goes once the learner no
longer knows the replica (`_prune`). Groups are bounded by `max_groups`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import torch
from prometheus_client import Counter, Gauge

from puremesh.rpc.errors import DeadlineExceeded, InvalidArgument, NotFound, NotReady, Overloaded
from puremesh.weights.v1 import weights_pb2

from .nccl_group import RECEIVER_RANK, SENDER_RANK, WORLD_SIZE, GroupError, NcclBackend, PairGroup, send_bytes
from .servicer import transfer_deadline
from .store import VersionNotFound, WeightStore

log = logging.getLogger(__name__)

DEFAULT_SETUP_TIMEOUT_S = 30.0
DEFAULT_MAX_GROUPS = 64
DEFAULT_CHUNK_BYTES = 64 << 20
DEFAULT_MIN_BYTES_PER_SECOND = 256 << 20

GROUP_EVENTS = Counter(
    "puremesh_learner_weight_nccl_group_events_total",
    "NCCL groups with replicas: opened, and ended by reason",
    ["event"],  # opened | replaced | expired | setup | setup_timeout | transfer | transfer_timeout | closed
)
GROUPS = Gauge("puremesh_learner_weight_nccl_open_groups", "NCCL groups with replicas held now")
NCCL_SENT_BYTES = Counter(
    "puremesh_learner_weight_nccl_sent_bytes_total", "Tensor bytes broadcast to replicas over NCCL"
)


class NcclSender:
    """The learner's NCCL groups (module docstring). `backend`: nccl_group.VllmNccl in
    production; `device`: where the staging buffer and the communicators live."""

    def __init__(
        self,
        store: WeightStore,
        backend: NcclBackend,
        device: str = "cuda",
        *,
        setup_timeout_s: float = DEFAULT_SETUP_TIMEOUT_S,
        max_groups: int = DEFAULT_MAX_GROUPS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        min_bytes_per_second: float = DEFAULT_MIN_BYTES_PER_SECOND,
    ) -> None:
        self.store, self.backend, self.device = store, backend, torch.device(device)
        self.setup_timeout_s, self.max_groups = setup_timeout_s, max_groups
        self.chunk_bytes, self.min_bytes_per_second = chunk_bytes, min_bytes_per_second
        self._groups: dict[str, tuple[int, PairGroup]] = {}
        self._ids = itertools.count(1)
        self._sending = asyncio.Lock()
        self._staging: torch.Tensor | None = None
        self._watchers: set[asyncio.Task] = set()

    def _check(self, replica_id: str, run_id: str) -> None:
        if run_id != self.store.run_id:
            raise InvalidArgument(f"run {run_id!r} is not this learner's run {self.store.run_id!r}")
        reason = self.backend.unavailable()
        if reason is not None:
            raise NotReady(f"this learner has no NCCL data plane: {reason}")

    def open(self, replica_id: str, run_id: str) -> weights_pb2.NcclGroup:
        """OpenNcclGroup (weights.proto); call from the event loop."""
        self._check(replica_id, run_id)
        old = self._groups.pop(replica_id, None)
        if old is not None:
            self._drop(replica_id, old[1], GroupError("replaced", "the replica opened a new group"))
        if len(self._groups) >= self.max_groups:
            self._prune()
        if len(self._groups) >= self.max_groups:
            raise Overloaded(f"{len(self._groups)} NCCL groups are open")
        group_id = next(self._ids)
        unique_id = self.backend.unique_id()
        group = PairGroup(self.backend, unique_id, SENDER_RANK, self.device, f"nccl-send-{group_id}")
        self._groups[replica_id] = (group_id, group)
        GROUP_EVENTS.labels("opened").inc()
        GROUPS.set(len(self._groups))
        watcher = asyncio.get_running_loop().create_task(self._watch(replica_id, group))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return weights_pb2.NcclGroup(
            group_id=group_id,
            nccl_unique_id=unique_id,
            world_size=WORLD_SIZE,
            rank=RECEIVER_RANK,
            setup_timeout_ms=int(self.setup_timeout_s * 1000),
            chunk_bytes=self.chunk_bytes,
        )

    async def _watch(self, replica_id: str, group: PairGroup) -> None:
        """Drop the group unless both ranks join within the setup timeout."""
        try:
            await group.joined(self.setup_timeout_s)
        except GroupError as error:
            self._forget(replica_id, group, error)

    async def send(self, replica_id: str, group_id: int, version: int, run_id: str) -> int:
        """SendNccl (weights.proto): the bytes sent."""
        self._check(replica_id, run_id)
        entry = self._groups.get(replica_id)
        if entry is None or entry[0] != group_id:
            raise NotFound(f"NCCL group {group_id} of {replica_id} is unknown: open a new one")
        group = entry[1]
        try:
            stored = self.store.acquire(version)
        except VersionNotFound as error:
            raise NotFound(str(error)) from None
        total = stored.info.total_bytes
        limit = transfer_deadline(total, self.setup_timeout_s, self.min_bytes_per_second)
        try:
            async with self._sending:
                await group.joined(self.setup_timeout_s)
                staging = self._staging_buffer(group.device)
                what = f"sending version {version}"
                sent = await group.run(lambda comm: send_bytes(comm, stored.storage, staging), limit, what)
        except GroupError as error:
            self._forget(replica_id, group, error)
            if error.reason.endswith("_timeout"):
                raise DeadlineExceeded(f"NCCL group {group_id}: {error}") from None
            raise NotReady(f"NCCL group {group_id}: {error}") from None
        finally:
            self.store.release(stored)
        self.store.sent(replica_id, version, 0, total)
        NCCL_SENT_BYTES.inc(sent)
        return sent

    def _prune(self) -> None:
        """Destroy the groups of replicas the learner no longer knows: never subscribed, or their
        record expired (limits.replica_ttl_seconds without watching). A replica that died
        silently holds its group until then."""
        known = self.store.replicas
        for replica_id in [r for r in self._groups if r not in known]:
            group = self._groups.pop(replica_id)[1]
            self._drop(replica_id, group, GroupError("expired", "the replica is no longer known"))

    def _staging_buffer(self, device: torch.device) -> torch.Tensor:
        if self._staging is None or self._staging.device != device:
            self._staging = torch.empty(self.chunk_bytes, dtype=torch.uint8, device=device)
        return self._staging

    def _forget(self, replica_id: str, group: PairGroup, error: GroupError) -> None:
        entry = self._groups.get(replica_id)
        if entry is not None and entry[1] is group:
            del self._groups[replica_id]
            self._drop(replica_id, group, error)

    def _drop(self, replica_id: str, group: PairGroup, error: GroupError) -> None:
        """Called once per group, after it left `_groups`."""
        GROUP_EVENTS.labels(error.reason).inc()
        if error.reason not in ("replaced", "closed"):
            log.warning("weights: NCCL group of %s dropped (%s: %s)", replica_id, error.reason, error)
        group.destroy(error)
        GROUPS.set(len(self._groups))

    def forget_replica(self, replica_id: str) -> None:
        """Destroy `replica_id`'s group."""
        entry = self._groups.pop(replica_id, None)
        if entry is not None:
            self._drop(replica_id, entry[1], GroupError("closed", "the replica went away"))

    def close(self) -> None:
        """Destroy every group (the learner stops)."""
        for replica_id in list(self._groups):
            self.forget_replica(replica_id)
        for watcher in list(self._watchers):
            watcher.cancel()
