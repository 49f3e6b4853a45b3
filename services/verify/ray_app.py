"""The verify service as a Ray Serve application: `puremesh.services.verify.ray_app:build_app`
(names, args and ports: services/ray_serve.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from puremesh.services.ray_serve import APPS, ServiceReplica, ServiceSpec, build_application
from puremesh.verify.v1 import verify_pb2

from .app import verify_service
from .settings import ENV_PREFIX, VerifySettings

SPEC = ServiceSpec(
    app=APPS["verify"],
    settings_model=VerifySettings,
    env_prefix=ENV_PREFIX,
    factory=verify_service,
    # Items wait for a free grading process inside the replica: a few calls in flight each.
    deployment_defaults={"max_ongoing_requests": 32, "target_ongoing_requests": 8},
)


class VerifyDeployment(ServiceReplica):
    """VerifyService on Ray Serve: the RPC methods call VerifyServicer's."""

    spec = SPEC

    async def Verify(self, request: verify_pb2.VerifyRequest, grpc_context=None):
        return await self.unary("Verify", request, grpc_context)


def build_app(args: Mapping[str, Any] | None = None):
    """serveConfigV2 import_path `puremesh.services.verify.ray_app:build_app`."""
    return build_application(SPEC, VerifyDeployment, args)
