"""The algorithm's choices and defaults, each written once.

The choices (credit form, reward mode, baseline, KL estimator, off-policy correction) are
StrEnums: their values are the strings of the settings YAML, environment variables, CLI flags
and JSON output. The code that dispatches on a choice keeps a registry keyed by its enum
(credit.py, advantages.py, offpolicy.py).
The defaults are S1's (pure-algorithm.md, "Notation" and section 5); AlgoSettings, the
functions of this package, `puremesh credit` and the benchmarks point here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar


class CreditMethod(StrEnum):
    """Credit transform over a response's steps (pure-algorithm.md section 3)."""

    MIN = "min"
    SUM = "sum"
    MEAN = "mean"
    STRICT_MIN = "strict-min"


class RewardMode(StrEnum):
    """Which rewards enter the advantages (pure-algorithm.md section 4)."""

    PRM = "prm"
    VR = "vr"
    PRM_VR = "prm+vr"

    @property
    def process(self) -> bool:
        """Whether the PRM's step scores count (in `vr` mode they are all 0)."""
        return self is not RewardMode.VR

    @property
    def verifiable(self) -> bool:
        """Whether the leave-one-out verifiable reward is added to the last step."""
        return self is not RewardMode.PRM


class BaselineKind(StrEnum):
    """RLOO baseline: the others' reward per token (S1) or per step (for comparison)."""

    TOKEN = "token"
    STEP = "step"


class KlEstimator(StrEnum):
    """Per-token KL estimate: k1 = logp_old - logp_ref (S1), k3 the low-variance one (S2)."""

    K1 = "k1"
    K3 = "k3"


class OffPolicyCorrection(StrEnum):
    """Per-token weight of the PPO loss against the behaviour policy that sampled the tokens
    (offpolicy.py): none, or truncated importance sampling (tis)."""

    NONE = "none"
    TIS = "tis"


CREDIT_METHODS: tuple[CreditMethod, ...] = tuple(CreditMethod)
REWARD_MODES: tuple[RewardMode, ...] = tuple(RewardMode)
BASELINES: tuple[BaselineKind, ...] = tuple(BaselineKind)
KL_ESTIMATORS: tuple[KlEstimator, ...] = tuple(KlEstimator)
OFF_POLICY_CORRECTIONS: tuple[OffPolicyCorrection, ...] = tuple(OffPolicyCorrection)

DEFAULT_CREDIT = CreditMethod.MIN
DEFAULT_TEMPERATURE = 0.1  # T, the softmin temperature of min-form credit
DEFAULT_REWARD_MODE = RewardMode.PRM_VR
DEFAULT_BASELINE = BaselineKind.TOKEN
DEFAULT_KL_COEF = 0.001  # beta, the KL penalty in the token rewards
DEFAULT_KL_ESTIMATOR = KlEstimator.K1
DEFAULT_VR_COEF = 1.0  # c_vr, the verifiable-reward coefficient
DEFAULT_NORMALIZE = True  # batch normalisation of the advantages
DEFAULT_CLIP_EPS = 0.2  # PPO ratio clip
DEFAULT_OFF_POLICY_CORRECTION = OffPolicyCorrection.NONE
DEFAULT_TIS_CAP = 2.0  # C, the truncation of the importance weights (offpolicy.py)
NORMALIZE_EPS = 1e-8  # floor of the variance in the batch normalisation

Choice = TypeVar("Choice", bound=StrEnum)


def parse_choice(kind: type[Choice], value: str, what: str) -> Choice:
    """`value` as a member of `kind`; ValueError naming `what` and the allowed values if unknown.

    Members pass through unchanged, and so do their exact strings ("min"); nothing else does
    (no case folding: "Min" is unknown).
    """
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(str(member)) for member in kind)
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}") from None
