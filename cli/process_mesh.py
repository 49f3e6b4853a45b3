"""`puremesh up`: the learner's WeightService first (replicas subscribe to it), then the services
as local processes on loopback (cli/launcher.py), then training."""

from __future__ import annotations

import asyncio
from pathlib import Path

from puremesh.contract.services import ServiceName
from puremesh.trainer.loop import RunResult
from puremesh.trainer.settings import LearnerSettings

from .launcher import LocalMesh
from .learner import learn
from .run_settings import RunSettings

ROLLOUT = ServiceName.ROLLOUT


async def run_mesh(
    settings: RunSettings, resume: bool = False, progress: bool = True, on_step=None, on_mesh=None
) -> RunResult:
    """`puremesh up`: WeightService first (replicas subscribe to it), then the services, then train."""
    learner, layout = settings.learner, settings.mesh
    local = LocalMesh(Path(learner.out_dir) / "mesh", supervision=layout.supervision)

    async def start_services(weights_target: str, learner: LearnerSettings) -> LearnerSettings:
        rollout = {"model_path": learner.policy_path, **layout.rollout, "weights_target": weights_target}
        jobs = [(str(name), str(name), layout.service(name)) for name in ServiceName if name != ROLLOUT]
        jobs += [
            (f"rollout-{i}", ROLLOUT, {**rollout, "replica_id": f"rollout-{i}"})
            for i in range(layout.rollout_replicas)
        ]
        await local.start_many(jobs)
        if on_mesh is not None:
            on_mesh(local)
        endpoints = learner.endpoints.model_copy(
            update={str(name): local.targets(name) for name in ServiceName}
        )
        return learner.model_copy(update={"endpoints": endpoints})

    try:
        return await learn(learner, layout.rollout_replicas, resume, start_services, progress, on_step)
    finally:
        await asyncio.to_thread(local.stop)
