"""Assembles the verify service for a ServiceHost."""

from __future__ import annotations

from puremesh.contract.services import SERVICES, ServiceName
from puremesh.rpc.server import ServiceDefinition
from puremesh.verify.v1 import verify_pb2_grpc

from .pool import GradingPool
from .servicer import SERVICE, VerifyServicer
from .settings import VerifySettings


def verify_service(settings: VerifySettings) -> ServiceDefinition:
    pool = GradingPool(settings.workers)
    return ServiceDefinition(
        name=SERVICE,
        full_name=SERVICES[ServiceName.VERIFY].proto_service,
        servicer=VerifyServicer(settings, pool),
        add_to_server=verify_pb2_grpc.add_VerifyServiceServicer_to_server,
        start=pool.start,
        stop=pool.close,
    )
