"""PURE math: credit transforms, RLOO baselines, returns, normalisation, PPO loss, diagnostics.

A pure core: imports only the standard library and torch, takes plain tensors, never a
config object, never does I/O (ARCHITECTURE.md rule 1).
"""

from .advantages import (
    BASELINES,
    KL_ESTIMATORS,
    REWARD_MODES,
    BaselineKind,
    KlEstimator,
    PureAdvantages,
    RewardMode,
    kl_estimate,
    leave_one_out,
    normalize_advantages,
    pure_advantages,
    returns_to_go,
    step_level_baseline,
    token_level_baseline,
    verifiable_advantage,
)
from .credit import (
    CREDIT_METHODS,
    CreditMethod,
    credit_transform,
    outcome_reward,
    softmin_weights,
    suffix_min,
)
from .diagnostics import prm_vr_agreement, repeat_score, steps_per_response
from .ppo import PpoLoss, masked_sequence_mean, ppo_loss
from .steps import (
    STEP_SEPARATOR,
    StepLayout,
    scatter_to_step_ends,
    separator_token_ids,
    step_end_mask_from_ids,
    step_end_mask_from_lengths,
    step_layout,
)

__all__ = [
    "BASELINES",
    "CREDIT_METHODS",
    "KL_ESTIMATORS",
    "REWARD_MODES",
    "STEP_SEPARATOR",
    "BaselineKind",
    "CreditMethod",
    "KlEstimator",
    "PpoLoss",
    "PureAdvantages",
    "RewardMode",
    "StepLayout",
    "credit_transform",
    "kl_estimate",
    "leave_one_out",
    "masked_sequence_mean",
    "normalize_advantages",
    "outcome_reward",
    "ppo_loss",
    "prm_vr_agreement",
    "pure_advantages",
    "repeat_score",
    "returns_to_go",
    "scatter_to_step_ends",
    "separator_token_ids",
    "softmin_weights",
    "step_end_mask_from_ids",
    "step_end_mask_from_lengths",
    "step_layout",
    "step_level_baseline",
    "steps_per_response",
    "suffix_min",
    "token_level_baseline",
    "verifiable_advantage",
]
