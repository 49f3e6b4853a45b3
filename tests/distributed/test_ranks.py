"""The learner on 2 real gloo ranks: the same update as on 1 rank, ranks that agree on what
they train on, an exact resume on 2 ranks, and bounded, one-line failures for a rank that dies,
hangs or cannot rendezvous."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from rank_workers import learner_settings, run_updates
from safetensors.torch import load_file

from puremesh.trainer import checkpoint
from puremesh.trainer.controller import build_trainable
from puremesh.trainer.ranks import start_ranks

WORKERS = Path(__file__).with_name("rank_workers.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_update_as_one_rank_does(launcher, tiny_policy_dir, tmp_path) -> None:
    two = learner_settings(tiny_policy_dir, tmp_path / "two")
    seen = launcher(run_updates, 2, two.model_dump_json(), 2, str(tmp_path / "two.safetensors"))
    one = run_updates(
        learner_settings(tiny_policy_dir, tmp_path / "one").model_dump_json(),
        2,
        str(tmp_path / "one.safetensors"),
    )
    # the ranks agree on every step's data position, policy version and experience
    assert seen[1]["records"] == seen[0]["records"] == one["records"]
    assert [r["step"] for r in seen[0]["records"]] == [1, 2]
    start = load_file(str(tiny_policy_dir / "model.safetensors"))
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    moved = max(float((a[n] - start[n]).abs().max()) for n in start)
    assert moved > 1e-3
    # Adam amplifies float noise in near-zero gradients; 2% of the step is far below a wrong update
    assert max(float((a[n] - b[n]).abs().max()) for n in start) < 0.02 * moved
    for mine, theirs in zip(one["stats"], seen[0]["stats"], strict=True):
        for key in ("policy_loss", "grad_norm", "ratio_mean", "clip_fraction", "kl", "outcome_reward"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-6), key
    assert seen[0]["generator"] == one["generator"]


def test_a_checkpoint_taken_on_two_ranks_resumes_exactly_on_two(launcher, tiny_policy_dir, tmp_path) -> None:
    config = learner_settings(tiny_policy_dir, tmp_path / "run")
    straight = launcher(
        run_updates, 2, config.model_dump_json(), 3, str(tmp_path / "straight.safetensors"), "", 2
    )
    saved = checkpoint.latest(config.out_dir)
    assert saved is not None and saved.name == "step-000002"
    assert sorted(p.name for p in (saved / checkpoint.RNG_DIR).iterdir()) == [
        "rank-00000.json",
        "rank-00001.json",
    ]
    resumed = launcher(
        run_updates, 2, config.model_dump_json(), 1, str(tmp_path / "resumed.safetensors"), str(saved)
    )
    assert [r["step"] for r in resumed[0]["records"]] == [3] and resumed[1]["records"] == resumed[0][
        "records"
    ]
    assert resumed[0]["records"] == straight[0]["records"][2:]
    a, b = load_file(str(tmp_path / "straight.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a), "weights and Adam state resumed exactly"
    assert resumed[0]["generator"] == straight[0]["generator"]
    state = checkpoint.read_state(saved)
    assert (state.step, state.world_size, state.data_position) == (2, 2, {"step": 2})
    # the same checkpoint on one rank is refused with one line
    ranks = start_ranks(config.distributed, "cpu")
    try:
        with pytest.raises(checkpoint.CheckpointMismatch, match="--nproc-per-node 2"):
            checkpoint.load(saved, build_trainable(config, ranks), ranks)
    finally:
        ranks.close()


def _two_ranks(tmp_path: Path, mode: str, timeout: float) -> tuple[list[subprocess.Popen], Path]:
    config = learner_settings(
        tmp_path.parent / "policy-link", tmp_path / "run",
        distributed={"collective_timeout_seconds": timeout, "command_timeout_seconds": timeout},
    )  # fmt: skip
    marker = tmp_path / "rank0.json"
    port = free_port()
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        command = [sys.executable, str(WORKERS), config.model_dump_json(), mode, str(marker)]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        )
    return processes, marker


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_rank_that_dies_or_hangs_ends_the_run_in_bounded_time(mode, tiny_policy_dir, tmp_path) -> None:
    (tmp_path.parent / "policy-link").unlink(missing_ok=True)
    (tmp_path.parent / "policy-link").symlink_to(tiny_policy_dir)
    processes, marker = _two_ranks(tmp_path, mode, timeout=5.0)
    began = time.monotonic()
    try:
        assert processes[0].wait(timeout=120) == 3, processes[0].stderr.read().decode()[-2000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    elapsed = time.monotonic() - began
    outcome = json.loads(marker.read_text())
    assert outcome["type"] == "RankFailure"
    assert outcome["message"].startswith("rank 0 of 2: ") and "\n" not in outcome["message"]
    assert "another rank died or did not answer within 5 s" in outcome["message"]
    assert outcome["seconds"] < (30 if mode == "hang" else 20)
    assert elapsed < 120


def test_a_rank_that_cannot_rendezvous_fails_with_one_line(tiny_policy_dir, tmp_path) -> None:
    config = tmp_path / "learner.yaml"
    learner = learner_settings(
        tiny_policy_dir, tmp_path / "run", distributed={"collective_timeout_seconds": 3}
    )
    endpoints = {"rollout": ["127.0.0.1:1"], "prm": ["127.0.0.1:1"], "verify": ["127.0.0.1:1"]}
    fields = {**learner.model_dump(mode="json"), "endpoints": endpoints}
    config.write_text(yaml.safe_dump({"learner": fields}))
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "puremesh.cli.main", "train", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "puremesh train: error: rank 1 of 2 could not rendezvous with the other ranks at 127.0.0.1:"
    )
    assert time.monotonic() - began < 60
