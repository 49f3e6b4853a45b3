"""Settings of the verify service (env prefix PUREMESH_VERIFY__)."""

from __future__ import annotations

from pydantic import Field

from puremesh.contract.services import SERVICES, ServiceName
from puremesh.rpc.settings import FrozenSettings, ServerSettings

from .grading import Grader

ENV_PREFIX = "PUREMESH_VERIFY__"
INFO = SERVICES[ServiceName.VERIFY]
DEFAULT_PORT = INFO.grpc_port


class VerifySettings(FrozenSettings):
    server: ServerSettings = ServerSettings(port=DEFAULT_PORT, metrics_port=INFO.metrics_port)
    grader: Grader = Field(
        Grader.MATH_VERIFY,
        description="math-verify (equivalence, in the grading processes) or pure (PURE's training-time "
        "check: the last \\boxed{} by string after MATH's normalisation, in the server itself)",
    )
    workers: int = Field(2, ge=1, le=256, description="grading processes")
    item_timeout_seconds: float = Field(5.0, gt=0, le=600, description="hard limit per graded item")
    max_items: int = Field(4096, ge=1, description="items per Verify call; more is INVALID_ARGUMENT")
    max_response_chars: int = Field(200_000, ge=1, description="longer responses fail as items")
    max_ground_truth_chars: int = Field(10_000, ge=1, description="longer ground truths fail as items")
