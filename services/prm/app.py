"""Assembles the PRM service for a ServiceHost."""

from __future__ import annotations

from puremesh.prm.v1 import prm_pb2_grpc
from puremesh.rpc.server import ServiceDefinition

from .servicer import SERVICE, PrmServicer
from .settings import PrmSettings


def prm_service(settings: PrmSettings) -> ServiceDefinition:
    servicer = PrmServicer(settings)
    return ServiceDefinition(
        name=SERVICE,
        full_name="puremesh.prm.v1.PrmService",
        servicer=servicer,
        add_to_server=prm_pb2_grpc.add_PrmServiceServicer_to_server,
        start=servicer.start,
        stop=servicer.stop,
    )
