"""The single controller: rank 0 runs the loop and tells the other ranks what to do together.

Rank 0 alone collects experience, talks to the services, hosts the WeightService and publishes.
Whatever needs every rank (building the sharded policy, an update, gathering the weights, a
checkpoint) is a `Command` (trainer/ranks.py) that rank 0 sends before doing its own part; the
other ranks run `follow`, which waits for each command and does the same part. A command
carries what the ranks must agree on: the step, the policy version, the data position and the
experience itself (plain tensors), so every rank updates on the same batch, and each takes a
disjoint share of its rows (trainer/batching.py). Both sides keep a `Record` of each update
they took part in (tests compare them).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .ranks import Command, RankFailure, Ranks
from .settings import LearnerSettings
from .sharding import gather_weights, load_sharded, load_tokenizer
from .update import Experience, UpdateSettings, ppo_update

log = logging.getLogger(__name__)


@dataclass
class Trainable:
    """What every rank holds: its shards of the policy (and reference), Adam, the generator
    that orders minibatches (the same state on every rank), and the tokenizer."""

    model: Any
    reference: Any  # None when kl_coef == 0
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    tokenizer: Any


@dataclass(frozen=True)
class Record:
    """One update as a rank saw it."""

    step: int
    version: int
    data_position: list[int]
    experience_sha256: str


def build_trainable(settings: LearnerSettings, ranks: Ranks) -> Trainable:
    """Load and shard the policy (and the reference when kl_coef > 0), and make Adam."""
    torch.manual_seed(settings.seed)
    dtype = getattr(torch, settings.dtype)
    model = load_sharded(
        settings.policy_path,
        ranks,
        dtype,
        dropout=settings.algo.update_dropout,
        checkpointing=settings.memory.activation_checkpointing,
    )
    reference = None
    if settings.algo.kl_coef > 0:
        reference = load_sharded(settings.policy_path, ranks, dtype, trainable=False)
    optim = settings.optim
    optimizer = torch.optim.Adam(
        model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    generator = torch.Generator().manual_seed(settings.seed)
    return Trainable(model, reference, optimizer, generator, load_tokenizer(settings.policy_path))


def experience_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the experience's tensors."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{list(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Controller:
    """Rank 0's side: each method sends its command, then does rank 0's part."""

    settings: LearnerSettings
    ranks: Ranks
    trainable: Trainable | None = None
    records: list[Record] = field(default_factory=list)

    def load(self, found: Path | None) -> checkpoint.TrainingState | None:
        """Build the sharded policy on every rank; resume all of them from `found` if given."""
        self.ranks.send(Command.LOAD, {"checkpoint": str(found) if found else ""})
        self.trainable = build_trainable(self.settings, self.ranks)
        return checkpoint.load(found, self.trainable, self.ranks) if found else None

    def update(self, experience: Experience, step: int, version: int, position: list[int]) -> dict:
        tensors = experience.named_tensors()
        meta = {"step": step, "version": version, "data_position": list(position)}
        self.ranks.send(Command.UPDATE, meta, tensors)
        self.records.append(Record(step, version, list(position), experience_digest(tensors)))
        return _update(self.settings, self.require(), experience, self.ranks)

    def gather(self) -> list[tuple[str, torch.Tensor]]:
        """The full weights in the compute dtype (rank 0 gets them; the others contribute)."""
        self.ranks.send(Command.PUBLISH)
        return gather_weights(self.require().model, getattr(torch, self.settings.dtype), self.ranks)

    def checkpoint(self, state: checkpoint.TrainingState) -> Path:
        self.ranks.send(Command.CHECKPOINT, {"step": state.step})
        settings = self.settings
        return checkpoint.save(
            settings.out_dir,
            self.require(),
            self.ranks,
            state,
            settings.policy_path,
            settings.keep_checkpoints,
        )

    def stop(self, error: str = "") -> None:
        """Release the other ranks (telling them when rank 0 failed)."""
        self.ranks.send(Command.STOP, {"error": error})

    def require(self) -> Trainable:
        if self.trainable is None:
            raise RuntimeError("the policy is not loaded yet (Controller.load)")
        return self.trainable


def _update(settings: LearnerSettings, trainable: Trainable, experience: Experience, ranks: Ranks) -> dict:
    config = UpdateSettings(settings.algo, settings.optim, settings.memory)
    with ranks.guard("an update"):
        return ppo_update(
            trainable.model,
            trainable.reference,
            trainable.optimizer,
            experience,
            config,
            trainable.generator,
            ranks,
        )


def follow(settings: LearnerSettings, ranks: Ranks) -> list[Record]:
    """Ranks other than 0: do each command's part until STOP; returns the updates taken part
    in. RankFailure when rank 0 stopped with an error (or a collective failed)."""
    trainable: Trainable | None = None
    records: list[Record] = []
    while True:
        message = ranks.receive()
        if message.command is Command.STOP:
            if message.meta.get("error"):
                raise RankFailure(f"rank {ranks.rank}: rank 0 stopped the run: {message.meta['error']}")
            return records
        if message.command is Command.LOAD:
            trainable = build_trainable(settings, ranks)
            if message.meta["checkpoint"]:
                checkpoint.load(Path(message.meta["checkpoint"]), trainable, ranks)
            continue
        if trainable is None:
            raise RankFailure(f"rank {ranks.rank}: {message.command.name} before LOAD")
        if message.command is Command.UPDATE:
            meta = message.meta
            digest = experience_digest(message.tensors)
            records.append(Record(meta["step"], meta["version"], list(meta["data_position"]), digest))
            _update(settings, trainable, Experience.from_named(message.tensors), ranks)
        elif message.command is Command.PUBLISH:
            gather_weights(trainable.model, getattr(torch, settings.dtype), ranks)
        elif message.command is Command.CHECKPOINT:
            checkpoint.save(settings.out_dir, trainable, ranks, None, None, settings.keep_checkpoints)


def records_json(records: list[Record]) -> list[dict]:
    return [asdict(record) for record in records]
