"""Experiment trackers (`learner.trackers`): a short run on the real mesh writes a TensorBoard log
and an offline W&B run, and both hold the step's metrics under the Prometheus series' names.

The W&B run is read back from its `.wandb` file: W&B's LevelDB-style log (a 7-byte file header,
then 32 KiB blocks of records, each with a 7-byte header: CRC, length, kind), each payload one
`wandb_internal_pb2.Record`; the history records carry the logged values.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from puremesh.cli.process_mesh import run_mesh
from puremesh.cli.run_settings import RunSettings
from puremesh.trainer import metrics
from puremesh.trainer.settings import LearnerSettings, WandbMode

pytestmark = pytest.mark.integration

WANDB_HEADER = 7
WANDB_BLOCK = 32 * 1024
WANDB_FULL, WANDB_LAST = 1, 4
STEPS = 2


def wandb_history(run_file: Path) -> list[dict[str, str]]:
    """The history records (key -> JSON value) of an offline W&B run file."""
    data, position, payload, out = run_file.read_bytes(), WANDB_HEADER, b"", []
    while position + 7 <= len(data):
        left = WANDB_BLOCK - position % WANDB_BLOCK
        length, kind = struct.unpack_from("<HB", data, position + 4)
        if left < 7 or (length, kind) == (0, 0):  # the block's zero-filled tail
            position += left
            continue
        payload += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (WANDB_FULL, WANDB_LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                out.append(
                    {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                )
    return out


def prometheus_names() -> set[str]:
    return {metric.name for metric in REGISTRY.collect() if metric.name.startswith(metrics.PREFIX)}


@pytest.fixture
def no_wandb_credentials(monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


async def test_a_short_run_writes_both_trackers(
    tiny_policy_dir, tiny_prm_dir, addition_problems, tmp_path, no_wandb_credentials
):
    config = RunSettings.model_validate(
        {
            "learner": {
                "policy_path": str(tiny_policy_dir),
                "train_path": str(addition_problems),
                "out_dir": str(tmp_path / "run"),
                "steps": STEPS,
                "optim": {"lr": 1e-4, "minibatches": 1},
                "sampling": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8},
                "trackers": ["tensorboard", "wandb"],
                "tracking": {"run_name": "short"},
            },
            "mesh": {
                "rollout_replicas": 1,
                "rollout": {"engine": "hf"},
                "prm": {"model_path": str(tiny_prm_dir)},
                "verify": {"workers": 1},
            },
        }
    )
    result = await run_mesh(config, progress=False)
    assert result.steps == STEPS
    trackers = tmp_path / "run" / "trackers"

    events = EventAccumulator(str(trackers / "tensorboard" / "short"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        f"{metrics.PREFIX}{name}" for name in ("step", "outcome_reward", "kl", "steps_per_response")
    } <= tags
    assert [e.step for e in events.Scalars(f"{metrics.PREFIX}step")] == list(range(1, STEPS + 1))
    last = result.history[-1]
    [reward] = [e.value for e in events.Scalars(f"{metrics.PREFIX}outcome_reward") if e.step == STEPS]
    assert reward == pytest.approx(last["outcome_reward"], rel=1e-5)
    # the same names as the Prometheus series (labelled gauges as NAME/LABEL)
    assert {tag.split("/")[0] for tag in tags} <= prometheus_names()

    [run_file] = (trackers / "wandb").glob("offline-run-*/run-*.wandb")
    history = [h for h in wandb_history(run_file) if f"{metrics.PREFIX}step" in h]
    assert [int(float(h[f"{metrics.PREFIX}step"])) for h in history] == list(range(1, STEPS + 1))
    assert float(history[-1][f"{metrics.PREFIX}outcome_reward"]) == pytest.approx(last["outcome_reward"])
    assert {key.split("/")[0] for h in history for key in h if not key.startswith("_")} <= prometheus_names()


def test_no_trackers_by_default_and_the_wandb_mode(no_wandb_credentials, monkeypatch, tmp_path):
    settings = LearnerSettings(policy_path="p", train_path="t", out_dir=str(tmp_path))
    assert settings.trackers == []
    metrics.TRACKERS.open(settings)
    assert metrics.TRACKERS.sinks == [] and not (tmp_path / "trackers").exists()
    assert metrics.wandb_mode(WandbMode.AUTO) == "offline"  # no network configured
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert metrics.wandb_mode(WandbMode.AUTO) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert metrics.wandb_mode(WandbMode.AUTO) == "disabled"
    assert metrics.wandb_mode(WandbMode.OFFLINE) == "offline"
