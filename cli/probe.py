"""`puremesh probe`: is a service answering? One line, exit 0 when healthy (Helm test hooks,
scripts).

Standalone servers are asked grpc.health.v1. Ray Serve's gRPC proxy answers no grpc.health,
so with --application the probe makes a real, light call routed to that application instead
(rollout GetStatus, an empty ScoreSteps or Verify): it succeeds only when a replica answers.
Retryable failures (UNAVAILABLE, RESOURCE_EXHAUSTED: starting, draining) are retried until
--timeout. The client's security flags (cli/clients.py) reach TLS servers and, through a proxy,
deployments that want a token (grpc.health.v1 itself needs none).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from puremesh.contract.services import ServiceName
from puremesh.rpc.auth import SecurityError
from puremesh.rpc.client import NO_RETRY, RpcError
from puremesh.rpc.errors import RETRYABLE_CODES
from puremesh.rpc.settings import ClientSecurity
from puremesh.services.registry import entry

from .clients import add_client_security_flags, client_security
from .errors import CliError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "probe",
        help="check that a service answers (exit 0 when healthy)",
        description="Check that a puremesh service answers: grpc.health.v1 for a standalone server, "
        "or with --application a light real call through a Ray Serve gRPC proxy. Prints one line; "
        "exits 0 when healthy, 1 otherwise.",
    )
    parser.add_argument("--target", required=True, help="host:port of the service or the Ray Serve proxy")
    parser.add_argument("--service", required=True, choices=sorted(ServiceName))
    parser.add_argument(
        "--application", default="", help="Ray Serve application name (probe through the gRPC proxy)"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="give up after this many seconds (default: %(default)s)"
    )
    add_client_security_flags(parser)
    parser.set_defaults(run=run)


async def probe(
    service: str,
    target: str,
    application: str = "",
    timeout: float = 10.0,
    security: ClientSecurity | None = None,
) -> str:
    """The probe's description of a healthy service; RpcError (the last one) otherwise."""
    deadline = time.monotonic() + timeout
    async with entry(service).client()(target, timeout, NO_RETRY, application, security) as client:
        while True:
            client.timeout = max(0.1, deadline - time.monotonic())
            try:
                return await client.probe()
            except RpcError as error:
                left = deadline - time.monotonic()
                if error.code not in RETRYABLE_CODES or left < 0.3:
                    raise
            await asyncio.sleep(min(0.5, left - 0.2))


def run(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise CliError("--timeout must be positive")
    via = f" (application {args.application})" if args.application else ""
    security = client_security(args)
    try:
        described = asyncio.run(probe(args.service, args.target, args.application, args.timeout, security))
    except SecurityError as error:
        raise CliError(str(error)) from None
    except RpcError as error:
        details = " ".join(error.details.split())
        raise CliError(f"{args.service} at {args.target}{via}: {error.code.name}: {details}", 1) from error
    print(f"{args.service} at {args.target}{via}: {described}")
    return 0
