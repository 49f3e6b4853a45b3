"""The `puremesh` command: one sub-command per module, each registering its own parser."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _sleeping_openmp_workers_for_the_prm_service(argv: Sequence[str]) -> None:
    """`puremesh serve prm` runs PRM forward passes beside a gRPC event loop. OpenMP workers that
    spin while they wait (libgomp's default) take the cores the loop needs: letting them sleep
    gave the service 8-14% more throughput on 2 cores. libgomp reads this once, when torch is
    first imported, so it is set here, before any import of torch. An explicit value wins."""
    if [a for a in argv if not a.startswith("-")][:2] == ["serve", "prm"]:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_sleeping_openmp_workers_for_the_prm_service(sys.argv[1:])

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
