"""`puremesh demo`: the README's run command.

Bootstraps the tiny world (cached), then trains the same starting policy twice on the local mesh,
once with min-form credit and once with sum-form, with the same data, seed and budget, and
writes a report: report.md, PNG plots over training for both runs, and summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from puremesh.tinyworld.world import bootstrap, default_cache_dir

from .errors import CliError
from .run_settings import RunSettings
from .torchrun import add_nproc_flag, run_local_mesh

CREDITS = ("min", "sum")
PLOTS = {
    "heldout_accuracy": "held-out greedy accuracy",
    "outcome_reward": "outcome reward",
    "kl": "KL to the reference",
    "steps_per_response": "steps per response",
    "response_length_tokens": "response length (tokens)",
}


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
    parser.add_argument(
        "--steps", type=int, default=None, help="PPO steps per run (default: the demo budget)"
    )
    parser.add_argument("--n-eval", type=int, default=None, help="held-out problems (default: 500)")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm", help="rollout engine")
    parser.add_argument(
        "--quick", action="store_true", help="a small world and budget that only checks the pipeline (tests)"
    )
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    add_nproc_flag(parser)
    parser.set_defaults(run=run)


def demo_settings(world, out: Path, credit: str, steps: int | None, n_eval: int | None, engine: str):
    """The demo budget: sized so that bootstrap plus both runs fit in 15 minutes on 2 CPU cores."""
    return RunSettings.model_validate(
        {
            "learner": {
                "policy_path": str(world.policy_dir),
                "train_path": str(world.train_path),
                "out_dir": str(out / credit),
                "steps": steps or DEMO_STEPS,
                "seed": 0,
                "checkpoint_every": 1000,
                "algo": {"credit": credit},  # S1 defaults otherwise (beta = 0.001, prm+vr)
                "optim": {"lr": DEMO_LR, "minibatches": 2},
                "sampling": {
                    "prompts_per_step": 16,
                    "samples_per_prompt": 4,
                    "temperature": 1.0,
                    "max_new_tokens": 96,
                },
                "eval": {
                    "heldout_path": str(world.heldout_path),
                    "n_eval": n_eval or 500,
                    "every_steps": DEMO_EVAL_EVERY,
                    "max_new_tokens": 96,
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


DEMO_STEPS = 60
DEMO_LR = 2e-5
DEMO_EVAL_EVERY = 20


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    print("puremesh demo: 1/4 bootstrap the tiny world (cached after the first run)", flush=True)
    cache = args.cache or default_cache_dir()
    if args.quick:
        cache, args.steps, args.n_eval = (
            Path(cache).with_name("tinyworld-quick"),
            args.steps or 2,
            args.n_eval or 40,
        )
    world = bootstrap(cache, quick=args.quick, log=lambda line: print(f"  {line}", flush=True))
    results = {}
    for number, credit in enumerate(CREDITS, 2):
        print(f"puremesh demo: {number}/4 train with {credit}-form credit", flush=True)
        settings = demo_settings(world, out, credit, args.steps, args.n_eval, args.engine)
        started = time.perf_counter()
        try:
            result = run_local_mesh(settings, args.nproc_per_node)
        except Exception as error:
            raise CliError(
                f"the {credit}-form run failed: {type(error).__name__}: {error}", exit_code=1
            ) from error
        results[credit] = (result, time.perf_counter() - started)
        print(
            f"  accuracy {result.accuracy_before:.3f} -> {result.accuracy_after:.3f} "
            f"(+- {result.stderr_after:.3f}, n={result.n_eval}) in {results[credit][1]:.0f} s",
            flush=True,
        )
    print("puremesh demo: 4/4 write the report", flush=True)
    summary = write_report(out, results, world, time.perf_counter() - began)
    print(f"report: {out / 'report.md'}")
    print(json.dumps(summary))
    return 0


def write_report(out: Path, results: dict, world, seconds: float) -> dict:
    summary = {
        "runs": {
            credit: {
                "accuracy_before": result.accuracy_before,
                "accuracy_after": result.accuracy_after,
                "stderr_after": result.stderr_after,
                "n_eval": result.n_eval,
                "steps": result.steps,
                "seconds": round(run_seconds, 1),
            }
            for credit, (result, run_seconds) in results.items()
        }
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = draw_plots(out, {credit: result.history for credit, (result, _) in results.items()})
    lines = [
        "# puremesh demo: min-form vs sum-form credit assignment",
        "",
        "Both runs start from the same bootstrapped tiny policy and train on the same problems with the "
        "same seed and budget on the local mesh (rollout, PRM and verify services on loopback). Accuracy "
        "is greedy, on held-out problems, with its standard error.",
        "",
        "| credit | accuracy before | accuracy after | stderr after | gain / (2 x stderr) | n_eval | steps "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for credit, run in summary["runs"].items():
        gain = run["accuracy_after"] - run["accuracy_before"]
        ratio = gain / (2 * run["stderr_after"]) if run["stderr_after"] else float("inf")
        lines.append(
            f"| {credit} | {run['accuracy_before']:.3f} | {run['accuracy_after']:.3f} | "
            f"{run['stderr_after']:.3f} | {ratio:+.2f} | {run['n_eval']} | {run['steps']} | "
            f"{run['seconds']} |"
        )
    lines += ["", f"Whole demo (bootstrap included): {seconds:.0f} s.", ""]
    lines += [f"![{title}]({name})" for name, title in plots]
    lines += ["", f"Tiny world: policy {world.policy_dir}, PRM {world.prm_dir}, data {world.train_path}.", ""]
    (out / "report.md").write_text("\n".join(lines))
    return summary


def draw_plots(out: Path, histories: dict[str, list[dict]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []
    for key, title in PLOTS.items():
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for credit, history in histories.items():
            points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, marker="o" if key == "heldout_accuracy" else None, label=f"{credit}-form")
        axes.set_title(title)
        axes.set_xlabel("step")
        if axes.lines:
            axes.legend()
        axes.grid(alpha=0.3)
        figure.tight_layout()
        name = f"{key}.png"
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
        drawn.append((name, title))
    return drawn
