"""NCCL groups of two ranks, the learner's publishing process (rank 0) and one replica (rank 1),
as both ends of TRANSPORT_NCCL use them (weights.proto "NCCL data plane"; README "Weights over
NCCL").

`NcclBackend` is what the weight path needs of NCCL: why it cannot run here, a fresh unique id,
and joining a group from one. `VllmNccl` implements it with vLLM's weight-transfer helpers
(vllm.distributed.weight_transfer.nccl_common.uid_init_process_group: vLLM's PyNcclCommunicator
joined from a unique id, with its warm-up all_reduce), imported on first use.

NCCL calls block and cannot be interrupted. Each group therefore runs them on its own daemon
thread (`PairGroup`), and the event loop waits for them with a deadline. A call that fails or
passes its deadline breaks the group: `destroy` aborts the communicator (ncclCommAbort, which
lets a stuck broadcast return) and the thread is abandoned. A join still stuck in
ncclCommInitRank cannot be aborted (there is no communicator yet): its thread stays parked
until the process exits, and nobody waits for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch

WORLD_SIZE = 2  # the learner's publishing process and one replica
SENDER_RANK = 0
RECEIVER_RANK = 1
UNIQUE_ID_BYTES = 128  # sizeof(ncclUniqueId)
_STOP: Any = object()  # ends a group's thread


class GroupError(Exception):
    """A group could not be joined or used; `reason` is a metric label: setup, setup_timeout,
    transfer, transfer_timeout, closed."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Communicator(Protocol):
    """A joined group, as the transfers below use it (all calls on the group's thread)."""

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """Rank `src` sends `tensor` (on this rank's device), every other rank receives into it;
        returns once the broadcast is enqueued."""
        ...

    def synchronize(self) -> None:
        """Wait until the enqueued broadcasts are done."""
        ...

    def destroy(self) -> None:
        """Abort the communicator (also from another thread, to end a stuck broadcast)."""
        ...


class NcclBackend(Protocol):
    def unavailable(self) -> str | None:
        """Why NCCL cannot run in this process (no CUDA device, no NCCL library); None = it can."""
        ...

    def unique_id(self) -> bytes:
        """A fresh ncclUniqueId (UNIQUE_ID_BYTES): the rendezvous of one group."""
        ...

    def join(self, unique_id: bytes, rank: int, world_size: int, device: torch.device) -> Communicator:
        """Join the group of `unique_id` as `rank`; blocks until every rank joined."""
        ...


class _VllmCommunicator:
    """vLLM's PyNcclCommunicator on one device, on that device's current stream."""

    def __init__(self, comm: Any, device: torch.device) -> None:
        self.comm, self.device = comm, device

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.comm.broadcast(tensor, src=src, stream=torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()

    def destroy(self) -> None:
        self.comm.destroy()  # ncclCommAbort on a side thread, waited for a few seconds


class VllmNccl:
    """NCCL through vLLM's weight-transfer helpers (module docstring)."""

    def __init__(self) -> None:
        self._reason: str | None = None
        self._checked = False

    def unavailable(self) -> str | None:
        if not self._checked:
            self._reason = self._probe()
            self._checked = True
        return self._reason

    def _probe(self) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        try:
            self._library()
        except Exception as error:  # a missing or broken libnccl: vLLM raises what dlopen raised
            return f"the NCCL library cannot be loaded ({error})"
        return None

    def _library(self) -> Any:
        from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

        return NCCLLibrary()

    def unique_id(self) -> bytes:
        minted = self._library().ncclGetUniqueId()
        return ctypes.string_at(ctypes.addressof(minted.internal), UNIQUE_ID_BYTES)

    def join(self, unique_id: bytes, rank: int, world_size: int, device: torch.device) -> Communicator:
        from vllm.distributed.weight_transfer.nccl_common import uid_init_process_group

        torch.cuda.set_device(device)
        return _VllmCommunicator(uid_init_process_group(unique_id, rank, world_size, device), device)


def concrete(device: torch.device) -> torch.device:
    """`device` with its index ("cuda" is the current GPU, as NCCL's communicator names it);
    resolved on first use, after the engine chose the visible GPUs."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class PairGroup:
    """One end of a group: its own thread, which joins at once and then runs `run`'s calls."""

    def __init__(
        self, backend: NcclBackend, unique_id: bytes, rank: int, device: torch.device, name: str
    ) -> None:
        self.rank, self.device = rank, device
        self.comm: Communicator | None = None
        self.broken: GroupError | None = None
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = (
            queue.SimpleQueue()
        )
        self._joined = self._submit(lambda: self._join(backend, unique_id))
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _join(self, backend: NcclBackend, unique_id: bytes) -> None:
        self.device = concrete(self.device)  # the buffers go where the communicator is
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.comm = backend.join(unique_id, self.rank, WORLD_SIZE, self.device)

    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, future))
        return future

    def _serve(self) -> None:
        while True:
            fn, future = self._calls.get()
            if fn is _STOP:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as error:
                    future.set_exception(error)

    async def joined(self, timeout_s: float) -> None:
        """Wait until both ranks joined; GroupError (setup / setup_timeout), the group broken."""
        await self._wait(self._joined, timeout_s, "setup", "the NCCL rendezvous")

    async def run(self, fn: Callable[[Communicator], Any], timeout_s: float, what: str) -> Any:
        """`fn(comm)` on the group's thread, within `timeout_s`; GroupError (transfer /
        transfer_timeout) breaks the group."""
        if self.broken is not None:
            raise self.broken
        comm = self.comm
        if comm is None:
            raise GroupError("setup", "the group is not joined")
        return await self._wait(self._submit(lambda: fn(comm)), timeout_s, "transfer", what)

    async def _wait(self, future: concurrent.futures.Future, timeout_s: float, stage: str, what: str) -> Any:
        if self.broken is not None:
            raise self.broken
        waited = asyncio.wrap_future(future)
        waited.add_done_callback(_consume)  # a call abandoned past its deadline ends unobserved
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(waited)
        except TimeoutError:
            error = GroupError(f"{stage}_timeout", f"{what} did not finish within {timeout_s:.1f} s")
        except asyncio.CancelledError:
            self.destroy(GroupError("closed", f"{what} was cancelled"))
            raise
        except Exception as failure:
            error = GroupError(stage, f"{what} failed: {failure!r}")
        self.destroy(error)
        raise error

    def destroy(self, error: GroupError | None = None) -> None:
        """Break the group (module docstring); safe to call more than once."""
        if self.broken is not None:
            return
        self.broken = error or GroupError("closed", "the group was closed")
        comm, self.comm = self.comm, None
        self._calls.put((_STOP, concurrent.futures.Future()))
        if comm is not None:  # off the event loop: vLLM waits a few seconds for the abort
            threading.Thread(target=_abort, args=(comm,), name="nccl-abort", daemon=True).start()


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _abort(comm: Communicator) -> None:
    with contextlib.suppress(Exception):  # an abort that fails leaves nothing more to release
        comm.destroy()


def send_bytes(comm: Communicator, data: torch.Tensor, staging: torch.Tensor) -> int:
    """Broadcast the host bytes `data` (uint8, CPU) from rank 0 in pieces of `staging`'s size,
    each staged through `staging` (uint8, on the communicator's device). Returns the bytes sent."""
    piece = staging.numel()
    for start in range(0, data.numel(), piece):
        part = data[start : start + piece]
        staged = staging[: part.numel()]
        staged.copy_(part)
        comm.broadcast(staged, SENDER_RANK)
        comm.synchronize()  # the staging buffer is reused by the next piece
    return data.numel()


def receive_bytes(
    comm: Communicator,
    device_buffer: torch.Tensor,
    host_buffer: torch.Tensor,
    piece: int,
    on_piece: Callable[[int, int], None],
) -> None:
    """Receive `device_buffer` (uint8) from rank 0 in pieces of `piece` bytes (as the sender
    cut them); each piece is also copied into `host_buffer` and handed to `on_piece(start,
    stop)` (the SHA-256 is folded in meanwhile)."""
    for start in range(0, device_buffer.numel(), piece):
        stop = min(start + piece, device_buffer.numel())
        comm.broadcast(device_buffer[start:stop], SENDER_RANK)
        comm.synchronize()
        host_buffer[start:stop].copy_(device_buffer[start:stop])
        on_piece(start, stop)
