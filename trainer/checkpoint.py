"""Checkpoints: model, optimizer, step, policy version, data position and RNG states.

Layout: OUT/checkpoints/step-000010/{policy/, state.pt}. A checkpoint is written under a
temporary name and renamed into place, so a learner killed mid-write leaves the previous one
intact; `latest()` only ever sees complete checkpoints.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
POLICY_DIR = "policy"


@dataclass
class TrainingState:
    step: int  # steps completed
    version: int  # policy version published after `step`
    data_position: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])


def save(
    out_dir: str | Path, model, tokenizer, optimizer, state: TrainingState, generator, keep: int
) -> Path:
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    staging = root / f".staging-{state.step:06d}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging / POLICY_DIR)
    tokenizer.save_pretrained(staging / POLICY_DIR)
    torch.save(
        {
            "step": state.step,
            "version": state.version,
            "data_position": state.data_position,
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(generator),
        },
        staging / STATE_FILE,
    )
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    found = sorted(p for p in (Path(out_dir) / "checkpoints").glob("step-*") if (p / STATE_FILE).exists())
    return found[-1] if found else None


def load_state(checkpoint: Path) -> TrainingState:
    raw = torch.load(checkpoint / STATE_FILE, weights_only=False)
    return TrainingState(raw["step"], raw["version"], raw["data_position"], raw["optimizer"], raw["rng"])
