"""Settings of the PRM service (env prefix PUREMESH_PRM__)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from puremesh.contract.services import SERVICES, ServiceName
from puremesh.contract.steps import Readout
from puremesh.rpc.settings import FrozenSettings, ServerSettings

ENV_PREFIX = "PUREMESH_PRM__"
INFO = SERVICES[ServiceName.PRM]
DEFAULT_PORT = INFO.grpc_port


class PrmSettings(FrozenSettings):
    server: ServerSettings = ServerSettings(port=DEFAULT_PORT, metrics_port=INFO.metrics_port)
    model_path: str = Field("", description="local directory of a Qwen2-style token-classification PRM")
    device: str = Field("cpu", description='torch device, e.g. "cpu" or "cuda:0"')
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batching: bool = Field(True, description="coalesce concurrent calls into one forward pass")
    max_batch_tokens: int = Field(16384, ge=1, description="padded tokens per forward pass")
    max_wait_ms: float = Field(5.0, ge=0, description="longest a call waits for company")
    max_queue: int = Field(4096, ge=1, description="calls waiting for a batch before RESOURCE_EXHAUSTED")
    max_items: int = Field(1024, ge=1, description="items per ScoreSteps call; more is INVALID_ARGUMENT")
    max_text_chars: int = Field(200_000, ge=1, description="longer prompt or response texts fail as items")
    step_tag: str | None = Field(
        None,
        min_length=1,
        description='the token after each step, where scores are read ("\\n" for PURE\'s PRM, '
        '"<extra_0>" for Qwen2.5-Math-PRM); None = the model directory\'s layout file, else "\\n"',
    )
    readout: Readout | None = Field(
        None,
        description="difference (softmax_1 - softmax_0) or positive (2p - 1); None = the model "
        "directory's layout file, else difference (contract/steps.py Readout)",
    )
    prepare_threads: int = Field(
        1, ge=1, le=64, description="threads that tokenise and lay out calls, beside the event loop"
    )
