"""The algorithm's choices (trainer/algo/options.py): their strings, registries and defaults.

The strings are an interface (settings YAML, environment variables, CLI flags, JSON output, the
chart's schema), so they are pinned here; every registry covers every member; the learner's
settings and `puremesh credit` take their defaults from options.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from puremesh.cli.credit import CreditSettings
from puremesh.rpc.settings import SettingsError, load_settings
from puremesh.trainer.algo import (
    BASELINE_SHARES,
    CREDIT_TRANSFORMS,
    DEFAULT_BASELINE,
    DEFAULT_CLIP_EPS,
    DEFAULT_CREDIT,
    DEFAULT_KL_COEF,
    DEFAULT_KL_ESTIMATOR,
    DEFAULT_NORMALIZE,
    DEFAULT_REWARD_MODE,
    DEFAULT_TEMPERATURE,
    DEFAULT_VR_COEF,
    KL_ESTIMATES,
    BaselineKind,
    CreditMethod,
    KlEstimator,
    RewardMode,
    parse_choice,
    pure_advantages,
    step_end_mask_from_lengths,
)
from puremesh.trainer.settings import ENV_PREFIX, AlgoSettings, LearnerSettings

STRINGS = {
    CreditMethod: ["min", "sum", "mean", "strict-min"],
    RewardMode: ["prm", "vr", "prm+vr"],
    BaselineKind: ["token", "step"],
    KlEstimator: ["k1", "k3"],
}
REGISTRIES = {CreditMethod: CREDIT_TRANSFORMS, BaselineKind: BASELINE_SHARES, KlEstimator: KL_ESTIMATES}


@pytest.mark.parametrize("kind", list(STRINGS), ids=lambda kind: kind.__name__)
def test_choice_strings_are_unchanged(kind) -> None:
    assert [member.value for member in kind] == STRINGS[kind]
    assert [str(member) for member in kind] == STRINGS[kind]
    assert json.dumps(list(kind)) == json.dumps(STRINGS[kind])


@pytest.mark.parametrize("kind", list(REGISTRIES), ids=lambda kind: kind.__name__)
def test_every_registry_covers_every_member(kind) -> None:
    assert set(REGISTRIES[kind]) == set(kind)


def test_reward_mode_parts() -> None:
    assert [(mode.process, mode.verifiable) for mode in RewardMode] == [
        (True, False),
        (False, True),
        (True, True),
    ]


def test_parse_choice_takes_exact_strings_and_members_only() -> None:
    assert parse_choice(CreditMethod, "strict-min", "credit method") is CreditMethod.STRICT_MIN
    assert parse_choice(CreditMethod, CreditMethod.SUM, "credit method") is CreditMethod.SUM
    with pytest.raises(ValueError, match="unknown credit method 'Min'; expected one of 'min', 'sum'"):
        parse_choice(CreditMethod, "Min", "credit method")


def test_strings_and_members_give_the_same_advantages() -> None:
    token_mask, step_end_mask = step_end_mask_from_lengths([[2, 3], [4], [1, 1, 2]])
    scores = torch.tensor([[0.5, -0.2, 0.0], [0.9, 0.0, 0.0], [0.1, 0.3, -0.7]], dtype=torch.float64)
    common = (scores, step_end_mask, token_mask, torch.tensor([0, 0, 0]))
    truth = torch.ones(3, dtype=torch.bool)
    solved = {"solved": torch.tensor([True, False, True]), "has_ground_truth": truth}
    by_string = pure_advantages(*common, **solved, credit="strict-min", reward_mode="vr", baseline="step")
    by_member = pure_advantages(
        *common,
        **solved,
        credit=CreditMethod.STRICT_MIN,
        reward_mode=RewardMode.VR,
        baseline=BaselineKind.STEP,
    )
    assert torch.equal(by_string.normalized, by_member.normalized)
    assert bool(by_member.normalized.abs().sum() > 0)


def test_learner_settings_take_the_defaults_from_options() -> None:
    algo = AlgoSettings()
    assert (algo.credit, algo.reward_mode, algo.baseline, algo.kl_estimator) == (
        DEFAULT_CREDIT,
        DEFAULT_REWARD_MODE,
        DEFAULT_BASELINE,
        DEFAULT_KL_ESTIMATOR,
    )
    assert (algo.temperature, algo.kl_coef, algo.vr_coef, algo.normalize, algo.clip_eps) == (
        DEFAULT_TEMPERATURE,
        DEFAULT_KL_COEF,
        DEFAULT_VR_COEF,
        DEFAULT_NORMALIZE,
        DEFAULT_CLIP_EPS,
    )
    explain = CreditSettings()
    assert (explain.credit, explain.temperature, explain.mode, explain.baseline, explain.vr_coef) == (
        DEFAULT_CREDIT,
        DEFAULT_TEMPERATURE,
        DEFAULT_REWARD_MODE,
        DEFAULT_BASELINE,
        DEFAULT_VR_COEF,
    )
    assert explain.kl_coef == 0.0  # an explanation leaves the KL penalty out unless asked for


def test_settings_read_the_strings_and_write_them_back(tmp_path) -> None:
    path = tmp_path / "learner.yaml"
    path.write_text("policy_path: p\ntrain_path: t\ndtype: bfloat16\nalgo:\n  credit: strict-min\n")
    env = {f"{ENV_PREFIX}ALGO__REWARD_MODE": "prm", f"{ENV_PREFIX}ALGO__KL_ESTIMATOR": "k3"}
    settings = load_settings(LearnerSettings, path, ENV_PREFIX, environ=env)
    assert settings.algo.credit is CreditMethod.STRICT_MIN and settings.algo.reward_mode is RewardMode.PRM
    assert settings.algo.kl_estimator is KlEstimator.K3
    dumped = settings.model_dump(mode="json")
    assert dumped["algo"]["credit"] == "strict-min" and dumped["dtype"] == "bfloat16"
    assert dumped["algo"]["reward_mode"] == "prm" and dumped["algo"]["kl_estimator"] == "k3"


def test_settings_reject_an_unknown_choice_by_name(tmp_path) -> None:
    path = tmp_path / "learner.yaml"
    path.write_text("policy_path: p\ntrain_path: t\nalgo:\n  baseline: critic\n")
    with pytest.raises(SettingsError, match=r"algo\.baseline"):
        load_settings(LearnerSettings, path)
