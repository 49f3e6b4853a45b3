"""The chart's reward-hacking alerts, evaluated over one training run's own series.

The rules are the chart's own (deploy/helm/puremesh/templates/prometheusrule.yaml), rendered by
`helm template` with the chart's default values, and Prometheus' own rule engine evaluates them:
`promtool test rules` replays the run's metrics.jsonl as the learner's gauges (the names of
trainer/metrics.py, one sample per training step, `step_seconds` apart) and is asked, alert by
alert, whether an ALERTS series with alertstate="firing" appeared at any time of the run. No rule
is re-implemented here; changing a threshold in the chart's values changes what fires.

The chart's windows are wall-clock times (30 minutes, an hour), so the report says which step
spacing the replay used. helm and promtool come from `make tools` (.tools/bin) or PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from puremesh.trainer.metrics import STAT_GAUGES

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "puremesh"
TOOLS_BIN = REPO / ".tools" / "bin"
RULE_TEMPLATE = "templates/prometheusrule.yaml"
CATEGORY = "reward-hacking"
STEP_SERIES = "puremesh_learner_step"
TOOL_TIMEOUT_S = 120
EVALUATION_INTERVAL = "1m"  # how often Prometheus evaluates the rules (its default)


class AlertsUnavailable(RuntimeError):
    """The alerts cannot be evaluated here (a tool or the chart is missing); says which."""


def find_tool(name: str) -> str:
    local = TOOLS_BIN / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise AlertsUnavailable(f"{name} is missing (`make tools` fetches it into .tools/bin)")


def _run(args: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=cwd)


def render_rule_groups(chart: Path = CHART) -> list[dict]:
    """The rule groups of the chart's PrometheusRule, as `helm template` renders them."""
    if not (chart / RULE_TEMPLATE).is_file():
        raise AlertsUnavailable(f"no chart with {RULE_TEMPLATE} at {chart}")
    result = _run([find_tool("helm"), "template", "pm", str(chart), "--show-only", RULE_TEMPLATE])
    if result.returncode != 0:
        raise AlertsUnavailable(f"helm template failed: {result.stderr.strip()[-500:]}")
    [rule] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return rule["spec"]["groups"]


def reward_hacking_alerts(groups: list[dict]) -> list[str]:
    """Names of the rules labelled category: reward-hacking, in the chart's order."""
    return [
        rule["alert"]
        for group in groups
        for rule in group["rules"]
        if "alert" in rule and rule.get("labels", {}).get("category") == CATEGORY
    ]


def _value(value: object) -> str:
    return "_" if value is None else repr(float(value))  # "_": no sample at this step


def input_series(records: list[dict]) -> list[dict]:
    """promtool input series of the training records (one per step): the step counter and every
    gauge trainer/metrics.py exports, under its Prometheus name. Each starts with the 0 that a
    scrape reads before the first step (a gauge's initial value), as the rules expect."""
    series = [{"series": STEP_SERIES, "values": " ".join(["0", *(str(r["step"]) for r in records)])}]
    for name in STAT_GAUGES:
        values = [r.get(name) for r in records]
        if any(v is not None for v in values):
            series.append(
                {"series": f"puremesh_learner_{name}", "values": " ".join(["0", *map(_value, values)])}
            )
    return series


@dataclass(frozen=True)
class AlertReport:
    alerts: list[str]  # the reward-hacking alerts evaluated
    fired: list[str]  # those that fired at some time of the run
    step_seconds: int


def evaluate_run(records: list[dict], workdir: Path, step_seconds: int, chart: Path = CHART) -> AlertReport:
    """Which of the chart's reward-hacking alerts fire over `records` (a run's training records,
    in step order), replayed `step_seconds` apart. Raises AlertsUnavailable without the tools."""
    records = [r for r in records if "outcome_reward" in r]
    if not records:
        raise AlertsUnavailable("the run has no training steps")
    groups = render_rule_groups(chart)
    alerts = reward_hacking_alerts(groups)
    promtool = find_tool("promtool")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    end = len(records) * step_seconds  # the last step's sample
    fired = []
    for alert in alerts:
        test = {
            "rule_files": ["rules.yaml"],
            "evaluation_interval": EVALUATION_INTERVAL,
            "tests": [
                {
                    "interval": f"{step_seconds}s",
                    "input_series": input_series(records),
                    "promql_expr_test": [
                        {
                            "expr": f'max(max_over_time(ALERTS{{alertname="{alert}",alertstate="firing"}}'
                            f"[{end + step_seconds}s]))",
                            "eval_time": f"{end}s",
                            "exp_samples": [{"labels": "{}", "value": 1}],
                        }
                    ],
                }
            ],
        }
        path = workdir / f"{alert}.test.yaml"
        path.write_text(yaml.safe_dump(test, sort_keys=False))
        result = _run([promtool, "test", "rules", path.name], cwd=workdir)
        if result.returncode == 0:
            fired.append(alert)
        elif "got: nil" not in result.stdout + result.stderr:  # promtool itself failed
            raise AlertsUnavailable(f"promtool failed on {alert}: {(result.stdout + result.stderr)[-500:]}")
    return AlertReport(alerts, fired, step_seconds)
