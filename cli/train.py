"""`puremesh train` (the learner against running services) and `puremesh up` (the whole mesh as
local processes on loopback, or with --ray as Ray Serve applications on a local Ray instance,
then the learner)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from puremesh.trainer.loop import RunResult

from .errors import CliError
from .learner import learn
from .process_mesh import run_mesh
from .ray_mesh import run_mesh_ray
from .run_settings import load_run_settings


def register(sub: argparse._SubParsersAction) -> None:
    for name, helptext in (
        ("up", "start the services as local processes, then train (the embedded mesh)"),
        ("train", "run the learner against running services (endpoints in the config)"),
    ):
        parser = sub.add_parser(name, help=helptext, description=helptext)
        parser.add_argument("--config", required=True, help="YAML with `learner:` (and for up, `mesh:`)")
        parser.add_argument(
            "--resume", action="store_true", help="continue from the last checkpoint in out_dir"
        )
        parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
        if name == "up":
            parser.add_argument(
                "--ray",
                action="store_true",
                help="run the services as Ray Serve applications on a local Ray instance (gRPC proxy)",
            )
        parser.set_defaults(run=run_up if name == "up" else run_train)


def run_up(args: argparse.Namespace) -> int:
    _logging(args.log_level)
    settings = load_run_settings(args.config)
    if args.ray:
        result = asyncio.run(run_mesh_ray(settings, resume=args.resume))
    else:
        result = asyncio.run(run_mesh(settings, resume=args.resume))
    _print_result(result)
    return 0


def run_train(args: argparse.Namespace) -> int:
    _logging(args.log_level)
    settings = load_run_settings(args.config)
    endpoints = settings.learner.endpoints
    if not (endpoints.rollout and endpoints.prm and endpoints.verify):
        raise CliError("learner.endpoints needs rollout, prm and verify targets (or use `puremesh up`)")
    result = asyncio.run(learn(settings.learner, replicas=len(endpoints.rollout), resume=args.resume))
    _print_result(result)
    return 0


def _print_result(result: RunResult) -> None:
    line = f"trained {result.steps} steps (policy version {result.version}) in {result.seconds:.0f} s"
    if result.accuracy_after is not None:
        before = "" if result.accuracy_before is None else f"{result.accuracy_before:.3f} -> "
        line += f"; held-out greedy accuracy {before}{result.accuracy_after:.3f} (n={result.n_eval})"
    print(line)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
