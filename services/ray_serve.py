"""Ray Serve: each service as a Ray Serve application with gRPC ingress and autoscaling.

Fixed names (deploy/helm's RayService depends on them; do not change):

    app      import_path (serveConfigV2)                    route_prefix  deployment
    rollout  puremesh.services.rollout.ray_app:build_app  /rollout      RolloutDeployment
    prm      puremesh.services.prm.ray_app:build_app      /prm          PrmDeployment
    verify   puremesh.services.verify.ray_app:build_app   /verify       VerifyDeployment

    grpc_options.grpc_servicer_functions:
        puremesh.rollout.v1.rollout_pb2_grpc.add_RolloutServiceServicer_to_server
        puremesh.prm.v1.prm_pb2_grpc.add_PrmServiceServicer_to_server
        puremesh.verify.v1.verify_pb2_grpc.add_VerifyServiceServicer_to_server
    grpc_options.port: 9000 in the chart (any free port for `puremesh up --ray`)

    Ray custom resource of each app (ServeApp.resource): puremesh_rollout, puremesh_prm,
    puremesh_verify. The chart runs one KubeRay worker group per app, which advertises it; the
    app's replicas request a little of it (deployment `resources`), so they land only there.

`build_app(args)` takes
    {"settings":   {...},   the same nested dict as the service's settings YAML (RolloutSettings,
                            PrmSettings, VerifySettings); environment variables
                            PUREMESH_<SERVICE>__... of the replica override it, as for
                            `puremesh serve`. server.host/port are unused (the proxy listens);
                            server.metrics_port is each replica's /metrics port (taken: any free
                            one; null: none).
     "deployment": {...}}   optional: RayDeploymentSettings below (replicas, autoscaling,
                            num_cpus, num_gpus, resources, max_replicas_per_node, ...); defaults
                            per service in its ray_app.

A fixed metrics port works for one replica of an app per Ray node: `max_replicas_per_node: 1`
guarantees it (the chart's default). Unset (the default, and `puremesh up --ray`, where every
replica shares one node), a second replica on a node finds the port taken and serves /metrics on a
free one instead.

Clients name the application with the gRPC metadata key `application` on every call (the
proxy routes by it; `application=` on the service clients, learner.endpoints.applications).
The proxy does not answer grpc.health.v1: `puremesh probe --application NAME` makes a real,
light call instead (rollout GetStatus, an empty ScoreSteps or Verify).

A replica runs exactly the standalone server's code: the ServiceDefinition from the service's
app.py factory, loaded by a ServiceHost that binds no port, its servicer methods reached through
ServiceHost.handler (the same token check of server.auth_tokens, admission, status table and
RPC metrics as over the server: the proxy passes the caller's metadata on, but has no TLS). A
replica reports ready (its constructor returns) once the service is loaded; a rollout replica
has pulled the learner's current weights by then, exactly like a standalone one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from pydantic import Field, ValidationError, model_validator

from puremesh.rpc.server import ServiceDefinition, ServiceHost
from puremesh.rpc.settings import FrozenSettings, SettingsError, load_settings, log_settings

from .registry import REGISTRY

log = logging.getLogger(__name__)

DEFAULT_GRPC_PORT = 9000


@dataclass(frozen=True)
class ServeApp:
    """The fixed names of one service's Ray Serve application (see the module docstring)."""

    name: str
    deployment: str
    servicer_function: str

    @property
    def import_path(self) -> str:
        return f"puremesh.services.{self.name}.ray_app:build_app"

    @property
    def route_prefix(self) -> str:
        return f"/{self.name}"

    @property
    def resource(self) -> str:
        """The Ray custom resource the app's own Ray nodes advertise (the chart's worker group)."""
        return f"puremesh_{self.name}"


APPS: dict[str, ServeApp] = {
    str(e.name): ServeApp(str(e.name), e.deployment, e.servicer_function) for e in REGISTRY.values()
}
GRPC_SERVICER_FUNCTIONS = [app.servicer_function for app in APPS.values()]


class RayDeploymentSettings(FrozenSettings):
    """How Ray Serve runs a service's replicas (args["deployment"] of build_app)."""

    min_replicas: int = Field(1, ge=0, description="autoscaling floor")
    max_replicas: int = Field(1, ge=1, description="autoscaling ceiling")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at deploy; default min_replicas")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="autoscaling target: calls in flight per replica"
    )
    max_ongoing_requests: int = Field(
        16, ge=1, description="calls in flight per replica; more wait in the proxy's queue"
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="load above target this long adds replicas")
    downscale_delay_s: float = Field(600.0, ge=0, description="load below target this long removes replicas")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica (fractions share one)")
    memory_bytes: int | None = Field(None, ge=0, description="memory reserved per replica; None = none")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources reserved per replica, e.g. {puremesh_rollout: 1}: replicas go "
        "only to nodes that advertise them",
    )
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description="replicas of this deployment one Ray node holds at most; None = no limit. 1 keeps "
        "each replica's fixed metrics port its own",
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="environment of the replicas, e.g. PUREMESH_ROLLOUT__ENGINE"
    )
    health_check_period_s: float = Field(
        10.0, gt=0, description="how often Ray asks a replica if it is ready"
    )
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(
        30.0, ge=0, description="a stopping replica drains this long at most (see server.drain_grace_seconds)"
    )

    @model_validator(mode="after")
    def _check(self) -> RayDeploymentSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(f"initial_replicas ({initial}) is outside [min_replicas, max_replicas]")
        for name, amount in self.resources.items():
            if name in ("CPU", "GPU", "memory"):
                raise ValueError(f"resources: {name} is set by num_cpus, num_gpus or memory_bytes")
            if amount < 0:
                raise ValueError(f"resources: {name} is negative ({amount})")
        return self

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments of serve.deployment / Deployment.options."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_bytes is not None:
            actor["memory"] = self.memory_bytes
        if self.resources:
            actor["resources"] = dict(self.resources)
        if self.env_vars:
            actor["runtime_env"] = {"env_vars": dict(self.env_vars)}
        autoscaling: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }
        if self.initial_replicas is not None:
            autoscaling["initial_replicas"] = self.initial_replicas
        options: dict[str, Any] = {
            "autoscaling_config": autoscaling,
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": actor,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.max_replicas_per_node is not None:
            options["max_replicas_per_node"] = self.max_replicas_per_node
        return options


class AppArgs(FrozenSettings):
    """The `args` of build_app (serveConfigV2 applications[].args)."""

    settings: dict[str, Any] = Field(default_factory=dict, description="the service's settings")
    deployment: dict[str, Any] = Field(default_factory=dict, description="RayDeploymentSettings")


@dataclass(frozen=True)
class ServiceSpec:
    """What the generic replica needs to know about one service.

    factory: the standalone server's ServiceDefinition factory (app.py), called in the replica.
    prepare: adjusts the resolved settings for one replica, given a tag unique to it (e.g. the
        rollout replica id the learner tracks versions by).
    deployment_defaults: RayDeploymentSettings fields this service defaults differently.
    """

    app: ServeApp
    settings_model: type[FrozenSettings]
    env_prefix: str
    factory: Callable[[Any], ServiceDefinition]
    prepare: Callable[[Any, str], Any] | None = None
    deployment_defaults: Mapping[str, Any] | None = None

    def load(self, data: Mapping[str, Any] | None) -> Any:
        """The service's settings: defaults < `data` < PUREMESH_<SERVICE>__ environment."""
        return load_settings(self.settings_model, env_prefix=self.env_prefix, data=data or {})

    def deployment_settings(self, data: Mapping[str, Any] | None) -> RayDeploymentSettings:
        try:
            return RayDeploymentSettings.model_validate({**(self.deployment_defaults or {}), **(data or {})})
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "deployment"
            raise SettingsError(
                f"invalid {self.app.name} deployment setting {where}: {first['msg']}"
            ) from error


def parse_args(spec: ServiceSpec, args: Mapping[str, Any] | None) -> tuple[dict, RayDeploymentSettings]:
    """Validate build_app's args: (the settings dict, checked; the deployment settings).
    SettingsError names the offending key."""
    try:
        parsed = AppArgs.model_validate(dict(args or {}))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "args"
        raise SettingsError(f"invalid {spec.app.name} application args: {where}: {first['msg']}") from error
    spec.load(parsed.settings)  # fail at deploy time, not in every replica
    return parsed.settings, spec.deployment_settings(parsed.deployment)


def build_application(spec: ServiceSpec, deployment_class: type, args: Mapping[str, Any] | None):
    """The serve.Application of one service: `deployment_class` with the args' options."""
    from ray import serve

    settings, deployment = parse_args(spec, args)
    options = deployment.serve_options()
    return serve.deployment(deployment_class, name=spec.app.deployment, **options).bind(settings)


class CallAborted(grpc.aio.AbortError):
    """A call ended with a status code (set on Ray Serve's gRPC context for the proxy)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class _ServeContext:
    """The part of grpc.aio.ServicerContext that ServiceHost's call accounting and the
    servicers use, on top of Ray Serve's RayServegRPCContext (None outside Ray, in tests)."""

    def __init__(self, grpc_context: Any | None) -> None:
        self._context = grpc_context
        self._code: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code = code
        if self._context is not None:  # Ray Serve answers with the code set here
            self._context.set_code(code)
            self._context.set_details(details)
        raise CallAborted(code, details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return None  # the proxy does not pass the caller's deadline on

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self._context.invocation_metadata()) if self._context is not None else []


def _log_to_stderr() -> None:
    """puremesh's INFO logs (resolved settings, readiness, weight versions) to the replica's
    stderr, as `puremesh serve` writes them, unless logging is configured already."""
    logger = logging.getLogger("puremesh")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def replica_tag() -> str:
    """A tag unique to this Ray Serve replica (host-pid outside Ray)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"{socket.gethostname()}-{os.getpid()}"


class ServiceReplica:
    """Base of the deployment classes (RolloutDeployment, PrmDeployment, VerifyDeployment): one
    replica hosting its service's ServiceDefinition; see the module docstring.

    Ray Serve constructs it (`await`s the async constructor: the replica is ready when it
    returns), calls the RPC-named methods of the subclass with the request message and a
    `grpc_context`, `check_health` periodically, and `__del__` when it stops the replica.
    Outside Ray (tests): `replica = await Deployment.create(settings)`, `await replica.shutdown()`.
    """

    spec: ClassVar[ServiceSpec]

    async def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self._closed = False
        self.host: ServiceHost | None = None
        _log_to_stderr()
        spec = self.spec
        resolved = spec.load(settings)
        if spec.prepare is not None:
            resolved = spec.prepare(resolved, replica_tag())
        log_settings(spec.app.name, resolved)
        self.settings = resolved
        definition = spec.factory(resolved)
        self.definition = definition
        self.host = ServiceHost([definition], resolved.server)
        self._handlers: dict[str, Callable[..., Any]] = {}
        self._start_metrics()
        try:
            await self.host.load()
        except BaseException:
            await self.shutdown(grace=0)
            raise
        log.info("%s replica ready (metrics on port %s)", spec.app.name, self.host.metrics_port)

    @classmethod
    async def create(cls, settings: Mapping[str, Any] | None = None):
        """Construct and load a replica outside Ray Serve (tests, tools)."""
        replica = cls.__new__(cls)
        await replica.__init__(settings)
        return replica

    def _start_metrics(self) -> None:
        assert self.host is not None
        try:
            self.host.start_metrics()
        except OSError as error:  # another replica on this node holds the port
            # Only without max_replicas_per_node: 1 (see the module docstring). A scraper that knows
            # the fixed port only (the chart's PodMonitor) does not see this replica.
            port = self.host.settings.metrics_port
            self.host.settings = self.host.settings.model_copy(update={"metrics_port": 0})
            self.host.start_metrics()
            log.warning(
                "metrics port %s: %s; serving /metrics on %s (set max_replicas_per_node: 1 to keep one "
                "replica per node on the fixed port)",
                port,
                error,
                self.host.metrics_port,
            )

    def _handler(self, method: str, stream: bool) -> Callable[..., Any]:
        handler = self._handlers.get(method)
        if handler is None:
            assert self.host is not None
            inner = getattr(self.definition.servicer, method)
            handler = self.host.handler(self.definition.full_name, method, inner, stream=stream)
            self._handlers[method] = handler
        return handler

    async def unary(self, method: str, request: Any, grpc_context: Any | None = None) -> Any:
        """Call the servicer's unary `method` as the standalone server would."""
        return await self._handler(method, stream=False)(request, _ServeContext(grpc_context))

    async def stream(self, method: str, request: Any, grpc_context: Any | None = None) -> AsyncIterator[Any]:
        """Iterate the servicer's server-streaming `method` as the standalone server would."""
        async for message in self._handler(method, stream=True)(request, _ServeContext(grpc_context)):
            yield message

    def check_health(self) -> None:
        """Ray Serve's health check: a replica that is not serving is replaced."""
        if self.host is None or not self.host.ready:
            raise RuntimeError(f"{self.spec.app.name} is not serving")

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain like a standalone server on SIGTERM, then release the service. Idempotent."""
        if self._closed or self.host is None:
            self._closed = True
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self.host.drain(grace=grace)

    def __del__(self):
        # Ray Serve calls __del__ when it stops the replica and awaits what it returns; a plain
        # garbage collection of a replica already shut down gets None.
        if getattr(self, "_closed", True):
            return None
        return self.shutdown()
