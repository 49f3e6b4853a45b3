"""The whole mesh on loopback with tiny models: rollout replicas, PRM, verify and the learner.

A few PPO steps change the policy, every live replica ends on the newest version, a replica
killed mid-run is survived, and a learner killed mid-run resumes from its last checkpoint with
the same step counter and data position.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from puremesh.cli.export import export
from puremesh.cli.process_mesh import run_mesh
from puremesh.cli.run_settings import RunSettings
from puremesh.services.rollout.client import RolloutClient
from puremesh.trainer.heldout import read_outputs

pytestmark = pytest.mark.integration


def settings(
    policy: Path, prm: Path, problems: Path, out: Path, steps: int, replicas: int, **learner
) -> dict:
    return {
        "learner": {
            "policy_path": str(policy),
            "train_path": str(problems),
            "out_dir": str(out),
            "steps": steps,
            "checkpoint_every": 2,
            "algo": {"kl_coef": 0.001},
            "optim": {"lr": 1e-4, "minibatches": 2},
            "sampling": {
                "prompts_per_step": 3,
                "samples_per_prompt": 2,
                "temperature": 1.0,
                "max_new_tokens": 12,
            },
            **learner,
        },
        "mesh": {
            "rollout_replicas": replicas,
            "rollout": {"engine": "hf"},
            "prm": {"model_path": str(prm)},
            "verify": {"workers": 1},
        },
    }


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


async def test_training_survives_a_killed_replica_and_syncs_the_rest(
    tiny_policy_dir, tiny_prm_dir, addition_problems, tmp_path
):
    raw = settings(
        tiny_policy_dir,
        tiny_prm_dir,
        addition_problems,
        tmp_path / "run",
        5,
        2,
        eval={"heldout_path": str(addition_problems), "n_eval": 4, "max_new_tokens": 12},
    )
    raw["mesh"]["supervision"] = {"restart": False}  # the killed replica stays dead here
    config = RunSettings.model_validate(raw)
    mesh = {}
    statuses = {}

    async def on_step(record: dict) -> None:
        if record["step"] == 2:
            mesh["local"].kill("rollout-1")  # a crash, mid-run
        if record["step"] == 5:  # the learner waited for live replicas before this callback
            for target in mesh["local"].targets("rollout"):
                async with RolloutClient(target, timeout=10) as client:
                    statuses[target] = (await client.status()).policy_version

    result = await run_mesh(
        config, progress=False, on_step=on_step, on_mesh=lambda local: mesh.update(local=local)
    )
    assert result.steps == 5 and result.version == 5
    assert len(statuses) == 1 and set(statuses.values()) == {5}
    history = [r for r in result.history if "outcome_reward" in r]
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5]
    assert all(r["failed_groups"] == 0 for r in history)
    # the held-out evaluations before and after training are part of the history the demo plots
    evaluations = [r for r in result.history if "heldout_accuracy" in r]
    assert [r["step"] for r in evaluations] == [0, 5] and result.n_eval == 4
    # ... and their outputs are kept, one line per problem, graded as the accuracy counts them
    for record in evaluations:
        outputs = read_outputs(tmp_path / "run", record["step"])
        assert len(outputs) == 4 and sum(o.solved for o in outputs) / 4 == record["heldout_accuracy"]
    before = weights(tiny_policy_dir)
    after = weights(export(tmp_path / "run" / "checkpoints" / "step-000005", tmp_path / "exported"))
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) > len(before) // 2, "PPO steps should change most weights"


def test_killed_learner_resumes_from_its_checkpoint(
    tiny_policy_dir, tiny_prm_dir, addition_problems, tmp_path
):
    out = tmp_path / "run"
    config = tmp_path / "up.yaml"
    config.write_text(yaml.safe_dump(settings(tiny_policy_dir, tiny_prm_dir, addition_problems, out, 6, 1)))
    command = [sys.executable, "-m", "puremesh.cli.main", "up", "--config", str(config)]
    journal = out / "metrics.jsonl"

    learner = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        steps = (
            [json.loads(line).get("step", 0) for line in journal.read_text().splitlines()]
            if journal.exists()
            else []
        )
        if steps and max(steps) >= 3:
            break
        assert learner.poll() is None, learner.stderr.read()
        time.sleep(0.2)
    learner.send_signal(signal.SIGKILL)
    learner.wait()
    first_run = [json.loads(line) for line in journal.read_text().splitlines()]
    checkpoint_step = max(r["step"] for r in first_run if r["step"] % 2 == 0)
    position_at_checkpoint = next(r["data_position"] for r in first_run if r["step"] == checkpoint_step)

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "trained 6 steps" in resumed.stdout
    records = [json.loads(line) for line in journal.read_text().splitlines()][len(first_run) :]
    assert records[0]["step"] == checkpoint_step + 1, "the step counter continues from the checkpoint"
    assert records[-1]["step"] == 6
    # the data position continues too: one step later it has moved by exactly one step's prompts
    assert (
        records[0]["data_position"][1] == (position_at_checkpoint[1] + 3) % 100
        or records[0]["data_position"][0] > 0
    )
    assert (out / "checkpoints" / "step-000006" / "training_state.json").exists()
    # the resumed policy version is newer than anything the first learner published
    assert records[0]["version"] > max(r["version"] for r in first_run if "version" in r)
    # the killed learner's services did not outlive it
    time.sleep(1)
    leftovers = subprocess.run(
        ["pgrep", "-f", str(out / "mesh")], capture_output=True, text=True
    ).stdout.split()
    assert [pid for pid in leftovers if int(pid) != os.getpid()] == []
