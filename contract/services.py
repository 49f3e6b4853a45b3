"""The services of the mesh, by name: the one list every part of puremesh enumerates.

Each service's wire-level facts (its proto service and default ports) sit beside its name;
services/registry.py adds what implements it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ServiceName(StrEnum):
    ROLLOUT = "rollout"
    PRM = "prm"
    VERIFY = "verify"


@dataclass(frozen=True)
class ServiceInfo:
    name: ServiceName
    proto_service: str  # full proto name, e.g. "puremesh.prm.v1.PrmService"
    grpc_port: int  # default gRPC port of a standalone server
    metrics_port: int  # default Prometheus port (fixed per service, as the chart scrapes it)


SERVICES: dict[ServiceName, ServiceInfo] = {
    ServiceName.ROLLOUT: ServiceInfo(ServiceName.ROLLOUT, "puremesh.rollout.v1.RolloutService", 50051, 9101),
    ServiceName.PRM: ServiceInfo(ServiceName.PRM, "puremesh.prm.v1.PrmService", 50052, 9102),
    ServiceName.VERIFY: ServiceInfo(ServiceName.VERIFY, "puremesh.verify.v1.VerifyService", 50053, 9103),
}
WEIGHT_SERVICE = "puremesh.weights.v1.WeightService"
