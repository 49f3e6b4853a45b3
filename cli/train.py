"""`puremesh train` (the learner against running services) and `puremesh up` (the whole mesh as
local processes on loopback, or with --ray as Ray Serve applications on a local Ray instance,
then the learner). Both run as one learner rank, or as N with --nproc-per-node (cli/torchrun.py)
or under torchrun: rank 0 runs the loop, the others follow it (trainer/controller.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

from puremesh.trainer.checkpoint import CheckpointMismatch
from puremesh.trainer.controller import follow
from puremesh.trainer.loop import RunResult
from puremesh.trainer.ranks import RankFailure, start_ranks, under_torchrun
from puremesh.trainer.safe_dcp import UnsafeCheckpoint

from .errors import CliError
from .learner import learn
from .process_mesh import run_mesh
from .ray_mesh import run_mesh_ray
from .run_settings import RunSettings, load_run_settings
from .torchrun import add_nproc_flag, launch


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
        parser.add_argument(
            "--insecure",
            action="store_true",
            help="allow learner.weights.host beyond loopback without TLS and tokens (README, Security)",
        )
        add_nproc_flag(parser)
        if name == "up":
            parser.add_argument(
                "--ray",
                action="store_true",
                help="run the services as Ray Serve applications on a local Ray instance (gRPC proxy)",
            )
        parser.set_defaults(run=run_up if name == "up" else run_train)


def _overrides(args: argparse.Namespace) -> dict | None:
    return {"learner": {"weights": {"insecure": True}}} if args.insecure else None


def run_up(args: argparse.Namespace) -> int:
    _logging(args.log_level)
    settings = load_run_settings(args.config, _overrides(args))
    if _relaunched(args, "up"):
        return 0
    if args.ray:
        return _as_rank(settings, lambda: asyncio.run(run_mesh_ray(settings, resume=args.resume)))
    return _as_rank(settings, lambda: asyncio.run(run_mesh(settings, resume=args.resume)))


def run_train(args: argparse.Namespace) -> int:
    _logging(args.log_level)
    settings = load_run_settings(args.config, _overrides(args))
    endpoints = settings.learner.endpoints
    if not (endpoints.rollout and endpoints.prm and endpoints.verify):
        raise CliError("learner.endpoints needs rollout, prm and verify targets (or use `puremesh up`)")
    if _relaunched(args, "train"):
        return 0
    replicas = len(endpoints.rollout)
    return _as_rank(
        settings, lambda: asyncio.run(learn(settings.learner, replicas=replicas, resume=args.resume))
    )


def _relaunched(args: argparse.Namespace, command: str) -> bool:
    """With --nproc-per-node N > 1 outside torchrun: run this command as N ranks (cli/torchrun.py)."""
    if args.nproc_per_node == 1 or under_torchrun():
        return False
    argv = [command, "--config", args.config, "--log-level", args.log_level]
    argv += ["--resume"] if args.resume else []
    argv += ["--ray"] if getattr(args, "ray", False) else []
    launch(args.nproc_per_node, argv)
    return True


def _as_rank(settings: RunSettings, controller: Callable[[], RunResult]) -> int:
    """Join the learner's ranks; rank 0 runs `controller` (the loop) and prints its result, the
    others follow it. One line (CliError) when a rank fails or the checkpoint does not fit."""
    learner = settings.learner
    try:
        ranks = start_ranks(learner.distributed, learner.device)
        try:
            if not ranks.is_controller:
                follow(learner, ranks)
                return 0
            result = controller()
        finally:
            ranks.close()
    except (RankFailure, CheckpointMismatch, UnsafeCheckpoint) as error:
        raise CliError(str(error), exit_code=1) from None
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
