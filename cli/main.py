"""The `puremesh` command: one sub-command per module, each registering its own parser."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from puremesh import __version__

from . import bootstrap, clients, credit, demo, prm_train, probe, serve, train
from .errors import CliError

COMMANDS = (credit, demo, bootstrap, prm_train, serve, clients, probe, train)


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
