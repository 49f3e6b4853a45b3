"""The rollout service as a Ray Serve application: `puremesh.services.rollout.ray_app:build_app`
(names, args and ports: services/ray_serve.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from puremesh.rollout.v1 import rollout_pb2
from puremesh.rpc.settings import SettingsError
from puremesh.services.ray_serve import (
    APPS,
    RayDeploymentSettings,
    ServiceReplica,
    ServiceSpec,
    build_application,
    parse_args,
)

from .app import rollout_service
from .servicer import SERVICE
from .settings import ENV_PREFIX, RolloutSettings


def _prepare(settings: RolloutSettings, tag: str) -> RolloutSettings:
    # Every replica gets its own id (the learner tracks the version each replica holds).
    return settings.model_copy(update={"replica_id": f"{settings.replica_id or SERVICE}-{tag}"})


def gpu_request(settings: RolloutSettings, deployment: RayDeploymentSettings) -> RayDeploymentSettings:
    """A vllm replica on cuda reserves one GPU per tensor-parallel rank: num_gpus 0 (the default)
    becomes tensor_parallel_size; fewer GPUs than that cannot hold the replica (SettingsError)."""
    if settings.engine != "vllm" or not settings.device.startswith("cuda"):
        return deployment
    needed = settings.tensor_parallel_size
    if deployment.num_gpus == 0:
        return deployment.model_copy(update={"num_gpus": float(needed)})
    if deployment.num_gpus < needed:
        raise SettingsError(
            f"rollout deployment num_gpus {deployment.num_gpus:g} is below tensor_parallel_size {needed}: "
            "a replica needs one GPU per rank"
        )
    return deployment


SPEC = ServiceSpec(
    app=APPS["rollout"],
    settings_model=RolloutSettings,
    env_prefix=ENV_PREFIX,
    factory=rollout_service,
    prepare=_prepare,
    # A replica batches concurrent Generate calls in its engine: many in flight each.
    deployment_defaults={"max_ongoing_requests": 64, "target_ongoing_requests": 16},
)


class RolloutDeployment(ServiceReplica):
    """RolloutService on Ray Serve: the RPC methods call RolloutServicer's."""

    spec = SPEC

    async def Generate(
        self, request: rollout_pb2.GenerateRequest, grpc_context=None
    ) -> AsyncIterator[rollout_pb2.GenerateResponse]:
        async for message in self.stream("Generate", request, grpc_context):
            yield message

    async def GetStatus(self, request: rollout_pb2.GetStatusRequest, grpc_context=None):
        return await self.unary("GetStatus", request, grpc_context)


def with_gpus(args: Mapping[str, Any] | None) -> dict[str, Any]:
    """build_app's args with the deployment's num_gpus from `gpu_request` (SettingsError for
    settings or deployment options that are invalid, or too few GPUs)."""
    settings, deployment = parse_args(SPEC, args)
    requested = gpu_request(SPEC.load(settings), deployment)
    given = dict(args or {})
    given["deployment"] = {**dict(given.get("deployment") or {}), "num_gpus": requested.num_gpus}
    return given


def build_app(args: Mapping[str, Any] | None = None):
    """serveConfigV2 import_path `puremesh.services.rollout.ray_app:build_app`."""
    return build_application(SPEC, RolloutDeployment, with_gpus(args))
