"""`puremesh credit`: output formats, defaults and the one-line error contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from puremesh.cli.main import main

EXAMPLE = {
    "responses": [
        {"step_tokens": [5, 4, 3], "step_scores": [0.9, 0.2, 0.8]},
        {"step_tokens": [6, 4], "step_scores": [0.7, 0.6]},
        {"step_tokens": [3, 3, 4, 2], "step_scores": [0.5, -0.6, 0.4, 0.9]},
        {"step_tokens": [7, 3], "step_scores": [0.95, 0.85]},
    ]
}


def write(tmp_path, document) -> str:
    path = tmp_path / "group.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


def run_json(capsys, *argv) -> dict:
    assert main(["credit", *argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_matches_worked_example(tmp_path, capsys):
    out = run_json(capsys, write(tmp_path, EXAMPLE))
    r1 = out["responses"][0]
    assert r1["step_weights"] == pytest.approx([0.000909, 0.996621, 0.002470], abs=1e-6)
    assert r1["outcome_reward"] == pytest.approx(0.202118, abs=1e-6)
    expected = [-0.052090] * 4 + [0] + [0.060074] * 3 + [0] + [-0.054514] * 2 + [0]
    assert r1["advantages"] == pytest.approx(expected, abs=1e-6)
    assert [len(r["advantages"]) for r in out["responses"]] == [12, 10, 12, 10]
    # Normalisation runs over the whole group: non-zero advantages end with mean 0.
    flat = [a for r in out["responses"] for a in r["normalized_advantages"] if a != 0]
    assert abs(sum(flat) / len(flat)) < 1e-9


def test_sum_form_and_flags(tmp_path, capsys):
    out = run_json(capsys, write(tmp_path, EXAMPLE), "--credit", "sum")
    assert out["responses"][0]["advantages"][:4] == pytest.approx([0.690625] * 4, abs=1e-6)
    assert out["responses"][0]["step_weights"] == [1.0, 1.0, 1.0]
    out = run_json(capsys, write(tmp_path, EXAMPLE), "--credit", "mean")
    assert out["responses"][2]["step_weights"] == pytest.approx([0.25] * 4)
    out = run_json(capsys, write(tmp_path, EXAMPLE), "--temperature", "1e-4")
    assert out["responses"][2]["outcome_reward"] == pytest.approx(-0.6, abs=1e-9)


def test_verifiable_reward_and_kl(tmp_path, capsys):
    group = json.loads(json.dumps(EXAMPLE))
    for response, solved in zip(group["responses"], [True, False, False, True], strict=True):
        response["solved"] = solved
    group["responses"][0]["kl"] = [0.5] * 12
    prm = run_json(capsys, write(tmp_path, group), "--mode", "prm")
    both = run_json(capsys, write(tmp_path, group), "--mode", "prm+vr")
    # vt_1 = 0 - mean(-1, -1, 0) = 2/3, added to R1's last step only.
    assert both["responses"][0]["vr_advantage"] == pytest.approx(2 / 3)
    assert both["responses"][0]["advantages"][10] == pytest.approx(
        prm["responses"][0]["advantages"][10] + 2 / 3
    )
    assert both["responses"][0]["advantages"][0] == pytest.approx(
        prm["responses"][0]["advantages"][0] + 2 / 3
    )
    with_kl = run_json(capsys, write(tmp_path, group), "--mode", "prm", "--kl-coef", "0.1")
    # Token 0 of R1 collects -0.1 * 0.5 from each of its 12 tokens.
    assert with_kl["responses"][0]["advantages"][0] == pytest.approx(
        prm["responses"][0]["advantages"][0] - 0.6
    )


def test_table_output_fits_100_columns(tmp_path, capsys):
    assert main(["credit", write(tmp_path, EXAMPLE)]) == 0
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "min-form advantages: -0.0521x4 0 +0.0601x3 0 -0.0545x2 0" in text
    assert "sum-form advantages: +0.6906x4 0 +0.3281x3 0 +0.5312x2 0" in text
    for column in ("score", "weight", "r*", "baseline", "step rwd", "return"):
        assert column in text


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"responses": [EXAMPLE["responses"][0]]}, "at least 2 responses"),
        ({"groups": []}, '"responses" list'),
        ({"responses": [{"step_scores": [0.1]}, EXAMPLE["responses"][1]]}, "missing 'step_tokens'"),
        (
            {"responses": [{"step_tokens": [1, 2], "step_scores": [0.1]}, EXAMPLE["responses"][1]]},
            "2 step_tokens but 1",
        ),
        (
            {"responses": [{"step_tokens": [1], "step_scores": [1.5]}, EXAMPLE["responses"][1]]},
            "outside [-1, 1]",
        ),
        (
            '{"responses": [{"step_tokens": [1], "step_scores": [NaN]}, '
            '{"step_tokens": [1], "step_scores": [0]}]}',
            "finite number",
        ),
        (
            {"responses": [{"step_tokens": [0], "step_scores": [0.1]}, EXAMPLE["responses"][1]]},
            "positive integer",
        ),
        (
            {"responses": [{"step_tokens": [2], "step_scores": [0.1], "kl": [0.1]}, EXAMPLE["responses"][1]]},
            "kl has 1 values",
        ),
        (
            {
                "responses": [
                    {"step_tokens": [2], "step_scores": [0.1], "solved": "yes"},
                    EXAMPLE["responses"][1],
                ]
            },
            "true or false",
        ),
        (
            {"responses": [{"step_tokens": [2], "step_scores": [0.1], "score": 1}, EXAMPLE["responses"][1]]},
            "unknown field",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, document, message):
    assert main(["credit", write(tmp_path, document)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("puremesh credit: error:")
    assert message in lines[0]


def test_missing_file_and_bad_flags(tmp_path, capsys):
    assert main(["credit", str(tmp_path / "nope.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["credit", write(tmp_path, EXAMPLE), "--temperature", "0"]) == 2
    assert "--temperature" in capsys.readouterr().err


def test_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "puremesh.cli.main", "credit", "--example", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout)["responses"][0]["outcome_reward"] == pytest.approx(0.202118, abs=1e-6)
