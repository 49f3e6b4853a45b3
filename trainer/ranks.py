"""The learner's ranks: torch.distributed process groups, each rank's device, and the messages
rank 0 (the single controller) sends the others.

One code path for 1..N ranks. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in the environment) every rank joins torchrun's rendezvous; otherwise the process is
a world of one on an in-memory store (no port). Two groups:

- the compute group (nccl on CUDA, gloo on CPU) carries FSDP2's all-gathers and reduce-scatters,
  the log-prob all-reduce and the statistics, each bounded by `collective_timeout_seconds`;
- the command group (gloo, CPU tensors) carries rank 0's commands, bounded by
  `command_timeout_seconds`: between two commands rank 0 may spend a whole collection.

A message is an int64 header (command, JSON length, body length), a UTF-8 JSON document (plain
values, and the name, dtype and shape of each tensor) and one byte buffer holding the tensors:
nothing is pickled between ranks. A rank that dies closes its connections, so the others fail at
their next collective; one that hangs makes them time out. Either way `RankFailure` (one line)
ends the run; under torchrun the agent then stops the remaining ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

from .settings import DistributedBackend, DistributedSettings

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# How gloo and NCCL name a failed collective in the RuntimeErrors they raise.
COLLECTIVE_MARKS = ("/gloo/", "NCCL", "Connection closed by peer", "Connection reset by peer")
# Dtypes a message may carry (the JSON names them; nothing else is decoded).
MESSAGE_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.int64, torch.int32, torch.float32, torch.float64, torch.bfloat16, torch.bool)
}


class RankFailure(RuntimeError):
    """A rank died, hung, or could not rendezvous; the message is one line."""


class Command(IntEnum):
    """What rank 0 asks every rank to do together (trainer/controller.py)."""

    LOAD = 1  # build the policy (and resume from a checkpoint)
    UPDATE = 2  # one PPO update on the experience sent along
    PUBLISH = 3  # gather the full weights on rank 0
    CHECKPOINT = 4  # write a sharded checkpoint
    STOP = 5  # leave the loop (meta["error"] set when rank 0 failed)


@dataclass(frozen=True)
class Message:
    command: Command
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Ranks:
    """This process's place among the learner's ranks."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    settings: DistributedSettings
    commands: Any = None  # the command group (None in a world of one)
    owned: bool = False  # this object created the default group (and destroys it)

    @property
    def is_controller(self) -> bool:
        return self.rank == 0

    def send(self, command: Command, meta: Mapping[str, Any] | None = None, tensors=None) -> None:
        """Rank 0: broadcast a command (with plain `meta` and named CPU `tensors`) to all ranks."""
        if self.world == 1:
            return
        header, document, body = encode(Message(command, dict(meta or {}), dict(tensors or {})))
        with self.guard(f"sending {command.name}"):
            for part in (header, document, body):
                if part.numel():
                    dist.broadcast(part, src=0, group=self.commands)

    def receive(self) -> Message:
        """Ranks other than 0: wait for rank 0's next command."""
        header = torch.zeros(3, dtype=torch.int64)
        with self.guard("waiting for rank 0's next command", self.settings.command_timeout_seconds):
            dist.broadcast(header, src=0, group=self.commands)
            document = torch.empty(int(header[1]), dtype=torch.uint8)
            body = torch.empty(int(header[2]), dtype=torch.uint8)
            dist.broadcast(document, src=0, group=self.commands)
            if body.numel():
                dist.broadcast(body, src=0, group=self.commands)
        return decode(header, document, body)

    def all_reduce_sum(self, tensor: torch.Tensor, what: str = "an all-reduce") -> torch.Tensor:
        """Sum `tensor` over the ranks, in place (nothing to do in a world of one)."""
        if self.world > 1:
            with self.guard(what):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self, what: str) -> None:
        if self.world > 1:
            with self.guard(what):
                dist.barrier()

    @contextlib.contextmanager
    def guard(self, what: str, timeout: float | None = None) -> Iterator[None]:
        """Turn a failed collective into one RankFailure line naming this rank and `what`."""
        try:
            yield
        except (dist.DistError, RuntimeError) as error:
            if not is_collective_failure(error):
                raise
            bound = timeout or self.settings.collective_timeout_seconds
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RankFailure(
                f"rank {self.rank} of {self.world}: {what} failed: another rank died or did not answer "
                f"within {bound:.0f} s ({reason[:300]})"
            ) from error

    def close(self) -> None:
        """Leave the ranks (destroying the process groups this object created)."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False
        _CURRENT[:] = [ranks for ranks in _CURRENT if ranks is not self]


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a failed collective: torch.distributed's own errors, and the
    RuntimeErrors gloo and NCCL raise for a closed connection or a timeout."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(mark in text for mark in COLLECTIVE_MARKS)


def under_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def rank_device(device: str, local_rank: int) -> torch.device:
    """ "cuda" means this rank's GPU (cuda:LOCAL_RANK); anything else is taken as given."""
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def backend_for(settings: DistributedSettings, device: torch.device) -> str:
    if settings.backend is DistributedBackend.AUTO:
        return "nccl" if device.type == "cuda" else "gloo"
    return str(settings.backend)


_CURRENT: list[Ranks] = []  # the ranks this process joined (one at a time)


def current_ranks() -> Ranks | None:
    """The ranks `start_ranks` joined and nobody closed yet, or None."""
    return _CURRENT[0] if _CURRENT else None


def start_ranks(settings: DistributedSettings, device: str) -> Ranks:
    """Join the learner's ranks (torchrun's rendezvous, or a world of one), or return the ones
    this process already joined. RankFailure, one line, when the rendezvous does not complete
    within `collective_timeout_seconds`."""
    if _CURRENT:
        return _CURRENT[0]
    ranks = _join(settings, device)
    _CURRENT.append(ranks)
    return ranks


def _join(settings: DistributedSettings, device: str) -> Ranks:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    where = rank_device(device, local_rank)
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise RankFailure(f"learner.device is {device!r} but torch sees no CUDA device")
        torch.cuda.set_device(where)
    if dist.is_initialized():  # someone else (a test, an embedding program) set the world up
        return _ranks(settings, where, local_rank, owned=False)
    timeout = timedelta(seconds=settings.collective_timeout_seconds)
    backend = backend_for(settings, where)
    if not under_torchrun():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return _ranks(settings, where, local_rank, owned=True)
    try:
        dist.init_process_group(backend, timeout=timeout, device_id=where if where.type == "cuda" else None)
    except (dist.DistError, RuntimeError, TimeoutError) as error:
        address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise RankFailure(
            f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} could not rendezvous with the other "
            f"ranks at {address} within {timeout.total_seconds():.0f} s ({type(error).__name__})"
        ) from error
    return _ranks(settings, where, local_rank, owned=True)


def _ranks(settings: DistributedSettings, device: torch.device, local_rank: int, owned: bool) -> Ranks:
    world = dist.get_world_size()
    commands = None
    if world > 1:
        commands = dist.new_group(backend="gloo", timeout=timedelta(seconds=settings.command_timeout_seconds))
    return Ranks(dist.get_rank(), world, local_rank, device, settings, commands, owned)


# --- messages -------------------------------------------------------------------------------


def encode(message: Message) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(header, JSON document, body) of `message`, as uint8/int64 CPU tensors."""
    specs, parts = [], []
    for name, tensor in message.tensors.items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        dtype = str(flat.dtype).removeprefix("torch.")
        specs.append({"name": name, "dtype": dtype, "shape": list(tensor.shape)})
        parts.append(flat.view(torch.uint8))
    document = json.dumps({"meta": message.meta, "tensors": specs}).encode()
    body = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    header = torch.tensor([int(message.command), len(document), body.numel()], dtype=torch.int64)
    return header, torch.frombuffer(bytearray(document), dtype=torch.uint8), body


def decode(header: torch.Tensor, document: torch.Tensor, body: torch.Tensor) -> Message:
    """The message `encode` made; ValueError for a dtype outside MESSAGE_DTYPES."""
    parsed = json.loads(bytes(document.numpy()).decode())
    tensors, offset = {}, 0
    for spec in parsed["tensors"]:
        dtype = MESSAGE_DTYPES.get(spec["dtype"])
        if dtype is None:
            raise ValueError(f"a message may not carry dtype {spec['dtype']!r}")
        count = 1
        for size in spec["shape"]:
            count *= int(size)
        nbytes = count * dtype.itemsize
        chunk = body[offset : offset + nbytes]
        tensors[spec["name"]] = chunk.clone().view(dtype).reshape(spec["shape"])
        offset += nbytes
    return Message(Command(int(header[0])), parsed["meta"], tensors)
