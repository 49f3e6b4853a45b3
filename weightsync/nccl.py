"""TRANSPORT_NCCL: a version's bytes over this replica's NCCL group with the learner, received
straight into a buffer on the engine's GPU (transport.py; the protocol: weights.proto "NCCL data
plane"; groups and their threads: nccl_group.py).

The first download opens the group: OpenNcclGroup (over the authenticated gRPC control plane,
with the run id) gives the unique id, and the replica joins as rank 1 within the announced setup
timeout. Each download then runs DescribeVersion (the manifest), starts receiving on the group's
thread and calls SendNccl, which broadcasts the bytes. Every piece is also copied to the host
buffer and folded into the whole version's SHA-256, checked as on every path. The group is kept
for the next version.

On any failure (NCCL or CUDA missing here, the learner refusing a group, a rendezvous or a
transfer that fails or passes its deadline, a wrong SHA-256) the group is destroyed, the
download falls back to the bulk port (tcp_bulk.py, itself falling back to FetchWeights), a
warning is logged (once, until NCCL works again) and the fallback is counted in
`puremesh_rollout_weight_nccl_fallbacks_total{reason}`. After a setup failure NCCL rests for
`nccl_retry_after_s`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import grpc
import torch
from prometheus_client import Counter

from puremesh.contract.weights import Manifest, ManifestError, parse_manifest
from puremesh.weights.v1 import weights_pb2

from .grpc_stream import GrpcStreamTransport
from .nccl_group import RECEIVER_RANK, WORLD_SIZE, GroupError, NcclBackend, PairGroup, VllmNccl, receive_bytes
from .tcp_bulk import DESCRIBE_TIMEOUT_S, TcpBulkTransport
from .transport import FETCH_BYTES, Announcement, FetchedVersion, Link, Transport

log = logging.getLogger(__name__)

# Deadline of OpenNcclGroup (a small unary call).
OPEN_TIMEOUT_S = 30.0
_SEND_REASONS = {
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.DEADLINE_EXCEEDED: "transfer_timeout",
}
# Reasons after which NCCL rests for nccl_retry_after_s (the others retry with the next version).
_RESTING = frozenset({"unavailable", "refused", "setup", "setup_timeout"})

NCCL_FALLBACKS = Counter(
    "puremesh_rollout_weight_nccl_fallbacks_total",
    "Downloads that fell back from NCCL to the bulk port or FetchWeights, by reason",
    ["reason"],  # unavailable | refused | setup | setup_timeout | describe | not_found | transfer
    # | transfer_timeout | sha256
)


class NcclFailure(Exception):
    """The NCCL path could not deliver this version; `reason` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NcclTransport:
    """Downloads over NCCL, else over the bulk port or the gRPC stream (module docstring).
    `backend`: nccl_group.VllmNccl unless a test gives another."""

    def __init__(self, link: Link, backend: NcclBackend | None = None) -> None:
        self.link = link
        self.backend = backend or VllmNccl()
        self.device = torch.device(link.options.nccl_device)
        self.fallback: Transport = TcpBulkTransport(link) if link.options.bulk else GrpcStreamTransport(link)
        self.resumes_at = 0.0  # time.monotonic() before which NCCL is not tried
        self._group: tuple[int, PairGroup, int] | None = None  # (group id, group, piece bytes)
        self._device_buffer: torch.Tensor | None = None
        self._warned = False

    def close(self) -> None:
        self._drop_group()
        self.fallback.close()

    async def download(self, announcement: Announcement, buffer: torch.Tensor) -> FetchedVersion:
        if time.monotonic() >= self.resumes_at:
            try:
                fetched = await self._download(announcement, buffer)
                self._warned = False
                return fetched
            except NcclFailure as error:
                self._fall_back(announcement, error)
        return await self.fallback.download(announcement, buffer)

    def _fall_back(self, announcement: Announcement, error: NcclFailure) -> None:
        NCCL_FALLBACKS.labels(error.reason).inc()
        self._drop_group()
        if error.reason in _RESTING:
            self.resumes_at = time.monotonic() + self.link.options.nccl_retry_after_s
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(
            level,
            "weight sync: NCCL download of version %d failed (%s: %s); using the bulk port or FetchWeights",
            announcement.version,
            error.reason,
            error,
        )

    def _drop_group(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            group[1].destroy()

    async def _download(self, announcement: Announcement, buffer: torch.Tensor) -> FetchedVersion:
        reason = self.backend.unavailable()
        if reason is not None:
            raise NcclFailure("unavailable", reason)
        group_id, group, piece = await self._ensure_group(announcement.run_id)
        manifest = await self._describe(announcement)
        device_buffer = self._device_buffer_for(announcement.total_bytes, group.device)
        digest = hashlib.sha256()
        hashing: list = []

        def on_piece(start: int, stop: int) -> None:  # on the group's thread; hashed in order
            hashing.append(self.link.worker.submit(digest.update, host[start:stop]))

        host = memoryview(buffer.numpy())
        receiving = asyncio.ensure_future(
            group.run(
                lambda comm: receive_bytes(comm, device_buffer, buffer, piece, on_piece),
                self.link.options.fetch_timeout_s,
                f"receiving version {announcement.version}",
            )
        )
        await self._send(announcement, group_id, group, receiving)
        if hashing:
            await asyncio.wrap_future(hashing[-1])
        FETCH_BYTES.inc(announcement.total_bytes)
        sha256 = digest.hexdigest()
        if sha256 != announcement.sha256:
            message = f"version {announcement.version}: the bytes received are not the announced SHA-256"
            raise NcclFailure("sha256", message)
        return FetchedVersion(announcement.version, manifest, device_buffer, announcement.run_id, sha256)

    async def _send(
        self, announcement: Announcement, group_id: int, group: PairGroup, receiving: asyncio.Future
    ) -> None:
        """SendNccl while `receiving` runs; both must succeed. A refused or failed send breaks
        the group, which ends the receive too (its broadcast is aborted)."""
        request = weights_pb2.SendNcclRequest(
            replica_id=self.link.replica_id,
            group_id=group_id,
            version=announcement.version,
            run_id=announcement.run_id,
        )
        sending = asyncio.ensure_future(
            self.link.stub.SendNccl(request, timeout=self.link.options.fetch_timeout_s)
        )
        await asyncio.wait({sending, receiving}, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((task for task in (sending, receiving) if task.done() and task.exception()), None)
        if failed is None:
            return
        group.destroy()  # aborts the broadcast the other side may still be in
        for task in (sending, receiving):
            task.cancel()
        error = failed.exception()
        if isinstance(error, GroupError):
            raise NcclFailure(error.reason, str(error)) from error
        if isinstance(error, grpc.aio.AioRpcError):
            reason = _SEND_REASONS.get(error.code(), "transfer")
            raise NcclFailure(reason, f"SendNccl: {error.code().name} {error.details()}") from error
        raise NcclFailure("transfer", f"SendNccl: {error!r}") from error

    async def _ensure_group(self, run_id: str) -> tuple[int, PairGroup, int]:
        """The replica's group with the learner, opened and joined if need be."""
        if self._group is not None and self._group[1].broken is None:
            return self._group
        request = weights_pb2.OpenNcclGroupRequest(replica_id=self.link.replica_id, run_id=run_id)
        try:
            answer = await self.link.stub.OpenNcclGroup(request, timeout=OPEN_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            raise NcclFailure("refused", f"OpenNcclGroup: {error.code().name} {error.details()}") from error
        if answer.world_size != WORLD_SIZE or answer.rank != RECEIVER_RANK or answer.chunk_bytes < 1:
            raise NcclFailure("setup", f"OpenNcclGroup answered a group this replica cannot join: {answer}")
        name = f"nccl-recv-{answer.group_id}"
        group = PairGroup(self.backend, answer.nccl_unique_id, RECEIVER_RANK, self.device, name)
        try:
            await group.joined(answer.setup_timeout_ms / 1000)
        except GroupError as error:
            raise NcclFailure(error.reason, str(error)) from error
        self._group = (answer.group_id, group, answer.chunk_bytes)
        return self._group

    async def _describe(self, announcement: Announcement) -> Manifest:
        request = weights_pb2.DescribeVersionRequest(
            version=announcement.version, replica_id=self.link.replica_id
        )
        try:
            layout = await self.link.stub.DescribeVersion(request, timeout=DESCRIBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            reason = "not_found" if error.code() == grpc.StatusCode.NOT_FOUND else "describe"
            raise NcclFailure(reason, f"DescribeVersion: {error.code().name} {error.details()}") from error
        try:
            manifest = parse_manifest(layout.manifest, announcement.total_bytes)
        except ManifestError as error:
            raise NcclFailure("describe", str(error)) from error
        if layout.sha256 != announcement.sha256 or len(manifest) != announcement.num_tensors:
            message = f"DescribeVersion does not match the announcement of {announcement}"
            raise NcclFailure("describe", message)
        return manifest

    def _device_buffer_for(self, size: int, device: torch.device) -> torch.Tensor:
        """One model-size buffer on the group's device, reused while the size stays (the engine
        copies the tensors out before the next download)."""
        held = self._device_buffer
        if held is None or held.numel() != size or held.device != device:
            self._device_buffer = None
            try:
                self._device_buffer = torch.empty(size, dtype=torch.uint8, device=device)
            except RuntimeError as error:  # out of memory, or a device this process lacks
                raise NcclFailure("setup", f"no {size}-byte buffer on {device}: {error}") from error
        return self._device_buffer
