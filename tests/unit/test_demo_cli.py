"""`puremesh demo` without training: its settings (PURE's setting, the modes, the budgets), its
flags' refusals, and the summary figures computed from a run's history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from puremesh.cli.demo import FULL, QUICK, demo_settings
from puremesh.cli.demo_report import WINDOW, run_summary
from puremesh.cli.main import main
from puremesh.tinyworld.labeller import FirstError
from puremesh.tinyworld.world import BootstrapConfig, TinyWorld
from puremesh.trainer.algo.options import CreditMethod, RewardMode
from puremesh.trainer.heldout import Output, read_outputs, write_outputs
from puremesh.trainer.loop import RunResult


def world(root: Path) -> TinyWorld:
    return TinyWorld(
        root, root / "tok", root / "policy", root / "prm", root / "train.jsonl", root / "heldout.jsonl",
        root / "sft.jsonl", root / "prm.jsonl", 0.2, 200, 0.3, 0.1, 8, 0.8, 0.85, BootstrapConfig(), {},
    )  # fmt: skip


def test_both_runs_share_everything_but_the_credit_form(tmp_path):
    runs = {
        c: demo_settings(world(tmp_path), tmp_path, c).learner for c in (CreditMethod.MIN, CreditMethod.SUM)
    }
    assert runs["min"].algo.credit is CreditMethod.MIN and runs["sum"].algo.credit is CreditMethod.SUM
    assert (
        runs["min"].model_copy(update={"algo": runs["sum"].algo, "out_dir": runs["sum"].out_dir})
        == runs["sum"]
    )
    learner = runs["min"]
    assert learner.ground_truth_fraction == 0.1 and learner.algo.reward_mode is RewardMode.PRM_VR
    assert (learner.steps, learner.eval.n_eval, learner.sampling.max_new_tokens) == (
        FULL.steps,
        FULL.n_eval,
        FULL.max_new_tokens,
    )


def test_mode_fraction_and_budget_are_settable(tmp_path):
    learner = demo_settings(
        world(tmp_path), tmp_path, "sum", budget=QUICK, mode=RewardMode.PRM, ground_truth_fraction=0.0
    ).learner
    assert learner.algo.reward_mode is RewardMode.PRM and learner.ground_truth_fraction == 0.0
    assert learner.steps == QUICK.steps and learner.eval.every_steps == QUICK.eval_every
    assert demo_settings(world(tmp_path), tmp_path, "min", 3, 7).learner.steps == 3


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ground-truth-fraction", "1.5"], "--ground-truth-fraction must be in [0, 1]"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--n-eval", "-3"], "--n-eval must be at least 1"),
        (["--alert-step-seconds", "0"], "--alert-step-seconds must be at least 1"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(flags, message, capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_run_summary_averages_the_first_and_last_window():
    history = [{"step": 0, "heldout_accuracy": 0.2, "heldout_stderr": 0.02}]
    for step in range(1, 13):
        history.append(
            {
                "step": step,
                "outcome_reward": 0.0,
                "steps_per_response": float(step),
                "response_length_tokens": 10.0 * step,
                "answer_ratio": None if step == 12 else 1.0 - step / 100,
                "truncated_ratio": 0.0,
            }
        )
    result = RunResult(12, 12, 1.0, 0.2, 0.4, 0.02, 0.03, 500, history)
    summary = run_summary(result, 61.23, ["PuremeshStepCountShift"])
    assert summary["steps_per_response_first"] == pytest.approx(sum(range(1, WINDOW + 1)) / WINDOW)
    assert summary["steps_per_response_last"] == pytest.approx(sum(range(13 - WINDOW, 13)) / WINDOW)
    assert summary["response_length_last"] == pytest.approx(10 * sum(range(13 - WINDOW, 13)) / WINDOW)
    # a step without ground-truth responses has no answer rate and does not count
    assert summary["answer_rate_last"] == pytest.approx(1 - sum(range(13 - WINDOW, 12)) / (WINDOW - 1) / 100)
    assert summary["alerts_fired"] == ["PuremeshStepCountShift"] and summary["seconds"] == 61.2
    assert json.loads(json.dumps(summary)) == summary


def test_run_summary_counts_the_first_errors_of_the_kept_heldout_outputs(tmp_path):
    question = (
        "Hugo has 27 bottles. First, he buys 5 more. Second, he loses 3. How many bottles does he have now?"
    )
    right = (
        "First, he buys 5 more: 27 + 5 = 32\n\nSecond, he loses 3: 32 - 3 = 29\n\nThe answer is \\boxed{29}"
    )
    slipped = (
        "First, he buys 5 more: 27 + 5 = 22\n\nSecond, he loses 3: 22 - 3 = 19\n\nThe answer is \\boxed{19}"
    )
    near = (
        "First, he buys 5 more: 27 + 5 = 33\n\nSecond, he loses 3: 33 - 3 = 30\n\nThe answer is \\boxed{30}"
    )
    write_outputs(
        tmp_path, 0, [Output(question, "29", slipped, False)] * 3 + [Output(question, "29", right, True)]
    )
    write_outputs(tmp_path, 12, [Output(question, "29", near, False), Output(question, "29", right, True)])
    result = RunResult(12, 12, 1.0, 0.25, 0.5, 0.02, 0.03, 4, [{"step": 0}])
    summary = run_summary(result, 1.0, [], tmp_path)
    before, after = summary["first_errors_before"], summary["first_errors_after"]
    assert set(before) == {kind.value for kind in FirstError} and sum(before.values()) == pytest.approx(1)
    assert before["forgotten_carry"] == 0.75 and before["correct"] == 0.25
    assert after["off_by_one"] == 0.5 and after["correct"] == 0.5 and after["forgotten_carry"] == 0
    # outputs not kept, or not the tiny world's problems: null, not an error
    assert run_summary(result, 1.0, [], tmp_path / "none")["first_errors_after"] is None
    write_outputs(tmp_path, 12, [Output("What is 2 + 2?", "4", "4", True)])
    assert run_summary(result, 1.0, [], tmp_path)["first_errors_after"] is None
    assert run_summary(result, 1.0, [])["first_errors_before"] is None


def test_heldout_outputs_round_trip(tmp_path):
    outputs = [Output("q1", "3", "x\n\ny", True), Output("q2", "4", "", False)]
    path = write_outputs(tmp_path, 20, outputs)
    assert path == tmp_path / "heldout" / "step-000020.jsonl" and read_outputs(tmp_path, 20) == outputs
    assert not list(path.parent.glob("*.partial"))
