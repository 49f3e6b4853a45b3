"""Learner metrics: Prometheus gauges (names puremesh_learner_*), a JSONL log, a progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

from prometheus_client import Counter, Gauge

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
        "repeat_score": "Mean share of repeated 4-grams per response",
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
    STEP.set(step)
    POLICY_VERSION.set(version)
    for name, gauge in STAT_GAUGES.items():
        value = stats.get(name)
        if value is not None and not math.isnan(value):
            gauge.set(value)
    for phase, seconds in phases.items():
        PHASE_SECONDS.labels(phase).set(seconds)


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
