"""The `puremesh` command: one sub-command per module, each registering its own parser."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# Commands whose processes share the machine's cores with each other (the mesh and its services).
SHARED_CORE_COMMANDS = ("serve", "up", "train")


def _sleeping_openmp_workers(argv: Sequence[str]) -> None:
    """The mesh's processes (the learner of `up` and `train`, and every `serve` process they or
    you start) share the cores. OpenMP workers that spin while they wait (libgomp's default) burn
    the cores the others need, and a parallel region whose thread was descheduled stalls its
    barrier: `puremesh serve prm` gained 8-14% throughput on 2 cores with sleeping workers, and
    with generation overlapping the update (max_staleness 1) the rollout replica spent 2.5 CPU
    seconds per step spinning instead of 0.5 (benchmarks/bench_staleness.py, README). libgomp
    reads this once, when torch is first imported, so it is set here, before any import of
    torch. An explicit value wins."""
    words = [a for a in argv if not a.startswith("-")]
    if words and words[0] in SHARED_CORE_COMMANDS:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_sleeping_openmp_workers(sys.argv[1:])

from puremesh import __version__  # noqa: E402

from . import bootstrap, clients, credit, demo, export, prm_train, probe, serve, train  # noqa: E402
from . import eval as evaluate  # noqa: E402
from .errors import CliError  # noqa: E402

COMMANDS = (credit, demo, bootstrap, prm_train, serve, clients, probe, train, export, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="puremesh",
        description="PURE (min-form credit assignment) RL fine-tuning as a mesh of gRPC services.",
    )
    parser.add_argument("--version", action="version", version=f"puremesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CliError as error:
        print(f"puremesh {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        # The reader went away (`| head`): not an error of ours.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"puremesh {args.command}: interrupted", file=sys.stderr)
        return 130


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
