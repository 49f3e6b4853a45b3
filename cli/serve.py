"""`puremesh serve rollout|prm|verify`: run one service as a standalone gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from dataclasses import dataclass

from .errors import CliError


@dataclass(frozen=True)
class ServiceEntry:
    settings_module: str  # holds the settings model and ENV_PREFIX
    settings_class: str
    app_module: str  # holds the ServiceDefinition factory
    factory: str


SERVICES = {
    "verify": ServiceEntry(
        "puremesh.services.verify.settings",
        "VerifySettings",
        "puremesh.services.verify.app",
        "verify_service",
    ),
    "prm": ServiceEntry(
        "puremesh.services.prm.settings", "PrmSettings", "puremesh.services.prm.app", "prm_service"
    ),
    "rollout": ServiceEntry(
        "puremesh.services.rollout.settings",
        "RolloutSettings",
        "puremesh.services.rollout.app",
        "rollout_service",
    ),
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="run a service (rollout, prm or verify) as a gRPC server",
        description="Run one puremesh service with health checking, reflection and /metrics. Settings "
        "come from defaults < --config YAML < environment (PUREMESH_<SERVICE>__...) < flags.",
    )
    parser.add_argument("service", choices=sorted(SERVICES))
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (0 = any free port)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (0 = any free port)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(run=run)


def load_service_settings(service: str, config: str | None, server_overrides: dict | None = None):
    """Resolve a service's settings model (raises CliError with the offending setting)."""
    from puremesh.services.common.settings import SettingsError, load_settings

    entry = SERVICES[service]
    module = importlib.import_module(entry.settings_module)
    model = getattr(module, entry.settings_class)
    try:
        return load_settings(model, config, module.ENV_PREFIX, {"server": server_overrides or {}})
    except SettingsError as error:
        raise CliError(str(error)) from error


def run(args: argparse.Namespace) -> int:
    from .mesh import die_with_parent

    die_with_parent()
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = load_service_settings(
        args.service, args.config, {"host": args.host, "port": args.port, "metrics_port": args.metrics_port}
    )
    from puremesh.services.common.settings import log_settings

    log_settings(args.service, settings)
    entry = SERVICES[args.service]
    factory = getattr(importlib.import_module(entry.app_module), entry.factory)
    return asyncio.run(_serve(args.service, factory, settings))


async def _serve(name: str, factory, settings) -> int:
    from puremesh.services.common.server import ServiceHost

    # Built inside the running loop: services may open gRPC channels (the rollout weight feed).
    try:
        definition = factory(settings)
    except ValueError as error:
        raise CliError(f"{name}: {error}") from error
    host = ServiceHost([definition], settings.server)
    try:
        await host.start(wait_ready=False)
    except OSError as error:
        raise CliError(str(error), exit_code=1) from error
    waiting = asyncio.create_task(host.run_until_signal())
    try:
        await host.load()
    except Exception as error:
        await host.drain(grace=0)
        raise CliError(f"{name} failed to start: {type(error).__name__}: {error}", exit_code=1) from error
    print(f"puremesh {name} serving on {host.target} (metrics on port {host.metrics_port})", flush=True)
    await waiting
    return 0
