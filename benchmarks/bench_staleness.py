"""Step time with max_staleness 1 (generation overlaps the update) against 0 (synchronous), on
the demo configuration (the bootstrapped tiny world, the local mesh), with a breakdown of
where each step's time goes.

Per run, the medians over the steps after the first (which warms up) of:
  step          the learner's wall time per step (collect + update + publish)
  collect       the wait for the step's groups (overlapped generation shows up as a shorter wait)
  update        old/reference log-probs and PPO (trainer/update.py)
  publish       gathering and publishing the weights (and, at staleness 0, the replicas' pull)
  CPU s/step    CPU seconds per step of the learner and of each service process, from
                /proc/<pid>/stat, and their sum against step x cores: how busy the machine was.
Overlap can only pay where the synchronous run leaves cores idle: the busy share at staleness 0
says how much there is to win. OpenMP workers sleep while they wait, as `puremesh up` has them
(cli/main.py); `OMP_WAIT_POLICY=ACTIVE` in the environment measures spinning workers instead.

    .venv/bin/python benchmarks/bench_staleness.py [--steps 12] [--engine vllm|hf] [--cache DIR]
                                                   [--quick]   (the quick world's models, seconds to build)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `puremesh up` (cli/main.py), before torch

import _common  # first: the environment for vLLM on CPU

from puremesh.cli.demo import demo_settings
from puremesh.cli.process_mesh import run_mesh

PHASES = ("collect", "update", "publish")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its reaped children so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / TICKS


class CpuMeter:
    """CPU seconds per step of the learner (this process) and of every service process."""

    def __init__(self) -> None:
        self.pids = {"learner": os.getpid()}
        self.last: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []

    def on_mesh(self, local) -> None:
        for name, started in local.processes.items():
            self.pids[name] = started.process.pid
        self.last = self.read()

    def read(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def on_step(self, record: dict) -> None:
        now = self.read()
        self.steps.append({name: now[name] - self.last.get(name, now[name]) for name in now})
        self.last = now


def one_run(world, out: Path, staleness: int, steps: int, engine: str) -> tuple[list[dict], CpuMeter]:
    base = demo_settings(world, out, "min", steps, 1, engine)
    learner = base.learner.model_copy(
        update={
            "out_dir": str(out / f"staleness-{staleness}"),
            "eval": base.learner.eval.model_copy(update={"heldout_path": ""}),
            "sampling": base.learner.sampling.model_copy(update={"max_staleness": staleness}),
        }
    )
    meter = CpuMeter()
    settings = base.model_copy(update={"learner": learner})
    result = asyncio.run(run_mesh(settings, progress=False, on_step=meter.on_step, on_mesh=meter.on_mesh))
    return [r for r in result.history if "outcome_reward" in r], meter


def summary(records: list[dict], meter: CpuMeter) -> dict[str, float]:
    """Medians over the steps after the first (warm-up)."""
    rows = records[1:]
    out = {p: statistics.median(r.get(f"{p}_seconds", 0.0) for r in rows) for p in PHASES}
    out["step"] = statistics.median(sum(r.get(f"{p}_seconds", 0.0) for p in PHASES) for r in rows)
    out["group generate"] = statistics.median(r.get("group_generate_seconds", 0.0) for r in rows)
    out["dropped stale (all)"] = float(sum(r.get("dropped_stale", 0) for r in records))
    cpu = meter.steps[1:]
    for name in meter.pids:
        out[f"CPU {name}"] = statistics.median(step[name] for step in cpu)
    out["CPU total"] = statistics.median(sum(step.values()) for step in cpu)
    out["busy share"] = out["CPU total"] / (out["step"] * (os.cpu_count() or 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--cache", help="tiny-world cache directory")
    parser.add_argument("--quick", action="store_true", help="the quick world (same per-step budget)")
    args = parser.parse_args()
    world = _common.tiny_world(args.cache, args.quick)
    with tempfile.TemporaryDirectory() as scratch:
        runs = {s: summary(*one_run(world, Path(scratch), s, args.steps, args.engine)) for s in (0, 1)}
    print(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; {os.cpu_count()} cores")
    print(f"{'median per step':<22} {'staleness 0':>12} {'staleness 1':>12}")
    for key in runs[0]:
        unit = "" if key in ("busy share", "dropped stale (all)") else " s"
        print(f"{key + unit:<22} {runs[0][key]:12.2f} {runs[1][key]:12.2f}")
    ratio = runs[1]["step"] / runs[0]["step"]
    print(f"staleness 1 / staleness 0: {ratio:5.2f}x   (target <= 0.75x where cores are idle to overlap)")


if __name__ == "__main__":
    main()
