"""Off-policy correction (trainer/algo/offpolicy.py) against hand-computed cases, and its wiring
into the PPO loss and the settings."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from puremesh.trainer.algo import (
    OFF_POLICY_CORRECTIONS,
    OFF_POLICY_WEIGHTS,
    OffPolicyCorrection,
    off_policy_weights,
    ppo_loss,
    truncated_importance_weights,
)
from puremesh.trainer.settings import AlgoSettings

LOGP_OLD = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
BEHAVIOUR = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))
MASK = torch.tensor([[True, True, False]])


def test_truncated_importance_weights_by_hand() -> None:
    # pi_old / mu = 0.5 / 0.25 = 2 -> capped at 1.5; 0.2 / 0.4 = 0.5 stays; padding -> 0
    weights = truncated_importance_weights(LOGP_OLD, BEHAVIOUR, MASK, cap=1.5)
    assert torch.allclose(weights, torch.tensor([[1.5, 0.5, 0.0]]))
    uncapped = truncated_importance_weights(LOGP_OLD, BEHAVIOUR, MASK, cap=4.0)
    assert torch.allclose(uncapped, torch.tensor([[2.0, 0.5, 0.0]]))
    assert not weights.requires_grad


def test_none_weighs_every_valid_token_one() -> None:
    weights = off_policy_weights(OffPolicyCorrection.NONE, LOGP_OLD, BEHAVIOUR, MASK)
    assert weights.tolist() == [[1.0, 1.0, 0.0]]


def test_a_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="cap must be >= 1"):
        truncated_importance_weights(LOGP_OLD, BEHAVIOUR, MASK, cap=0.5)


def test_the_weighted_ppo_loss_and_its_gradient_by_hand() -> None:
    advantages = torch.tensor([[1.0, -1.0, 5.0]])
    logp_new = LOGP_OLD.clone().requires_grad_(True)
    weights = off_policy_weights(OffPolicyCorrection.TIS, LOGP_OLD, BEHAVIOUR, MASK, cap=1.5)
    result = ppo_loss(logp_new, LOGP_OLD, advantages, MASK, 0.2, weights)
    # ratio 1: per token -A * w = [-1 * 1.5, +1 * 0.5]; the sequence's mean over 2 tokens
    assert math.isclose(float(result.loss), (-1.5 + 0.5) / 2, rel_tol=1e-6)
    result.loss.backward()
    # d/d logp_new of -A * w * exp(new - old) / 2 at ratio 1: -A * w / 2
    assert torch.allclose(logp_new.grad, torch.tensor([[-0.75, 0.25, 0.0]]))
    plain = ppo_loss(LOGP_OLD, LOGP_OLD, advantages, MASK, 0.2)
    assert math.isclose(float(plain.loss), 0.0, abs_tol=1e-7)


def test_every_choice_has_an_entry_and_a_settings_string() -> None:
    assert set(OFF_POLICY_WEIGHTS) == set(OFF_POLICY_CORRECTIONS) == set(OffPolicyCorrection)
    settings = AlgoSettings.model_validate({"off_policy_correction": "tis", "tis_cap": 3})
    assert settings.off_policy_correction is OffPolicyCorrection.TIS and settings.tis_cap == 3
    assert AlgoSettings().off_policy_correction is OffPolicyCorrection.NONE
    with pytest.raises(ValidationError):
        AlgoSettings.model_validate({"off_policy_correction": "TIS"})
    with pytest.raises(ValidationError):
        AlgoSettings.model_validate({"tis_cap": 0.9})
