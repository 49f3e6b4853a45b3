"""PURE math: credit transforms, RLOO baselines, returns, normalisation, PPO loss, off-policy
correction, diagnostics.

The algorithm's choices (enums) and defaults are written once, in options.py.

A pure core: imports only the standard library and torch, takes plain tensors, never a
config object, never does I/O (ARCHITECTURE.md rule 1).
"""

from .advantages import (
    BASELINE_SHARES,
    KL_ESTIMATES,
    PureAdvantages,
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
    CREDIT_TRANSFORMS,
    credit_transform,
    outcome_reward,
    softmin_weights,
    suffix_min,
)
from .diagnostics import prm_vr_agreement, repeat_score, steps_per_response
from .offpolicy import OFF_POLICY_WEIGHTS, off_policy_weights, truncated_importance_weights
from .options import (
    BASELINES,
    CREDIT_METHODS,
    DEFAULT_BASELINE,
    DEFAULT_CLIP_EPS,
    DEFAULT_CREDIT,
    DEFAULT_KL_COEF,
    DEFAULT_KL_ESTIMATOR,
    DEFAULT_NORMALIZE,
    DEFAULT_OFF_POLICY_CORRECTION,
    DEFAULT_REWARD_MODE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TIS_CAP,
    DEFAULT_VR_COEF,
    KL_ESTIMATORS,
    NORMALIZE_EPS,
    OFF_POLICY_CORRECTIONS,
    REWARD_MODES,
    BaselineKind,
    CreditMethod,
    KlEstimator,
    OffPolicyCorrection,
    RewardMode,
    parse_choice,
)
from .ppo import PpoLoss, masked_sequence_mean, ppo_loss
from .steps import StepLayout, scatter_to_step_ends, step_end_mask_from_lengths, step_layout

__all__ = [
    "BASELINES",
    "BASELINE_SHARES",
    "CREDIT_METHODS",
    "CREDIT_TRANSFORMS",
    "DEFAULT_BASELINE",
    "DEFAULT_CLIP_EPS",
    "DEFAULT_CREDIT",
    "DEFAULT_KL_COEF",
    "DEFAULT_KL_ESTIMATOR",
    "DEFAULT_NORMALIZE",
    "DEFAULT_OFF_POLICY_CORRECTION",
    "DEFAULT_REWARD_MODE",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TIS_CAP",
    "DEFAULT_VR_COEF",
    "KL_ESTIMATES",
    "KL_ESTIMATORS",
    "NORMALIZE_EPS",
    "OFF_POLICY_CORRECTIONS",
    "OFF_POLICY_WEIGHTS",
    "REWARD_MODES",
    "BaselineKind",
    "CreditMethod",
    "KlEstimator",
    "OffPolicyCorrection",
    "PpoLoss",
    "PureAdvantages",
    "RewardMode",
    "StepLayout",
    "credit_transform",
    "kl_estimate",
    "leave_one_out",
    "masked_sequence_mean",
    "normalize_advantages",
    "off_policy_weights",
    "outcome_reward",
    "parse_choice",
    "ppo_loss",
    "prm_vr_agreement",
    "pure_advantages",
    "repeat_score",
    "returns_to_go",
    "scatter_to_step_ends",
    "softmin_weights",
    "step_end_mask_from_lengths",
    "step_layout",
    "step_level_baseline",
    "steps_per_response",
    "suffix_min",
    "token_level_baseline",
    "truncated_importance_weights",
    "verifiable_advantage",
]
