"""cli/chart_alerts.py: the chart's own reward-hacking rules, rendered by helm and evaluated by
promtool over a run's records. Steady records fire nothing; records whose steps per response
explode fire the step-count rule (and only the rules that watch what changed); a threshold changed
in the chart's values changes the verdict, so nothing of the rules lives in the demo."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from chartkit import CHART, tool

from puremesh.cli import chart_alerts

STEPS = 80
SPACING = 120  # seconds between steps


def records(steps_per_response) -> list[dict]:
    return [
        {
            "step": step,
            "outcome_reward": 0.5,
            "kl": 0.001,
            "policy_loss": 0.01,
            "steps_per_response": steps_per_response(step),
            "response_length_tokens": 60.0,
            "repeat_score": 0.05,
            "prm_vr_agreement_ratio": 0.8,
        }
        for step in range(1, STEPS + 1)
    ]


@pytest.fixture(autouse=True)
def tools():
    tool("helm"), tool("promtool")  # skips without them


def test_steady_training_fires_nothing(tmp_path):
    report = chart_alerts.evaluate_run(records(lambda step: 5.0), tmp_path, SPACING)
    assert report.fired == []
    assert "PuremeshStepCountShift" in report.alerts and "PuremeshDegenerateResponses" in report.alerts
    assert all(name.startswith("Puremesh") for name in report.alerts)


def test_exploding_steps_fire_the_step_count_rule(tmp_path):
    exploding = records(lambda step: 5.0 if step < 50 else 5.0 + (step - 50) * 0.5)
    report = chart_alerts.evaluate_run(exploding, tmp_path, SPACING)
    assert "PuremeshStepCountShift" in report.fired
    assert "PuremeshResponseLengthShift" not in report.fired  # the length did not change
    # squeezed into a third of the time, the same records no longer fill the rule's windows
    assert "PuremeshStepCountShift" not in chart_alerts.evaluate_run(exploding, tmp_path / "fast", 40).fired


def test_the_thresholds_are_the_charts(tmp_path):
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    values = yaml.safe_load((chart / "values.yaml").read_text())
    values["monitoring"]["prometheusRule"]["rules"]["repeatScore"] = 0.01  # below the records' 0.05
    (chart / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    steady = records(lambda step: 5.0)
    assert (
        "PuremeshDegenerateResponses"
        in chart_alerts.evaluate_run(steady, tmp_path / "a", SPACING, chart).fired
    )
    assert (
        "PuremeshDegenerateResponses" not in chart_alerts.evaluate_run(steady, tmp_path / "b", SPACING).fired
    )


def test_without_the_tools_the_alerts_are_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(chart_alerts, "TOOLS_BIN", Path(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(chart_alerts.AlertsUnavailable, match="make tools"):
        chart_alerts.evaluate_run(records(lambda step: 5.0), tmp_path, SPACING)
    with pytest.raises(chart_alerts.AlertsUnavailable, match="no training steps"):
        chart_alerts.evaluate_run([{"step": 0, "heldout_accuracy": 0.5}], tmp_path, SPACING)
