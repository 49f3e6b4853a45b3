"""`puremesh up --ray`: the mesh of `puremesh up`, with the services as Ray Serve applications
(services/ray_serve.py) on a local Ray instance, reached through Ray Serve's gRPC proxy.

The learner is the same code as for the process mesh: only its endpoints (the proxy, one
target for every service) and the `application` metadata on its calls differ. As there, the
learner's WeightService starts first, and every rollout replica pulls the current weights from
it before it reports ready. Ray's own logs go to its session folder (logged at start), not to
the terminal.

Security: the proxy listens on loopback only (cli/ray_loopback.py). Each deployment checks the
bearer token of its service's `server.auth_tokens` with the same host logic as a standalone
server (the proxy passes the metadata on); the proxy has no TLS, so the learner sends each
service's token in the clear on loopback, and the TLS fields of learner.endpoints.security are
not used here (README "Security": a service mesh encrypts it in a cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from puremesh.contract.services import ServiceName
from puremesh.rpc.settings import ClientSecurity, SettingsError
from puremesh.services.ray_serve import APPS, GRPC_SERVICER_FUNCTIONS
from puremesh.services.registry import entry
from puremesh.trainer.loop import RunResult
from puremesh.trainer.settings import LearnerSettings

from .errors import CliError
from .learner import learn
from .ray_loopback import HOOK
from .run_settings import MeshLayout, RayLayout, RunSettings

log = logging.getLogger(__name__)

# Where the replicas of a laptop mesh run: they share the machine, as the processes of
# `puremesh up` do, instead of each reserving a CPU that a small machine does not have.
LOCAL_DEPLOYMENT = {"num_cpus": 0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LocalRayServe:
    """A local Ray instance with Ray Serve and its gRPC proxy on `target`; `stop()` ends both."""

    layout: RayLayout = field(default_factory=RayLayout)
    target: str = ""
    session_dir: str = ""
    apps: list[str] = field(default_factory=list)

    def start(self) -> None:
        import ray
        from ray import serve
        from ray.serve.config import gRPCOptions

        ray.init(
            address="local",  # a new instance, never one that happens to run on this machine
            num_cpus=self.layout.num_cpus or os.cpu_count(),
            object_store_memory=self.layout.object_store_bytes,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env={"worker_process_setup_hook": HOOK},  # the gRPC proxy on loopback
        )
        self.session_dir = _session_dir()
        log.info("local Ray instance started; logs in %s/logs", self.session_dir)
        port = self.layout.grpc_port or free_port()
        serve.start(
            http_options={"host": "127.0.0.1", "port": free_port()},
            grpc_options=gRPCOptions(port=port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
        )
        self.target = f"127.0.0.1:{port}"

    def deploy(self, apps: dict[str, Any]) -> None:
        """Deploy {name: serve.Application}; returns once every replica is ready."""
        from ray import serve

        targets = [
            serve.RunTarget(target=app, name=name, route_prefix=APPS[name].route_prefix)
            for name, app in apps.items()
        ]
        self.apps = list(apps)
        try:
            serve.run_many(targets)
        except Exception as error:
            where = f"{self.session_dir}/logs"
            message = f"Ray Serve could not deploy {', '.join(apps)}: {error} (replica logs in {where})"
            raise CliError(message, exit_code=1) from error

    def stop(self) -> None:
        import ray
        from ray import serve

        if ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


def _session_dir() -> str:
    try:
        from ray._private import worker

        return worker._global_node.get_session_dir_path()
    except Exception:
        return "/tmp/ray/session_latest"


def proxy_security(security: dict[ServiceName, ClientSecurity]) -> dict[ServiceName, ClientSecurity]:
    """The learner's endpoint security through the proxy: the tokens only (it has no TLS)."""
    plaintext = {"tls": False, "tls_ca": "", "tls_cert": "", "tls_key": "", "tls_server_name": ""}
    if any(s.uses_tls for s in security.values()):
        log.warning("up --ray: Ray Serve's gRPC proxy has no TLS; the learner reaches it on loopback")
    return {name: s.model_copy(update=plaintext) for name, s in security.items()}


def deployment_args(layout: MeshLayout) -> dict[str, dict[str, Any]]:
    """Each service's args["deployment"] for a local mesh."""
    replicas = {"min_replicas": layout.rollout_replicas, "max_replicas": layout.rollout_replicas}
    args = {str(name): {**LOCAL_DEPLOYMENT, **getattr(layout.ray, name)} for name in ServiceName}
    args[ServiceName.ROLLOUT] = {**LOCAL_DEPLOYMENT, **replicas, **layout.ray.rollout}
    return args


def service_settings(layout: MeshLayout, learner: LearnerSettings, weights_target: str) -> dict[str, dict]:
    """Each service's args["settings"]: as `puremesh up` gives them, with /metrics on a free port."""

    def local(settings: dict[str, Any]) -> dict[str, Any]:
        return {**settings, "server": {**settings.get("server", {}), "port": 0, "metrics_port": 0}}

    settings = {str(name): local(layout.service(name)) for name in ServiceName}
    rollout = {"model_path": learner.policy_path, **layout.rollout, "weights_target": weights_target}
    settings[ServiceName.ROLLOUT] = local(rollout)
    return settings


def build_apps(layout: MeshLayout, learner: LearnerSettings, weights_target: str) -> dict[str, Any]:
    """{name: serve.Application} of the three services (SettingsError names a bad setting)."""
    settings = service_settings(layout, learner, weights_target)
    deployments = deployment_args(layout)
    return {
        str(name): entry(name).ray_builder()({"settings": settings[name], "deployment": deployments[name]})
        for name in ServiceName
    }


def expected_replicas(layout: MeshLayout) -> int:
    """Rollout replicas the learner waits for at start (the deployment's initial count)."""
    spec = entry(ServiceName.ROLLOUT).ray_spec()
    deployment = spec.deployment_settings(deployment_args(layout)[ServiceName.ROLLOUT])
    return max(1, deployment.initial_replicas or deployment.min_replicas)


async def run_mesh_ray(
    settings: RunSettings, resume: bool = False, progress: bool = True, on_step=None, on_mesh=None
) -> RunResult:
    """`puremesh up --ray`: Ray and Serve, the WeightService, the three applications, then train.
    `on_mesh(LocalRayServe)` is called once the applications serve."""
    learner, layout = settings.learner, settings.mesh
    try:
        replicas = expected_replicas(layout)
        # Checked before Ray starts; the replicas check again with their own environment.
        build_apps(layout, learner, "127.0.0.1:1")
    except SettingsError as error:
        raise CliError(str(error)) from error
    ray_serve = LocalRayServe(layout.ray)

    async def start_services(weights_target: str, learner: LearnerSettings) -> LearnerSettings:
        apps = build_apps(layout, learner, weights_target)
        # In a thread: the rollout replicas pull weights from this event loop while they start.
        await asyncio.to_thread(ray_serve.deploy, apps)
        if on_mesh is not None:
            on_mesh(ray_serve)
        proxy = {str(name): [ray_serve.target] for name in ServiceName}
        applications = {str(name): APPS[name].name for name in ServiceName}
        security = proxy_security(learner.endpoints.security)
        endpoints = learner.endpoints.model_copy(
            update={**proxy, "applications": applications, "security": security}
        )
        return learner.model_copy(update={"endpoints": endpoints})

    try:
        ray_serve.start()  # before the learner's gRPC server: Ray forks its processes
        return await learn(learner, replicas, resume, start_services, progress, on_step)
    finally:
        ray_serve.stop()
