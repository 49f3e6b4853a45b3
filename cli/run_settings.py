"""The file given to `puremesh up --config` and `puremesh train --config`: a `learner:` section
(trainer/settings.py) and, for `up`, a `mesh:` section (the local services)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from puremesh.rpc.settings import FrozenSettings, SettingsError, load_settings
from puremesh.trainer.settings import LearnerSettings

from .errors import CliError
from .launcher import SupervisionSettings

ENV_PREFIX = "PUREMESH__"


class RayLayout(FrozenSettings):
    """`puremesh up --ray`: the local Ray instance, and per service the fields of its Ray Serve
    deployment (services/ray_serve.py RayDeploymentSettings: min_replicas, max_replicas,
    target_ongoing_requests, num_cpus, num_gpus, ...). Locally each replica reserves no CPU
    (num_cpus 0) unless set, and rollout runs mesh.rollout_replicas replicas."""

    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance; default: all")
    object_store_bytes: int = Field(256 << 20, ge=80 << 20, description="Ray's object store (shared memory)")
    grpc_port: int = Field(0, ge=0, le=65535, description="the Serve gRPC proxy's port; 0 picks a free one")
    rollout: dict[str, Any] = Field(default_factory=dict, description="RayDeploymentSettings of rollout")
    prm: dict[str, Any] = Field(default_factory=dict, description="RayDeploymentSettings of prm")
    verify: dict[str, Any] = Field(default_factory=dict, description="RayDeploymentSettings of verify")


class MeshLayout(FrozenSettings):
    """The local services `puremesh up` starts; each dict holds that service's settings fields."""

    rollout_replicas: int = Field(2, ge=1, le=16)
    rollout: dict[str, Any] = Field(
        default_factory=dict, description="RolloutSettings; model_path defaults to learner.policy_path"
    )
    prm: dict[str, Any] = Field(default_factory=dict, description="PrmSettings (model_path required)")
    verify: dict[str, Any] = Field(default_factory=dict, description="VerifySettings")
    ray: RayLayout = Field(default_factory=RayLayout, description="only for `puremesh up --ray`")
    supervision: SupervisionSettings = Field(
        default_factory=SupervisionSettings,
        description="restarting the local services that die (cli/launcher.py); not for --ray",
    )

    def service(self, name: str) -> dict[str, Any]:
        """The settings fields of service `name` (contract/services.py ServiceName)."""
        return getattr(self, str(name))


class RunSettings(FrozenSettings):
    """The file given to `puremesh up --config` and `puremesh train --config`."""

    learner: LearnerSettings
    mesh: MeshLayout = MeshLayout()


def load_run_settings(path: str | Path | None, overrides: dict | None = None) -> RunSettings:
    try:
        return load_settings(RunSettings, path, ENV_PREFIX, overrides)
    except SettingsError as error:
        raise CliError(str(error)) from error
