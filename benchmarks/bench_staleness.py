"""Step time with max_staleness 1 (generation overlaps the update) against 0 (synchronous), on
the demo configuration (the bootstrapped tiny world, the local mesh).
Target (issue 4): staleness 1 <= 0.75x the step time of staleness 0.

    .venv/bin/python benchmarks/bench_staleness.py [--steps 12] [--engine vllm|hf]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import _common  # noqa: F401  (environment for vLLM on CPU)

from puremesh.cli.demo import demo_settings
from puremesh.cli.process_mesh import run_mesh
from puremesh.tinyworld.world import bootstrap, default_cache_dir


def step_seconds(world, out: Path, staleness: int, steps: int, engine: str) -> list[float]:
    base = demo_settings(world, out, "min", steps, 1, engine)
    learner = base.learner.model_copy(
        update={
            "out_dir": str(out / f"staleness-{staleness}"),
            "eval": base.learner.eval.model_copy(update={"heldout_path": ""}),
            "sampling": base.learner.sampling.model_copy(update={"max_staleness": staleness}),
        }
    )
    result = asyncio.run(run_mesh(base.model_copy(update={"learner": learner}), progress=False))
    phases = ("collect", "update", "publish", "checkpoint")
    return [sum(r.get(f"{p}_seconds", 0.0) for p in phases) for r in result.history if "outcome_reward" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--cache", help="tiny-world cache directory")
    args = parser.parse_args()
    world = bootstrap(args.cache or default_cache_dir(), log=print)
    with tempfile.TemporaryDirectory() as scratch:
        sync = step_seconds(world, Path(scratch), 0, args.steps, args.engine)
        overlap = step_seconds(world, Path(scratch), 1, args.steps, args.engine)
    # the first step of each run warms up; compare the rest
    sync_median, overlap_median = statistics.median(sync[1:]), statistics.median(overlap[1:])
    print(f"max_staleness 0: median step {sync_median:.2f} s over {len(sync) - 1} steps")
    print(f"max_staleness 1: median step {overlap_median:.2f} s over {len(overlap) - 1} steps")
    print(f"staleness 1 / staleness 0: {overlap_median / sync_median:5.2f}x   (target <= 0.75x)")


if __name__ == "__main__":
    main()
