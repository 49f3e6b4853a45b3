"""Sharded checkpoints (torch.distributed.checkpoint): weights, optimizer, step, policy version,
data position and every rank's RNG states.

Layout: OUT/checkpoints/step-000010/
    training_state.json   step, version, data position, rank count, compute dtype, and the
                          name and shape of every parameter (rank 0 writes it last)
    weights/              DCP: each rank writes its shards of the fp32 master weights and of
                          Adam's state; `.metadata` indexes them
    rng/rank-00000.json   each rank's Python, NumPy and torch RNG states (and its CUDA one)
    model/                the policy directory's files but its weights (config, generation
                          config, tokenizer): what `puremesh export` needs besides weights/

Every rank calls `save` and `load` together (collectives). A checkpoint is written under a
temporary name and renamed into place by rank 0 once every rank has written its part, so a
learner killed mid-write leaves the previous one intact; `latest()` only sees complete ones. On
several nodes OUT must be one shared filesystem. Loading reads JSON, and tensors through
trainer/safe_dcp.py: nothing is unpickled. A checkpoint of another rank count or of another
model is refused with one line (`CheckpointMismatch`).
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .ranks import Ranks
from .safe_dcp import SafePlanner, SafeReader

STATE_FILE = "training_state.json"
WEIGHTS_DIR = "weights"
RNG_DIR = "rng"
MODEL_DIR = "model"
FORMAT = 1
# Weight files (and their indexes) of a model directory; checkpoints keep their own weights.
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit this run (rank count, model); the message is one line."""


@dataclass
class TrainingState:
    step: int  # steps completed
    version: int  # policy version published after `step`
    data_position: dict[str, Any]
    world_size: int = 1
    dtype: str = "float32"
    tensors: dict[str, list[int]] | None = None  # parameter name -> shape
    format: int = FORMAT


def parameter_shapes(model) -> dict[str, list[int]]:
    """The name and (global) shape of every parameter of `model`."""
    return {name: list(parameter.shape) for name, parameter in model.named_parameters()}


def save(
    out_dir: str | Path, trainable, ranks: Ranks, state: TrainingState | None, policy_dir, keep: int
) -> Path:
    """Write the checkpoint of `state.step` (`state` and `policy_dir`, the starting policy's
    directory, are rank 0's; None on the others). `trainable` holds model, optimizer and
    generator. Returns the checkpoint's final directory."""
    root = Path(out_dir) / "checkpoints"
    step = _agreed_step(state, ranks)
    final, staging = root / f"step-{step:06d}", root / f".staging-{step:06d}"
    if ranks.is_controller:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / RNG_DIR).mkdir(parents=True)
    ranks.barrier("preparing a checkpoint")
    _write_json(staging / RNG_DIR / f"rank-{ranks.rank:05d}.json", rng_state(trainable.generator))
    model_state, optimizer_state = get_state_dict(trainable.model, trainable.optimizer)
    with ranks.guard("writing the checkpoint's shards"):
        dcp.save(
            {"model": model_state, "optimizer": optimizer_state["state"]},
            storage_writer=dcp.FileSystemWriter(str(staging / WEIGHTS_DIR)),
        )
    if ranks.is_controller:
        assert state is not None
        copy_model_files(Path(policy_dir), staging / MODEL_DIR)
        _write_json(staging / STATE_FILE, asdict(state))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ranks.barrier("finishing a checkpoint")
    return final


def copy_model_files(source: Path, target: Path) -> None:
    """Copy a model directory's files except its weights (config, tokenizer, templates)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_FILES):
            shutil.copy2(item, target / item.name)


def _agreed_step(state: TrainingState | None, ranks: Ranks) -> int:
    step = torch.tensor([state.step if state is not None else 0], dtype=torch.int64, device=ranks.device)
    return int(ranks.all_reduce_sum(step, "agreeing on the checkpoint's step")[0])


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    found = sorted(p for p in (Path(out_dir) / "checkpoints").glob("step-*") if (p / STATE_FILE).exists())
    return found[-1] if found else None


def read_state(checkpoint: Path) -> TrainingState:
    """The checkpoint's training state; CheckpointMismatch when it is missing or malformed."""
    path = Path(checkpoint) / STATE_FILE
    try:
        raw = json.loads(path.read_text())
        state = TrainingState(**raw)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointMismatch(f"{path}: not a puremesh checkpoint ({error})") from error
    if state.format != FORMAT:
        raise CheckpointMismatch(f"{path}: checkpoint format {state.format}, this learner reads {FORMAT}")
    return state


def check_fits(checkpoint: Path, state: TrainingState, model, ranks: Ranks) -> None:
    """CheckpointMismatch unless the checkpoint was written by as many ranks for this model."""
    if state.world_size != ranks.world:
        raise CheckpointMismatch(
            f"checkpoint {checkpoint} was written by {state.world_size} rank(s) and this run has "
            f"{ranks.world}: resume with --nproc-per-node {state.world_size} (or `puremesh export` it and "
            "start a new run from the export)"
        )
    mine = parameter_shapes(model)
    theirs = state.tensors or {}
    differ = sorted(set(mine) ^ set(theirs)) or [n for n in mine if mine[n] != theirs[n]]
    if differ:
        name = differ[0]
        raise CheckpointMismatch(
            f"checkpoint {checkpoint} holds another model than learner.policy_path: {len(differ)} "
            f"parameter(s) differ, e.g. {name} ({theirs.get(name, 'absent')} there, "
            f"{mine.get(name, 'absent')} here)"
        )


def load(checkpoint: Path, trainable, ranks: Ranks) -> TrainingState:
    """Restore weights, optimizer and this rank's RNG states from `checkpoint` (every rank)."""
    state = read_state(checkpoint)
    check_fits(checkpoint, state, trainable.model, ranks)
    model_state, optimizer_state = get_state_dict(trainable.model, trainable.optimizer)
    with ranks.guard("reading the checkpoint's shards"):
        load_shards({"model": model_state, "optimizer": optimizer_state["state"]}, Path(checkpoint))
        set_state_dict(
            trainable.model,
            trainable.optimizer,
            model_state_dict=model_state,
            optim_state_dict=optimizer_state,
        )
    rng = json.loads((Path(checkpoint) / RNG_DIR / f"rank-{ranks.rank:05d}.json").read_text())
    restore_rng(rng, trainable.generator)
    return state


def load_shards(state: dict[str, Any], checkpoint: Path, no_dist: bool = False) -> None:
    """Fill `state`'s tensors in place from the checkpoint's shards (trainer/safe_dcp.py). The
    index is read once up front, so a hostile one fails here with its own UnsafeCheckpoint
    rather than inside DCP's error handling."""
    folder = str(Path(checkpoint) / WEIGHTS_DIR)
    SafeReader(folder).read_metadata()
    with warnings.catch_warnings():  # no_dist: one process reads every rank's shards, on purpose
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=SafeReader(folder), planner=SafePlanner(), no_dist=no_dist)


# --- RNG states as JSON -------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
        "generator": generator.get_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))
