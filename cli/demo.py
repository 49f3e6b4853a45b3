"""`puremesh demo`: the README's run command, PURE's central result in the tiny world.

Bootstraps the tiny world (cached), then trains the same starting policy twice on the local mesh,
once with min-form credit and once with sum-form, with the same data, seed and budget, in PURE's
setting (PRM+VR, ground truth on a fraction of the training prompts; `--mode prm` for PRM only).
Writes report.md, plots over training for both runs, the chart's reward-hacking alerts that fired
on each run (cli/chart_alerts.py) and summary.json (cli/demo_report.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from puremesh.tinyworld.world import bootstrap, default_cache_dir
from puremesh.trainer.algo.options import CreditMethod, RewardMode

from .demo_report import write_report
from .errors import CliError
from .run_settings import RunSettings
from .torchrun import add_nproc_flag, run_local_mesh

CREDITS = (CreditMethod.MIN, CreditMethod.SUM)
DEMO_MODES = (RewardMode.PRM_VR, RewardMode.PRM)
DEFAULT_GROUND_TRUTH_FRACTION = 0.1  # PURE's headline setting: ground truth on ~10% of prompts
ALERT_STEP_SECONDS = 120  # the spacing of the steps when the chart's alerts replay a run


@dataclass(frozen=True)
class DemoBudget:
    """What one demo run costs: sized so that bootstrap plus both runs fit in 15 minutes on 2 CPU
    cores (FULL), or a few minutes in tests (QUICK, on the quick world)."""

    steps: int = 60
    n_eval: int = 500
    eval_every: int = 20
    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 96
    # 5e-5 on the full world, at 10% ground truth (README, the demo; one run each): both forms
    # climb by step 20, then slide; min-form keeps its gain (0.456 -> 0.730 in a fresh clone's
    # make demo, 0.596 in a rerun), sum-form loses it (0.340, 0.482). At 3e-5 both keep more (min
    # 0.718, sum 0.654); at 1e-4 min-form fell to 0.146. The quick world keeps 1e-4: at 2e-5
    # neither form moved far from the SFT policy in 40 quick steps (KL 0.04).
    lr: float = 5e-5
    minibatches: int = 2


FULL = DemoBudget()
QUICK = DemoBudget(steps=40, n_eval=200, eval_every=20, max_new_tokens=80, lr=1e-4)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="bootstrap the tiny world, train min-form vs sum-form on the local mesh, write a report",
        description=__doc__,
    )
    parser.add_argument("--out", default="demo-out", help="report directory (default: %(default)s)")
    parser.add_argument(
        "--cache", help="tiny-world cache (default: $PUREMESH_CACHE or .puremesh-cache/tinyworld)"
    )
    parser.add_argument("--steps", type=int, default=None, help="PPO steps per run (default: the budget's)")
    parser.add_argument("--n-eval", type=int, default=None, help="held-out problems (default: the budget's)")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm", help="rollout engine")
    parser.add_argument(
        "--mode",
        choices=[str(m) for m in DEMO_MODES],
        default=str(RewardMode.PRM_VR),
        help="reward mode of both runs (default: %(default)s)",
    )
    parser.add_argument(
        "--ground-truth-fraction",
        type=float,
        default=DEFAULT_GROUND_TRUTH_FRACTION,
        help="share of training prompts that keep their ground truth (default: %(default)s)",
    )
    parser.add_argument(
        "--alert-step-seconds",
        type=int,
        default=ALERT_STEP_SECONDS,
        help="seconds between steps when the chart's alerts replay a run (default: %(default)s)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="the quick world and budget (a few minutes; the learning test)"
    )
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_nproc_flag(parser)
    parser.set_defaults(run=run)


def demo_settings(
    world,
    out: Path,
    credit: str,
    steps: int | None = None,
    n_eval: int | None = None,
    engine: str = "vllm",
    *,
    budget: DemoBudget = FULL,
    mode: RewardMode = RewardMode.PRM_VR,
    ground_truth_fraction: float = DEFAULT_GROUND_TRUTH_FRACTION,
) -> RunSettings:
    """One demo run's settings: `budget`, S1's algorithm defaults otherwise (beta = 0.001)."""
    return RunSettings.model_validate(
        {
            "learner": {
                "policy_path": str(world.policy_dir),
                "train_path": str(world.train_path),
                "ground_truth_fraction": ground_truth_fraction,
                "out_dir": str(out / str(credit)),
                "steps": steps or budget.steps,
                "seed": 0,
                "checkpoint_every": 1000,
                "algo": {"credit": str(credit), "reward_mode": str(mode)},
                "optim": {"lr": budget.lr, "minibatches": budget.minibatches},
                "sampling": {
                    "prompts_per_step": budget.prompts_per_step,
                    "samples_per_prompt": budget.samples_per_prompt,
                    "temperature": budget.temperature,
                    "max_new_tokens": budget.max_new_tokens,
                },
                "eval": {
                    "heldout_path": str(world.heldout_path),
                    "n_eval": n_eval or budget.n_eval,
                    "every_steps": budget.eval_every,
                    "max_new_tokens": budget.max_new_tokens,
                },
            },
            "mesh": {
                "rollout_replicas": 1,
                "rollout": {"engine": engine, "dtype": "float32"},
                "prm": {"model_path": str(world.prm_dir)},
                "verify": {"workers": 1},
            },
        }
    )


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.ground_truth_fraction <= 1:
        raise CliError(f"--ground-truth-fraction must be in [0, 1], got {args.ground_truth_fraction}")
    for flag, value in (("--steps", args.steps), ("--n-eval", args.n_eval)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be at least 1, got {value}")
    if args.alert_step_seconds < 1:
        raise CliError(f"--alert-step-seconds must be at least 1, got {args.alert_step_seconds}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    print("puremesh demo: 1/4 bootstrap the tiny world (cached after the first run)", flush=True)
    cache = Path(args.cache or default_cache_dir())
    if args.quick:
        cache = cache.with_name("tinyworld-quick")
    world = bootstrap(cache, quick=args.quick, log=lambda line: print(f"  {line}", flush=True))
    budget, mode = (QUICK if args.quick else FULL), RewardMode(args.mode)
    results = {}
    for number, credit in enumerate(CREDITS, 2):
        print(f"puremesh demo: {number}/4 train with {credit}-form credit ({mode})", flush=True)
        settings = demo_settings(
            world,
            out,
            credit,
            args.steps,
            args.n_eval,
            args.engine,
            budget=budget,
            mode=mode,
            ground_truth_fraction=args.ground_truth_fraction,
        )
        started = time.perf_counter()
        try:
            result = run_local_mesh(settings, args.nproc_per_node)
        except Exception as error:
            raise CliError(
                f"the {credit}-form run failed: {type(error).__name__}: {error}", exit_code=1
            ) from error
        results[str(credit)] = (result, time.perf_counter() - started)
        print(
            f"  accuracy {result.accuracy_before:.3f} -> {result.accuracy_after:.3f} "
            f"(+- {result.stderr_after:.3f}, n={result.n_eval}) in {results[str(credit)][1]:.0f} s",
            flush=True,
        )
    print("puremesh demo: 4/4 write the report (and replay the chart's alerts over each run)", flush=True)
    summary = write_report(
        out,
        results,
        world,
        mode=mode,
        ground_truth_fraction=args.ground_truth_fraction,
        alert_step_seconds=args.alert_step_seconds,
        seconds=time.perf_counter() - began,
    )
    print(f"report: {out / 'report.md'}")
    print(json.dumps(summary))
    return 0
