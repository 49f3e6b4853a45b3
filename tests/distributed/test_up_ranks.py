"""`puremesh up --nproc-per-node 2`: the local mesh with two learner ranks spawned by
torch.distributed's launcher. Rank 0 starts the services once, trains and publishes; the
checkpoint holds both ranks' parts and exports to a model directory."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from puremesh.cli.export import export
from puremesh.trainer import checkpoint
from puremesh.trainer.loop import read_result

pytestmark = pytest.mark.integration


def test_up_with_two_learner_ranks_trains_and_checkpoints(
    tiny_policy_dir, tiny_prm_dir, addition_problems, tmp_path
):
    out = tmp_path / "run"
    config = {
        "learner": {
            "policy_path": str(tiny_policy_dir),
            "train_path": str(addition_problems),
            "out_dir": str(out),
            "steps": 2,
            "checkpoint_every": 2,
            "optim": {"lr": 1e-4, "minibatches": 2},
            "sampling": {
                "prompts_per_step": 3,
                "samples_per_prompt": 2,
                "temperature": 1.0,
                "max_new_tokens": 12,
            },
        },
        "mesh": {
            "rollout_replicas": 1,
            "rollout": {"engine": "hf"},
            "prm": {"model_path": str(tiny_prm_dir)},
            "verify": {"workers": 1},
        },
    }
    path = tmp_path / "up.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        "-m",
        "puremesh.cli.main",
        "up",
        "--config",
        str(path),
        "--nproc-per-node",
        "2",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 2 steps (policy version 2)" in done.stdout
    result = read_result(out)
    assert [r["step"] for r in result.history if "outcome_reward" in r] == [1, 2]
    saved = checkpoint.latest(out)
    assert saved is not None and checkpoint.read_state(saved).world_size == 2
    assert len(list((saved / checkpoint.RNG_DIR).iterdir())) == 2
    exported = load_file(str(export(saved, tmp_path / "exported") / "model.safetensors"))
    start = load_file(str(tiny_policy_dir / "model.safetensors"))
    assert any(not torch.equal(exported[name], start[name]) for name in start)
