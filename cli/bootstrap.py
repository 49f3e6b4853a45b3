"""`puremesh bootstrap`: build (or reuse) the tiny world that the demo trains in.

The tiny world is a byte-level tokenizer, a synthetic multi-step arithmetic task (train and
held-out problems), a tiny Qwen2 policy fine-tuned to solve it with one systematic flaw, and a
tiny PRM trained on step-labelled solutions; see puremesh.tinyworld (world.py). Everything is
built locally (no downloads) and cached with a manifest; a complete cache is reused in well
under a second. This module only parses the flags and prints the paths.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from puremesh.tinyworld.world import bootstrap, default_cache_dir

from .errors import CliError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bootstrap",
        help="build or reuse the tiny world (tokenizer, task data, SFT'd policy, PRM)",
        description=(
            "Build the tiny world the demo trains in: a tokenizer, a synthetic multi-step arithmetic "
            "task, a tiny policy fine-tuned to solve it (right only part of the time under greedy "
            "decoding) and a tiny PRM. About 3 minutes on 2 CPU cores; cached afterwards."
        ),
    )
    parser.add_argument(
        "--cache",
        help="cache directory (default: $PUREMESH_CACHE/tinyworld, else .puremesh-cache/tinyworld)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete cache exists")
    parser.add_argument("--quick", action="store_true", help="a small, weak world for smoke tests (seconds)")
    parser.set_defaults(run=run)


def _log(message: str) -> None:
    print(message, flush=True)


def run(args: argparse.Namespace) -> int:
    cache = Path(args.cache) if args.cache else default_cache_dir()
    if cache.exists() and not cache.is_dir():
        raise CliError(f"--cache {cache} exists and is not a directory")
    try:
        world = bootstrap(cache, force=args.force, quick=args.quick, log=_log)
    except OSError as error:
        raise CliError(
            f"cannot write the cache in {cache}: {error.strerror or error}", exit_code=1
        ) from error
    print(f"policy:    {world.policy_dir}")
    print(f"prm:       {world.prm_dir}")
    print(f"train:     {world.train_path}")
    print(f"held-out:  {world.heldout_path}")
    sys.stdout.flush()
    return 0
