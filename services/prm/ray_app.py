"""The PRM service as a Ray Serve application: `puremesh.services.prm.ray_app:build_app`
(names, args and ports: services/ray_serve.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from puremesh.prm.v1 import prm_pb2
from puremesh.services.ray_serve import APPS, ServiceReplica, ServiceSpec, build_application

from .app import prm_service
from .settings import ENV_PREFIX, PrmSettings

SPEC = ServiceSpec(
    app=APPS["prm"],
    settings_model=PrmSettings,
    env_prefix=ENV_PREFIX,
    factory=prm_service,
    # Concurrent calls are coalesced into one forward pass: let many in.
    deployment_defaults={"max_ongoing_requests": 64, "target_ongoing_requests": 16},
)


class PrmDeployment(ServiceReplica):
    """PrmService on Ray Serve: the RPC methods call PrmServicer's."""

    spec = SPEC

    async def ScoreSteps(self, request: prm_pb2.ScoreStepsRequest, grpc_context=None):
        return await self.unary("ScoreSteps", request, grpc_context)

    async def DescribeTokenizer(self, request: prm_pb2.DescribeTokenizerRequest, grpc_context=None):
        return await self.unary("DescribeTokenizer", request, grpc_context)


def build_app(args: Mapping[str, Any] | None = None):
    """serveConfigV2 import_path `puremesh.services.prm.ray_app:build_app`."""
    return build_application(SPEC, PrmDeployment, args)
