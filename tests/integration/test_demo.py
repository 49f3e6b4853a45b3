"""`puremesh demo --quick`: the whole demo pipeline (bootstrap, a min-form and a sum-form run on
the local mesh, the report) on a small world and budget. The full-size demo's learning result is
measured by running `make demo`, not here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_quick_demo_writes_the_report(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "puremesh.cli.main",
            "demo",
            "--quick",
            "--engine",
            "hf",
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "cache" / "tinyworld"),
            "--steps",
            "1",
            "--n-eval",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"min", "sum"}
    for run in summary["runs"].values():
        assert set(run) == {"accuracy_before", "accuracy_after", "stderr_after", "n_eval", "steps", "seconds"}
        assert run["n_eval"] == 20 and run["steps"] == 1
        assert 0 <= run["accuracy_after"] <= 1 and run["stderr_after"] >= 0
    # both runs start from the same policy and are evaluated greedily on the same problems
    assert summary["runs"]["min"]["accuracy_before"] == summary["runs"]["sum"]["accuracy_before"]
    report = (out / "report.md").read_text()
    assert "| min |" in report and "| sum |" in report
    for name in ("heldout_accuracy", "outcome_reward", "kl", "steps_per_response", "response_length_tokens"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({name}.png)" in report
    for credit in ("min", "sum"):
        records = [json.loads(line) for line in (out / credit / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("outcome_reward") is not None for r in records)
