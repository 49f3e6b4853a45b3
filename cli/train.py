"""`puremesh train` (the learner against running services) and `puremesh up` (the whole mesh as
local processes on loopback, or with --ray as Ray Serve applications on a local Ray instance,
then the learner)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from puremesh.services.common.server import ServiceDefinition, ServiceHost
from puremesh.services.common.settings import ServerSettings, SettingsError, load_settings, log_settings
from puremesh.trainer.loop import Mesh, RunResult, train
from puremesh.trainer.settings import LearnerSettings
from puremesh.trainer.weights import WeightPublisher, WeightServicer, add_weight_service_to_server

from .errors import CliError
from .mesh import LocalMesh, MeshRollout, MeshScorer, MeshVerifier

log = logging.getLogger(__name__)
ENV_PREFIX = "PUREMESH__"


class RayLayout(BaseModel):
    """`puremesh up --ray`: the local Ray instance, and per service the fields of its Ray Serve
    deployment (services/common/ray_serve.py RayDeploymentSettings: min_replicas, max_replicas,
    target_ongoing_requests, num_cpus, num_gpus, ...). Locally each replica reserves no CPU
    (num_cpus 0) unless set, and rollout runs mesh.rollout_replicas replicas."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance; default: all")
    object_store_bytes: int = Field(256 << 20, ge=80 << 20, description="Ray's object store (shared memory)")
    grpc_port: int = Field(0, ge=0, le=65535, description="the Serve gRPC proxy's port; 0 picks a free one")
    rollout: dict[str, Any] = Field(default_factory=dict, description="RayDeploymentSettings of rollout")
    prm: dict[str, Any] = Field(default_factory=dict, description="RayDeploymentSettings of prm")
    verify: dict[str, Any] = Field(default_factory=dict, description="RayDeploymentSettings of verify")


class MeshLayout(BaseModel):
    """The local services `puremesh up` starts; each dict holds that service's settings fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rollout_replicas: int = Field(2, ge=1, le=16)
    rollout: dict[str, Any] = Field(
        default_factory=dict, description="RolloutSettings; model_path defaults to learner.policy_path"
    )
    prm: dict[str, Any] = Field(default_factory=dict, description="PrmSettings (model_path required)")
    verify: dict[str, Any] = Field(default_factory=dict, description="VerifySettings")
    ray: RayLayout = Field(default_factory=RayLayout, description="only for `puremesh up --ray`")


class RunSettings(BaseModel):
    """The file given to `puremesh up --config` and `puremesh train --config`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    learner: LearnerSettings
    mesh: MeshLayout = MeshLayout()


def register(sub: argparse._SubParsersAction) -> None:
    for name, helptext in (
        ("up", "start the services as local processes, then train (the embedded mesh)"),
        ("train", "run the learner against running services (endpoints in the config)"),
    ):
        parser = sub.add_parser(name, help=helptext, description=helptext)
        parser.add_argument("--config", required=True, help="YAML with `learner:` (and for up, `mesh:`)")
        parser.add_argument(
            "--resume", action="store_true", help="continue from the last checkpoint in out_dir"
        )
        parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
        if name == "up":
            parser.add_argument(
                "--ray",
                action="store_true",
                help="run the services as Ray Serve applications on a local Ray instance (gRPC proxy)",
            )
        parser.set_defaults(run=run_up if name == "up" else run_train)


def load_run_settings(path: str | Path | None, overrides: dict | None = None) -> RunSettings:
    try:
        return load_settings(RunSettings, path, ENV_PREFIX, overrides)
    except SettingsError as error:
        raise CliError(str(error)) from error


def run_up(args: argparse.Namespace) -> int:
    _logging(args.log_level)
    settings = load_run_settings(args.config)
    if args.ray:
        from .ray_mesh import run_mesh_ray

        result = asyncio.run(run_mesh_ray(settings, resume=args.resume))
    else:
        result = asyncio.run(run_mesh(settings, resume=args.resume))
    _print_result(result)
    return 0


def run_train(args: argparse.Namespace) -> int:
    _logging(args.log_level)
    settings = load_run_settings(args.config)
    endpoints = settings.learner.endpoints
    if not (endpoints.rollout and endpoints.prm and endpoints.verify):
        raise CliError("learner.endpoints needs rollout, prm and verify targets (or use `puremesh up`)")
    result = asyncio.run(_learn(settings.learner, replicas=len(endpoints.rollout), resume=args.resume))
    _print_result(result)
    return 0


async def _learn(
    learner: LearnerSettings,
    replicas: int,
    resume: bool,
    on_weights_ready=None,
    progress: bool = True,
    on_step=None,
) -> RunResult:
    """Host the WeightService, connect to the services, train."""
    weights = learner.weights
    publisher = WeightPublisher(
        retain=weights.retain_versions,
        chunk_bytes=weights.chunk_bytes,
        bulk_chunk_bytes=weights.bulk_chunk_bytes,
        bulk_host=weights.host if weights.bulk else None,
        bulk_port=weights.bulk_port,
        bulk_advertise_host=weights.bulk_advertise_host,
    )
    host = ServiceHost(
        [
            ServiceDefinition(
                "weights",
                "puremesh.weights.v1.WeightService",
                WeightServicer(publisher),
                add_weight_service_to_server,
            )
        ],
        ServerSettings(
            host=learner.weights.host, port=learner.weights.port, metrics_port=learner.metrics_port
        ),
    )
    try:
        await host.start()
    except BaseException:
        publisher.close()  # stops the bulk data plane's threads
        raise
    log_settings("learner", learner)
    if publisher.bulk is not None:
        log.info("weights: gRPC on %s, bulk data plane on port %d", host.target, publisher.bulk_port)
    try:
        if on_weights_ready is not None:
            learner = await on_weights_ready(host.target, learner)
        timeout = learner.endpoints.call_timeout_seconds
        apps = learner.endpoints.applications
        mesh = Mesh(
            MeshRollout(learner.endpoints.rollout, timeout, apps.get("rollout", "")),
            MeshScorer(learner.endpoints.prm, timeout, apps.get("prm", "")),
            MeshVerifier(learner.endpoints.verify, timeout, apps.get("verify", "")),
            publisher,
            replicas=replicas,
        )
        try:
            return await train(learner, mesh, resume=resume, progress=progress, on_step=on_step)
        finally:
            await asyncio.gather(
                mesh.rollout.pool.close(), mesh.scorer.pool.close(), mesh.verifier.pool.close()
            )
    finally:
        publisher.close()
        await host.drain(grace=1)


async def run_mesh(
    settings: RunSettings, resume: bool = False, progress: bool = True, on_step=None, on_mesh=None
) -> RunResult:
    """`puremesh up`: WeightService first (replicas subscribe to it), then the services, then train."""
    learner, layout = settings.learner, settings.mesh
    local = LocalMesh(Path(learner.out_dir) / "mesh")

    async def start_services(weights_target: str, learner: LearnerSettings) -> LearnerSettings:
        rollout = {"model_path": learner.policy_path, **layout.rollout, "weights_target": weights_target}
        jobs = [("verify", "verify", layout.verify), ("prm", "prm", layout.prm)]
        jobs += [
            (f"rollout-{i}", "rollout", {**rollout, "replica_id": f"rollout-{i}"})
            for i in range(layout.rollout_replicas)
        ]
        await local.start_many(jobs)
        if on_mesh is not None:
            on_mesh(local)
        endpoints = learner.endpoints.model_copy(
            update={
                "rollout": local.targets("rollout"),
                "prm": local.targets("prm"),
                "verify": local.targets("verify"),
            }
        )
        return learner.model_copy(update={"endpoints": endpoints})

    try:
        return await _learn(learner, layout.rollout_replicas, resume, start_services, progress, on_step)
    finally:
        await asyncio.to_thread(local.stop)


def _print_result(result: RunResult) -> None:
    line = f"trained {result.steps} steps (policy version {result.version}) in {result.seconds:.0f} s"
    if result.accuracy_after is not None:
        before = "" if result.accuracy_before is None else f"{result.accuracy_before:.3f} -> "
        line += f"; held-out greedy accuracy {before}{result.accuracy_after:.3f} (n={result.n_eval})"
    print(line)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
