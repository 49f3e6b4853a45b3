"""The demo's report: summary.json, report.md and one PNG plot per watched series.

summary.json keeps, per run under runs.<credit>: accuracy_before, accuracy_after, stderr_after,
n_eval, steps, seconds, steps_per_response_first / _last and response_length_first / _last (means
over the first and last WINDOW training steps), answer_rate_last and truncated_rate_last (the
same window), alerts_fired (the chart's reward-hacking alerts that fired, cli/chart_alerts.py), and
first_errors_before / first_errors_after: the share of the held-out outputs (OUT/<credit>/heldout/
step-N.jsonl, trainer/heldout.py) at step 0 and at the last step whose first wrong step is of each
tinyworld.labeller.FirstError kind ("correct" and "no_answer" when none is; null when the outputs
are not there or are not tiny-world problems).
At the top level: ground_truth_fraction, mode, seconds and alerts (evaluated, step_seconds, the
rules evaluated, and why not when they could not be).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from puremesh.tinyworld.labeller import FirstError, first_error
from puremesh.trainer.heldout import read_outputs

from .chart_alerts import AlertsUnavailable, evaluate_run

WINDOW = 5  # training steps averaged for the _first / _last figures
PLOTS = {
    "heldout_accuracy": "held-out greedy accuracy",
    "steps_per_response": "steps per response",
    "response_length_tokens": "response length (tokens)",
    "answer_ratio": "share of responses with a final answer",
    "prm_vr_agreement_ratio": "PRM / ground-truth agreement",
    "outcome_reward": "outcome reward",
    "kl": "KL to the reference",
}


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None and not math.isnan(r[key])]
    return round(sum(values) / len(values), 4) if values else None


def first_errors(run_dir: Path, step: int) -> dict[str, float] | None:
    """The share of each FirstError kind over the held-out outputs of `step` in `run_dir`."""
    try:
        outputs = read_outputs(run_dir, step)
        counts = Counter(first_error(o.question, o.text) for o in outputs)
    except (OSError, ValueError):
        return None
    if not outputs:
        return None
    return {kind.value: round(counts[kind] / len(outputs), 4) for kind in FirstError}


def run_summary(result, seconds: float, fired: list[str], run_dir: Path | None = None) -> dict:
    steps = [r for r in result.history if "outcome_reward" in r]
    first, last = steps[:WINDOW], steps[-WINDOW:]
    kept = run_dir is not None
    return {
        "accuracy_before": result.accuracy_before,
        "accuracy_after": result.accuracy_after,
        "stderr_after": result.stderr_after,
        "n_eval": result.n_eval,
        "steps": result.steps,
        "seconds": round(seconds, 1),
        "steps_per_response_first": _mean(first, "steps_per_response"),
        "steps_per_response_last": _mean(last, "steps_per_response"),
        "response_length_first": _mean(first, "response_length_tokens"),
        "response_length_last": _mean(last, "response_length_tokens"),
        "answer_rate_last": _mean(last, "answer_ratio"),
        "truncated_rate_last": _mean(last, "truncated_ratio"),
        "alerts_fired": fired,
        "first_errors_before": first_errors(run_dir, 0) if kept else None,
        "first_errors_after": first_errors(run_dir, result.steps) if kept else None,
    }


def _alerts(out: Path, results: dict, step_seconds: int) -> tuple[dict, dict[str, list[str]]]:
    """The alert section of the summary, and the alerts fired per run."""
    fired: dict[str, list[str]] = {}
    section: dict = {"evaluated": True, "step_seconds": step_seconds, "rules": [], "note": ""}
    try:
        for credit, (result, _) in results.items():
            report = evaluate_run(result.history, out / credit / "alerts", step_seconds)
            fired[credit], section["rules"] = report.fired, report.alerts
    except AlertsUnavailable as error:
        section.update(evaluated=False, note=str(error))
        fired = {credit: [] for credit in results}
    return section, fired


def write_report(
    out: Path,
    results: dict,
    world,
    *,
    mode: str,
    ground_truth_fraction: float,
    alert_step_seconds: int,
    seconds: float,
) -> dict:
    """Write summary.json, report.md and the plots into `out`; returns the summary."""
    alerts, fired = _alerts(out, results, alert_step_seconds)
    summary = {
        "ground_truth_fraction": ground_truth_fraction,
        "mode": str(mode),
        "seconds": round(seconds, 1),
        "alerts": alerts,
        "runs": {
            credit: run_summary(result, run_seconds, fired[credit], out / credit)
            for credit, (result, run_seconds) in results.items()
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = draw_plots(out, {credit: result.history for credit, (result, _) in results.items()})
    (out / "report.md").write_text("\n".join(_report_lines(summary, plots, world)))
    return summary


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _report_lines(summary: dict, plots: list[tuple[str, str]], world) -> list[str]:
    alerts = summary["alerts"]
    lines = [
        "# puremesh demo: min-form vs sum-form credit assignment",
        "",
        "Both runs start from the same bootstrapped tiny policy and train on the same problems with the "
        f"same seed and budget on the local mesh (rollout, PRM and verify services on loopback), in mode "
        f"{summary['mode']} with ground truth on {summary['ground_truth_fraction']:.0%} of the training "
        "prompts. Accuracy is greedy, on held-out problems, with its standard error. Shape figures are means "
        f"over the first and last {WINDOW} training steps; the answer rate is over responses to prompts "
        "with ground truth (the ones the verify service grades).",
        "",
        "| credit | accuracy before | accuracy after | stderr | gain / (2 x stderr) | steps per response "
        "| response length | answer rate (last) | cut off (last) | alerts fired |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for credit, run in summary["runs"].items():
        gain = run["accuracy_after"] - run["accuracy_before"]
        ratio = gain / (2 * run["stderr_after"]) if run["stderr_after"] else float("inf")
        lines.append(
            f"| {credit} | {run['accuracy_before']:.3f} | {run['accuracy_after']:.3f} | "
            f"{run['stderr_after']:.3f} | {ratio:+.2f} | {_fmt(run['steps_per_response_first'], 2)} -> "
            f"{_fmt(run['steps_per_response_last'], 2)} | {_fmt(run['response_length_first'], 1)} -> "
            f"{_fmt(run['response_length_last'], 1)} | {_fmt(run['answer_rate_last'])} | "
            f"{_fmt(run['truncated_rate_last'])} | {', '.join(run['alerts_fired']) or 'none'} |"
        )
    if alerts["evaluated"]:
        lines += [
            "",
            f"Alerts: the chart's reward-hacking rules ({', '.join(alerts['rules'])}), evaluated by promtool "
            f"over each run's own series, one step every {alerts['step_seconds']} s.",
        ]
    else:
        lines += ["", f"Alerts: not evaluated ({alerts['note']})."]
    lines += _first_error_lines(summary["runs"])
    lines += ["", f"Whole demo (bootstrap included): {summary['seconds']:.0f} s.", ""]
    lines += [f"![{title}]({name})" for name, title in plots]
    lines += ["", f"Tiny world: {world.summary()}; policy {world.policy_dir}, PRM {world.prm_dir}.", ""]
    return lines


def _first_error_lines(runs: dict) -> list[str]:
    """The table of first errors in the held-out outputs, before -> after, per run."""
    kept = {c: r for c, r in runs.items() if r.get("first_errors_before") and r.get("first_errors_after")}
    if not kept:
        return []
    lines = [
        "",
        "What the held-out outputs get wrong first (share of problems, before -> after training; "
        "tinyworld/labeller.py reads each output step by step):",
        "",
        "| first error | " + " | ".join(kept) + " |",
        "|---|" + "---|" * len(kept),
    ]
    for kind in FirstError:
        cells = [
            f"{r['first_errors_before'][kind.value]:.3f} -> {r['first_errors_after'][kind.value]:.3f}"
            for r in kept.values()
        ]
        lines.append(f"| {kind.value} | " + " | ".join(cells) + " |")
    return lines


def _rolling(values: list[float], width: int) -> list[float]:
    return [
        sum(values[max(0, i - width + 1) : i + 1]) / len(values[max(0, i - width + 1) : i + 1])
        for i in range(len(values))
    ]


def draw_plots(out: Path, histories: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """One PNG per PLOTS entry, both runs on it: training series raw (thin) and as a rolling
    mean over WINDOW steps; held-out accuracy at its evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []
    for key, title in PLOTS.items():
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for credit, history in histories.items():
            points = [(r["step"], r[key]) for r in history if r.get(key) is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            if key == "heldout_accuracy":
                axes.plot(xs, ys, marker="o", label=f"{credit}-form")
            else:
                [line] = axes.plot(xs, _rolling(list(ys), WINDOW), label=f"{credit}-form")
                axes.plot(xs, ys, color=line.get_color(), alpha=0.3, linewidth=0.8)
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
