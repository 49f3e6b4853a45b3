"""What implements each service of contract/services.py: its settings model, its
ServiceDefinition factory, its client, its Ray Serve application and deployment.

The entries name their parts by import path, resolved on first use: a command that runs one
service never imports the others' models (the PRM's torch, the rollout's vLLM).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from puremesh.contract.services import SERVICES, ServiceInfo, ServiceName


@dataclass(frozen=True)
class ServiceEntry:
    info: ServiceInfo
    package: str  # "puremesh.services.rollout"
    settings_class: str  # in <package>.settings
    factory: str  # in <package>.app: settings -> rpc.server.ServiceDefinition
    client_class: str  # in <package>.client
    deployment: str  # the Ray Serve deployment class in <package>.ray_app
    servicer_function: str  # add_<Service>Servicer_to_server, for Ray Serve's gRPC proxy

    @property
    def name(self) -> ServiceName:
        return self.info.name

    def settings_module(self) -> Any:
        """The settings module (its model is `settings_class`, its env prefix ENV_PREFIX)."""
        return importlib.import_module(f"{self.package}.settings")

    def settings_model(self) -> type:
        return getattr(self.settings_module(), self.settings_class)

    @property
    def env_prefix(self) -> str:
        return self.settings_module().ENV_PREFIX

    def build(self, settings: Any) -> Any:
        """The service's ServiceDefinition, from its settings."""
        return getattr(importlib.import_module(f"{self.package}.app"), self.factory)(settings)

    def client(self) -> type:
        return getattr(importlib.import_module(f"{self.package}.client"), self.client_class)

    @property
    def ray_app(self) -> str:
        """serveConfigV2 import_path of the service's Ray Serve application builder."""
        return f"{self.package}.ray_app:build_app"

    def ray_builder(self) -> Any:
        """build_app(args) of the service's Ray Serve application."""
        return self._ray_module().build_app

    def ray_spec(self) -> Any:
        """The services/ray_serve.py ServiceSpec of the service's Ray Serve application."""
        return self._ray_module().SPEC

    def _ray_module(self) -> Any:
        return importlib.import_module(f"{self.package}.ray_app")


def _entry(name: ServiceName, service: str) -> ServiceEntry:
    package = f"puremesh.services.{name}"
    proto = SERVICES[name].proto_service
    module = f"puremesh.{name}.v1.{name}_pb2_grpc"
    return ServiceEntry(
        SERVICES[name],
        package,
        settings_class=f"{service}Settings",
        factory=f"{name}_service",
        client_class=f"{service}Client",
        deployment=f"{service}Deployment",
        servicer_function=f"{module}.add_{proto.rsplit('.', 1)[1]}Servicer_to_server",
    )


REGISTRY: dict[ServiceName, ServiceEntry] = {
    ServiceName.ROLLOUT: _entry(ServiceName.ROLLOUT, "Rollout"),
    ServiceName.PRM: _entry(ServiceName.PRM, "Prm"),
    ServiceName.VERIFY: _entry(ServiceName.VERIFY, "Verify"),
}
assert REGISTRY.keys() == SERVICES.keys(), "every service of contract/services.py has an entry"


def entry(name: str) -> ServiceEntry:
    """The entry of `name` ("rollout", "prm" or "verify"); KeyError otherwise."""
    return REGISTRY[ServiceName(name)]
