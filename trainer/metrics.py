"""Learner metrics: Prometheus gauges (names puremesh_learner_*), a JSONL log, and the experiment
trackers (W&B, TensorBoard) that receive the same values under the same names.

`export` is the one place a step's values leave the loop: it sets the gauges and logs the same
values to the trackers that `TRACKERS.open` started for the run (`learner.trackers`; none by
default). A labelled gauge goes to the trackers as NAME/LABEL ("puremesh_learner_phase_seconds/
collect"). W&B and TensorBoard are imported only when a run asks for them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from .algo.diagnostics import response_diagnostics
from .settings import LearnerSettings, TrackerKind, WandbMode

log = logging.getLogger(__name__)
PREFIX = "puremesh_learner_"
TRACKER_DIR = "trackers"  # under the run's out_dir, unless tracking.directory says otherwise

STEP = Gauge("puremesh_learner_step", "Training steps completed")
POLICY_VERSION = Gauge("puremesh_learner_policy_version", "Latest published policy version")
STAT_GAUGES = {
    name: Gauge(f"puremesh_learner_{name}", help_text)
    for name, help_text in {
        "outcome_reward": "Mean outcome reward O (sum of transformed step rewards) of the last step",
        "verifiable_reward": "Mean verifiable reward (solved - 1) over responses with ground truth",
        "solved_ratio": "Share of responses with ground truth that were solved",
        "pass_at_n_ratio": "Share of prompt groups with at least one solved response",
        "kl": "Mean per-token KL estimate against the reference policy",
        "policy_loss": "PPO policy loss (mean over minibatches)",
        "clip_fraction": "Share of tokens whose ratio was clipped",
        "ratio_mean": "Mean PPO ratio",
        "grad_norm": "Gradient norm before clipping",
        "response_length_tokens": "Mean response length",
        "response_length_correct_tokens": "Mean length of solved responses",
        "response_length_incorrect_tokens": "Mean length of unsolved responses",
        "steps_per_response": "Mean number of steps per response",
        "repeat_score": "Mean repetition of each response's text: PURE's suffix-array LCP score "
        "(trainer/algo/diagnostics.py)",
        "answer_ratio": "Share of graded responses (prompts with ground truth) that state a final answer",
        "truncated_ratio": "Share of responses cut off at max_new_tokens",
        "prm_vr_agreement_ratio": "Share of responses where 1[O > 0] equals solved",
        "staleness_versions": "Mean age of the samples used, in policy versions",
        "heldout_accuracy_ratio": "Greedy accuracy on held-out problems (last evaluation)",
    }.items()
}
PHASE_SECONDS = Gauge("puremesh_learner_phase_seconds", "Seconds spent per phase in the last step", ["phase"])
DROPPED_SAMPLES = Counter("puremesh_learner_dropped_samples_total", "Samples dropped", ["reason"])
PUBLISH_BYTES = Gauge("puremesh_learner_weight_publish_bytes", "Bytes of the last published version")
REPLICA_LAG = Gauge(
    "puremesh_learner_replica_version_lag", "Published version minus the version a replica holds", ["replica"]
)


def export(step: int, version: int, stats: dict[str, float], phases: dict[str, float]) -> None:
    """One step's values to the gauges and to the run's trackers."""
    STEP.set(step)
    POLICY_VERSION.set(version)
    values: dict[str, float] = {f"{PREFIX}step": step, f"{PREFIX}policy_version": version}
    for name, gauge in STAT_GAUGES.items():
        value = stats.get(name)
        if value is not None and not math.isnan(value):
            gauge.set(value)
            values[PREFIX + name] = value
    for phase, seconds in phases.items():
        PHASE_SECONDS.labels(phase).set(seconds)
        values[f"{PREFIX}phase_seconds/{phase}"] = seconds
    TRACKERS.log(step, values)


def response_stats(groups: Sequence[Any]) -> dict[str, float]:
    """repeat_score, truncated_ratio and answer_ratio of a step's scored groups (collector.py's
    ScoredGroup), as trainer/algo/diagnostics.py defines them."""
    responses = [sample for group in groups for sample in group.samples]
    graded = [verdict for group in groups if group.has_ground_truth for verdict in group.verdicts]
    return response_diagnostics([s.text for s in responses], [s.finish_reason for s in responses], graded)


def export_value(step: int, name: str, value: float) -> None:
    """One STAT_GAUGES value outside a step's record (the held-out accuracy before and after)."""
    STAT_GAUGES[name].set(value)
    TRACKERS.log(step, {PREFIX + name: value})


class _Sink(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode(mode: WandbMode) -> str:
    """The W&B mode a run uses (see WandbMode): WANDB_MODE when set, else online with an API key."""
    if mode is not WandbMode.AUTO:
        return str(mode)
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class _Wandb:
    def __init__(self, settings: LearnerSettings, directory: Path, name: str) -> None:
        import wandb

        tracking = settings.tracking
        self.run = wandb.init(
            project=tracking.project,
            name=name,
            dir=str(directory),
            mode=wandb_mode(tracking.wandb_mode),  # type: ignore[arg-type]
            config=settings.model_dump(mode="json"),
            settings=wandb.Settings(console="off"),  # metrics only: the learner's output stays its own
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The experiment trackers of the current run (none until `open`)."""

    def __init__(self) -> None:
        self.sinks: list[_Sink] = []
        self.directory: Path | None = None

    def open(self, settings: LearnerSettings) -> None:
        """Start the trackers `settings.trackers` names (closing any left open)."""
        self.close()
        if not settings.trackers:
            return
        directory = Path(settings.tracking.directory or Path(settings.out_dir) / TRACKER_DIR)
        name = settings.tracking.run_name or Path(settings.out_dir).resolve().name
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        for kind in dict.fromkeys(settings.trackers):
            if kind is TrackerKind.TENSORBOARD:
                self.sinks.append(_TensorBoard(directory / "tensorboard" / name))
            else:
                self.sinks.append(_Wandb(settings, directory, name))
        log.info("trackers %s write to %s", ", ".join(map(str, settings.trackers)), directory)

    def log(self, step: int, values: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, values)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


TRACKERS = Trackers()


class JsonlLog:
    """One JSON object per line; appends, so a resumed run continues the same file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [
            json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
