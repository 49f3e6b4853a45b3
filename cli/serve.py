"""`puremesh serve rollout|prm|verify`: run one service as a standalone gRPC server.

When launched by `puremesh up` (cli/launcher.py), the service reports that it serves by
writing a JSON readiness record to the file named by PUREMESH_READY_FILE (see `ReadyRecord`).

Security flags (the server's ServerSecurity settings; README "Security"): --tls-cert/--tls-key,
--tls-client-ca (mTLS), --auth-tokens, --insecure, --health-port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from puremesh.contract.services import ServiceName
from puremesh.rpc.auth import SecurityError
from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import SettingsError, load_settings, log_settings
from puremesh.services.registry import entry

from .errors import CliError
from .launcher import ReadyRecord, die_with_parent


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="run a service (rollout, prm or verify) as a gRPC server",
        description="Run one puremesh service with health checking, reflection and /metrics. Settings "
        "come from defaults < --config YAML < environment (PUREMESH_<SERVICE>__...) < flags.",
    )
    parser.add_argument("service", choices=sorted(ServiceName))
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gRPC port (0 = any free port)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port (0 = any free port)")
    add_server_security_flags(parser)
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(run=run)


def add_server_security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (README, Security)")
    group.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: the port speaks TLS only")
    group.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    group.add_argument("--tls-client-ca", metavar="FILE", help="require client certificates it signed (mTLS)")
    group.add_argument(
        "--auth-tokens", metavar="FILE", help="accepted bearer tokens, one per line (# comments); reloaded"
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback --host without TLS and tokens (warned once)",
    )
    group.add_argument("--health-port", type=int, help="plaintext grpc.health.v1 only, for probes")


def server_flags(args: argparse.Namespace) -> dict:
    """The `server` overrides the flags give (unset flags override nothing)."""
    names = ("host", "port", "metrics_port", "health_port", "insecure")
    names += ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens")
    return {name: getattr(args, name) for name in names}


def load_service_settings(service: str, config: str | None, server_overrides: dict | None = None):
    """Resolve a service's settings model (raises CliError with the offending setting)."""
    service_entry = entry(service)
    try:
        return load_settings(
            service_entry.settings_model(),
            config,
            service_entry.env_prefix,
            {"server": server_overrides or {}},
        )
    except SettingsError as error:
        raise CliError(str(error)) from error


def run(args: argparse.Namespace) -> int:
    die_with_parent()
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = load_service_settings(args.service, args.config, server_flags(args))
    log_settings(args.service, settings)
    return asyncio.run(_serve(args.service, settings))


async def _serve(name: str, settings) -> int:
    # Built inside the running loop: services may open gRPC channels (the rollout weight feed).
    try:
        definition = entry(name).build(settings)
        host = ServiceHost([definition], settings.server)
    except (ValueError, SecurityError) as error:
        raise CliError(f"{name}: {error}") from error
    try:
        await host.start(wait_ready=False)
    except SecurityError as error:
        raise CliError(f"{name}: {error}") from error
    except OSError as error:
        raise CliError(str(error), exit_code=1) from error
    waiting = asyncio.create_task(host.run_until_signal())
    try:
        await host.load()
    except Exception as error:
        await host.drain(grace=0)
        raise CliError(f"{name} failed to start: {type(error).__name__}: {error}", exit_code=1) from error
    ReadyRecord(name, host.target, host.metrics_port).publish()
    print(f"puremesh {name} serving on {host.target} (metrics on port {host.metrics_port})", flush=True)
    await waiting
    return 0
