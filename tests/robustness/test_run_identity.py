"""Run identity across learner restarts (issue 12, point 1), on the real mesh on loopback.

The services run once, as local processes (the rollout replica follows a fixed learner port),
and learners come and go against them, as on Kubernetes where the learner Job restarts beside
a RayService that keeps running:

- a fresh learner against a replica that still holds an earlier run's version trains only on
  its own policy (its ledger holds no sample of the other run, and none of a newer version);
- a resumed learner continues above the highest version its run announced, whatever a
  client reports (a spoofed current_version of 2^53, an idle WatchVersions stream under a
  made-up id, which must not hold up the on-policy barrier either).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import grpc
import pytest

from puremesh.cli.launcher import LocalMesh, SupervisionSettings
from puremesh.cli.learner import learn
from puremesh.contract.weights import MAX_VERSION
from puremesh.trainer.ledger import audit
from puremesh.trainer.settings import LearnerSettings
from puremesh.weights.v1 import weights_pb2, weights_pb2_grpc
from puremesh.weightsync import runs

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def services(tiny_policy_dir, tiny_prm_dir, tmp_path_factory):
    """rollout (following 127.0.0.1:<weights port>), prm and verify, for the whole module."""
    port = free_port()
    local = LocalMesh(tmp_path_factory.mktemp("services"), supervision=SupervisionSettings(restart=False))
    rollout = {
        "model_path": str(tiny_policy_dir),
        "engine": "hf",
        "replica_id": "r0",
        "weights_target": f"127.0.0.1:{port}",
        "weights_sync_timeout_seconds": 1.0,
    }
    jobs = [
        ("rollout", "rollout", rollout),
        ("prm", "prm", {"model_path": str(tiny_prm_dir)}),
        ("verify", "verify", {"workers": 1}),
    ]
    asyncio.run(local.start_many(jobs))
    yield local, port
    local.stop()


def learner_settings(services, policy: Path, problems: Path, out: Path, steps: int) -> LearnerSettings:
    local, port = services
    return LearnerSettings.model_validate(
        {
            "policy_path": str(policy),
            "train_path": str(problems),
            "out_dir": str(out),
            "steps": steps,
            "checkpoint_every": 1,
            "optim": {"lr": 1e-4, "minibatches": 1},
            "sampling": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6},
            "weights": {"port": port},
            "endpoints": {name: local.targets(name) for name in ("rollout", "prm", "verify")},
        }
    )


def used_runs(out: Path, run_id: str):
    result = audit(out / "ledger.jsonl", run_id)
    assert result.samples_lost == result.samples_used_twice == 0
    return result


async def test_a_fresh_learner_trains_only_on_its_own_policy(
    services, tiny_policy_dir, addition_problems, tmp_path
) -> None:
    first = learner_settings(services, tiny_policy_dir, addition_problems, tmp_path / "a", steps=2)
    await learn(first, replicas=1, resume=False, progress=False)
    run_a = runs.read(tmp_path / "a" / runs.RUN_FILE)
    assert run_a is not None and run_a.published == 2  # the replica now holds version 2 of run A

    second = learner_settings(services, tiny_policy_dir, addition_problems, tmp_path / "b", steps=1)
    result = await learn(second, replicas=1, resume=False, progress=False)
    run_b = runs.read(tmp_path / "b" / runs.RUN_FILE)
    assert run_b is not None and run_b.run_id != run_a.run_id
    # the replica held run A's version 2: run B published its starting weights as version 1
    assert result.version == 2 and run_b.published == 2
    ledger = used_runs(tmp_path / "b", run_b.run_id)
    assert ledger.wrong_versions == 0 and ledger.runs <= {run_b.run_id}
    assert ledger.groups_per_step == {1: 2}


async def test_a_resumed_learner_ignores_spoofed_versions_and_idle_watchers(
    services, tiny_policy_dir, addition_problems, tmp_path
) -> None:
    out = tmp_path / "run"
    await learn(
        learner_settings(services, tiny_policy_dir, addition_problems, out, 1), 1, False, progress=False
    )
    run = runs.read(out / runs.RUN_FILE)
    assert run is not None and run.published in (1, 2)  # 2 when the replica held another run
    spoofs: list[grpc.aio.UnaryStreamCall] = []
    channels: list[grpc.aio.Channel] = []

    async def spoof(target: str, settings: LearnerSettings) -> LearnerSettings:
        """Made-up subscribers open their streams as soon as the learner serves weights."""
        channel = grpc.aio.insecure_channel(target)
        channels.append(channel)
        stub = weights_pb2_grpc.WeightServiceStub(channel)
        for current in (MAX_VERSION, 2**40):
            request = weights_pb2.WatchVersionsRequest(
                replica_id=f"spoof-{current}", current_version=current, run_id=run.run_id
            )
            spoofs.append(stub.WatchVersions(request))
        return settings

    began = time.monotonic()
    settings = learner_settings(services, tiny_policy_dir, addition_problems, out, 3)
    result = await learn(settings, replicas=1, resume=True, on_weights_ready=spoof, progress=False)
    elapsed = time.monotonic() - began
    for call in spoofs:
        call.cancel()
    for channel in channels:
        await channel.close()
    assert result.steps == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r.get("step", 0) > 1 and "version" in r]
    # resumed from the checkpoint of step 1 above the run's highest announced version
    assert [r["version"] for r in resumed] == [run.published + 2, run.published + 3]
    assert elapsed < 90, "idle made-up watchers must not hold up the on-policy barrier"
    ledger = used_runs(out, run.run_id)
    assert ledger.wrong_versions == 0 and sorted(ledger.groups_per_step) == [1, 2, 3]
