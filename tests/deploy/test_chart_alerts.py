"""The chart's alerting rules, checked and unit-tested with promtool (Prometheus' own rule tool).

The rules are those `helm template` renders into the PrometheusRule; alerts_test.yaml holds the
promtool unit tests (healthy training raises nothing; each reward-hacking sign of
pure-algorithm.md section 7 and each service alert fires on the series that should raise it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from chartkit import CASES, one, render, tool

HERE = Path(__file__).resolve().parent


def write_rules(docs, directory: Path) -> Path:
    rule = one(docs, "PrometheusRule")
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if c != "monitoring-off"])
def test_promtool_accepts_the_rendered_rules(case, tmp_path):
    path = write_rules(render(CASES[case]), tmp_path)
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: (\d+) rules found", result.stdout).group(1) == "13"


def test_alerts_fire_on_the_signs_they_watch_and_stay_quiet_otherwise(tmp_path):
    write_rules(render(), tmp_path)
    shutil.copy(HERE / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    result = promtool("test", "rules", str(tmp_path / "alerts_test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_thresholds_come_from_the_values(tmp_path):
    values = tmp_path / "values.yaml"
    thresholds = {"errorRatio": 0.2, "maxVersionLag": 5, "stalledFor": "1h"}
    values.write_text(yaml.safe_dump({"monitoring": {"prometheusRule": {"rules": thresholds}}}))
    docs = render((values,))
    rules = {r["alert"]: r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    assert rules["PuremeshRpcErrorRate"]["expr"].rstrip().endswith("> 0.2")
    assert rules["PuremeshReplicaVersionLag"]["expr"].endswith("> 5")
    assert rules["PuremeshTrainingStalled"]["for"] == "1h"
    assert promtool("check", "rules", str(write_rules(docs, tmp_path))).returncode == 0
