"""Sharded checkpoints in a world of one rank (trainer/checkpoint.py): an exact resume, clear
refusals of a checkpoint of another rank count or model, a hostile `.metadata` that is never
unpickled, and `puremesh export` to a directory transformers loads. Resume on 2 ranks is
tests/distributed/."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from test_update import experience
from transformers import AutoModelForCausalLM, AutoTokenizer

from puremesh.cli.errors import CliError
from puremesh.cli.export import export
from puremesh.cli.main import main
from puremesh.tinyworld.models import build_policy
from puremesh.trainer import checkpoint
from puremesh.trainer.controller import build_trainable
from puremesh.trainer.ranks import start_ranks
from puremesh.trainer.safe_dcp import UnsafeCheckpoint
from puremesh.trainer.settings import LearnerSettings
from puremesh.trainer.sharding import gather_weights
from puremesh.trainer.update import UpdateSettings, ppo_update


@pytest.fixture
def ranks():
    ranks = start_ranks(LearnerSettings.model_fields["distributed"].default, "cpu")
    yield ranks
    ranks.close()


def settings(policy, out) -> LearnerSettings:
    return LearnerSettings.model_validate(
        {"policy_path": str(policy), "train_path": "unused", "out_dir": str(out), "algo": {"kl_coef": 0.01}}
    )


def step(trainable, config: LearnerSettings, ranks, seed: int) -> None:
    update = UpdateSettings(config.algo, config.optim, config.memory)
    ppo_update(
        trainable.model, trainable.reference, trainable.optimizer, experience(seed), update,
        trainable.generator, ranks,
    )  # fmt: skip


def save(trainable, config: LearnerSettings, ranks, at: int):
    state = checkpoint.TrainingState(
        at, at + 10, {"seed": 0, "epoch": 1, "index": at}, ranks.world, "float32",
        checkpoint.parameter_shapes(trainable.model),
    )  # fmt: skip
    return checkpoint.save(config.out_dir, trainable, ranks, state, config.policy_path, keep=2)


@pytest.fixture
def saved(tiny_policy_dir, tmp_path, ranks):
    """A checkpoint after one update, and what the next update leads to from there."""
    config = settings(tiny_policy_dir, tmp_path / "run")
    trainable = build_trainable(config, ranks)
    step(trainable, config, ranks, 1)
    path = save(trainable, config, ranks, 1)
    rng = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    step(trainable, config, ranks, 2)
    after = dict(gather_weights(trainable.model, torch.float32, ranks))
    return config, path, after, trainable, rng


def test_resume_is_exact(saved, ranks) -> None:
    config, path, after, first, rng = saved
    assert checkpoint.latest(config.out_dir) == path
    resumed = build_trainable(config, ranks)
    state = checkpoint.load(path, resumed, ranks)
    assert (state.step, state.version, state.data_position["index"]) == (1, 11, 1)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == rng
    step(resumed, config, ranks, 2)
    again = dict(gather_weights(resumed.model, torch.float32, ranks))
    assert all(torch.equal(after[name], again[name]) for name in after)
    assert torch.equal(first.generator.get_state(), resumed.generator.get_state())
    mine = resumed.optimizer.state_dict()["state"]
    theirs = first.optimizer.state_dict()["state"]
    assert all(
        torch.equal(mine[k]["exp_avg_sq"].full_tensor(), theirs[k]["exp_avg_sq"].full_tensor()) for k in mine
    )


def test_a_checkpoint_of_another_rank_count_is_refused(saved, ranks) -> None:
    config, path, *_ = saved
    state_file = path / checkpoint.STATE_FILE
    raw = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**raw, "world_size": 2}))
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"written by 2 rank\(s\) and this run has 1"):
        checkpoint.load(path, build_trainable(config, ranks), ranks)


def test_a_checkpoint_of_another_model_is_refused(saved, tiny_tokenizer_dir, tmp_path, ranks) -> None:
    _, path, *_ = saved
    other = tmp_path / "wider"
    build_policy(
        other, AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)), hidden_size=64, num_attention_heads=2
    )
    with pytest.raises(checkpoint.CheckpointMismatch, match="holds another model"):
        checkpoint.load(path, build_trainable(settings(other, tmp_path / "run2"), ranks), ranks)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PUREMESH_TEST_MARKER']}",))


def test_a_hostile_metadata_file_is_never_unpickled(saved, tmp_path, ranks, monkeypatch) -> None:
    config, path, *_ = saved
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PUREMESH_TEST_MARKER", str(marker))
    (path / checkpoint.WEIGHTS_DIR / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(UnsafeCheckpoint, match=r"(posix|os)\.system"):
        checkpoint.load(path, build_trainable(config, ranks), ranks)
    with pytest.raises(CliError, match="cannot export"):
        export(path, tmp_path / "exported")
    assert not marker.exists()


def test_export_writes_a_model_directory_transformers_loads(saved, tmp_path, capsys, ranks) -> None:
    config, path, *_ = saved
    out = tmp_path / "exported"
    # a run directory names its newest checkpoint
    assert main(["export", "--checkpoint", config.out_dir, "--out", str(out)]) == 0
    assert f"exported {out}" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    reference = build_trainable(config, ranks)
    checkpoint.load(path, reference, ranks)
    expected = dict(gather_weights(reference.model, torch.float32, ranks))
    loaded = {name: parameter.detach() for name, parameter in model.named_parameters()}
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(out)]) == 2
