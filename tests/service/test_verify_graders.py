"""The verify service's grader choice: `grader: pure` (PURE's check) against the default
math-verify, on real servers on loopback, on items where they disagree; `puremesh eval
--grader pure` grades the same way."""

from __future__ import annotations

import json

import pytest

from puremesh.cli.main import main
from puremesh.contract.verdict import Verdict
from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import SettingsError, load_settings
from puremesh.services.verify.app import verify_service
from puremesh.services.verify.client import VerifyClient
from puremesh.services.verify.grading import Grader, grade_pure
from puremesh.services.verify.settings import ENV_PREFIX, VerifySettings

ITEMS = [
    ("The answer is 7.", "7"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{\\dfrac{1}{2}}", "0.5"),
    ("\\boxed{8}", "7"),
    ("\\boxed{7}", None),
]


async def verdicts(settings: VerifySettings) -> list[tuple[Verdict, str]]:
    host = ServiceHost([verify_service(settings)], settings.server)
    await host.start()
    try:
        async with VerifyClient(host.target) as client:
            return [(o.verdict, o.answer) for o in await client.verify(ITEMS)]
    finally:
        await host.drain(grace=1)


async def test_pure_and_math_verify_on_the_service() -> None:
    default = await verdicts(VerifySettings(workers=1))
    pure = await verdicts(VerifySettings(workers=1, grader=Grader.PURE))
    assert [v for v, _ in default] == [
        Verdict.CORRECT, Verdict.CORRECT, Verdict.CORRECT, Verdict.INCORRECT, Verdict.NO_GROUND_TRUTH,
    ]  # fmt: skip
    assert [v for v, _ in pure] == [
        Verdict.NO_ANSWER, Verdict.INCORRECT, Verdict.CORRECT, Verdict.INCORRECT, Verdict.NO_GROUND_TRUTH,
    ]  # fmt: skip
    assert [a for _, a in pure] == ["", "x^2+2x+1", "\\dfrac{1}{2}", "8", "7"]


def test_the_grader_is_a_setting_with_math_verify_the_default() -> None:
    assert VerifySettings().grader is Grader.MATH_VERIFY
    settings = load_settings(VerifySettings, env_prefix=ENV_PREFIX, environ={f"{ENV_PREFIX}GRADER": "pure"})
    assert settings.grader is Grader.PURE
    with pytest.raises(SettingsError, match="invalid setting grader"):
        load_settings(VerifySettings, env_prefix=ENV_PREFIX, environ={f"{ENV_PREFIX}GRADER": "lenient"})


def test_puremesh_eval_grades_with_the_chosen_grader(tiny_policy_dir, tmp_path, capsys) -> None:
    data = tmp_path / "sums.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"What is {a} + 1?", "answer": a + 1}) + "\n" for a in range(3))
    )
    argv = ["eval", "--model", str(tiny_policy_dir), "--data", str(data), "--out", str(tmp_path / "out")]
    flags = ["--engine", "hf", "--max-new-tokens", "4", "--no-progress", "--grader", "pure"]
    assert main([*argv, *flags, "--prompt-format", "Q: {question}\nA:"]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["grader"] == "pure" and results["prompt"] == repr("Q: {question}\nA:")
    for line in (tmp_path / "out" / "sums.jsonl").read_text().splitlines():
        item = json.loads(line)
        assert item["verdict"] == grade_pure(item["response"], item["answer"])[0]
