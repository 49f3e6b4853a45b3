"""Off-policy correction at work: the same min-form training run at max_staleness 0, and at
max_staleness 1 without and with truncated importance sampling (learner.algo.off_policy_correction
tis, trainer/algo/offpolicy.py), on the demo's configuration (same world, data, seed and budget).

Printed per run: held-out greedy accuracy before and after (with its standard error), the mean
staleness of the samples trained on, the mean importance weight (tis only), and the seconds the
run took. The question (issue 11, point 5): is staleness 1 with the correction no worse than
staleness 0, within the standard errors?

    .venv/bin/python benchmarks/bench_offpolicy.py [--quick] [--steps N] [--engine vllm|hf]
        [--ground-truth-fraction F]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `puremesh up` (cli/main.py), before torch

import _common  # first: the environment for vLLM on CPU

from puremesh.cli.demo import DEFAULT_GROUND_TRUTH_FRACTION, FULL, QUICK, demo_settings
from puremesh.cli.process_mesh import run_mesh
from puremesh.trainer.algo.options import OffPolicyCorrection

RUNS = {"staleness 0": (0, "none"), "staleness 1": (1, "none"), "staleness 1 + tis": (1, "tis")}


def one_run(world, out: Path, staleness: int, correction: str, args) -> dict:
    base = demo_settings(
        world,
        out,
        "min",
        args.steps,
        None,
        args.engine,
        budget=QUICK if args.quick else FULL,
        ground_truth_fraction=args.ground_truth_fraction,
    )
    learner = base.learner.model_copy(
        update={
            "out_dir": str(out / f"s{staleness}-{correction}"),
            "sampling": base.learner.sampling.model_copy(update={"max_staleness": staleness}),
            "algo": base.learner.algo.model_copy(
                update={"off_policy_correction": OffPolicyCorrection(correction)}
            ),
        }
    )
    began = time.perf_counter()
    result = asyncio.run(run_mesh(base.model_copy(update={"learner": learner}), progress=False))
    steps = [r for r in result.history if "outcome_reward" in r]
    weights = [r["importance_weight_ratio"] for r in steps if r.get("importance_weight_ratio") is not None]
    return {
        "before": result.accuracy_before,
        "after": result.accuracy_after,
        "stderr": result.stderr_after,
        "staleness": statistics.mean(r["staleness_versions"] for r in steps),
        "weight": statistics.mean(weights) if weights else float("nan"),
        "seconds": time.perf_counter() - began,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick world and budget")
    parser.add_argument("--steps", type=int, default=None, help="PPO steps per run (default: the budget's)")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--cache", help="tiny-world cache directory")
    parser.add_argument(
        "--ground-truth-fraction",
        type=float,
        default=DEFAULT_GROUND_TRUTH_FRACTION,
        help="share of training prompts with ground truth (default: the demo's, %(default)s)",
    )
    args = parser.parse_args()
    world = _common.tiny_world(args.cache, args.quick)
    with tempfile.TemporaryDirectory() as scratch:
        results = {name: one_run(world, Path(scratch), *how, args) for name, how in RUNS.items()}
    print(
        f"{'run':<20} {'before':>7} {'after':>7} {'stderr':>7} {'staleness':>9} {'weight':>7} {'seconds':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<20} {r['before']:7.3f} {r['after']:7.3f} {r['stderr']:7.3f} {r['staleness']:9.2f} "
            f"{r['weight']:7.3f} {r['seconds']:8.0f}"
        )
    base, tis = results["staleness 0"], results["staleness 1 + tis"]
    gap = (tis["after"] - base["after"]) / max(1e-9, (tis["stderr"] ** 2 + base["stderr"] ** 2) ** 0.5)
    print(f"staleness 1 + tis minus staleness 0, after training: {gap:+.2f} standard errors")


if __name__ == "__main__":
    main()
