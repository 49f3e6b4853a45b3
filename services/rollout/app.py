"""Assembles the rollout service for a ServiceHost: the engine named in settings plus the servicer."""

from __future__ import annotations

import logging
import socket

from puremesh.rollout.v1 import rollout_pb2_grpc
from puremesh.rpc.server import ServiceDefinition
from puremesh.weightsync.fetcher import WeightFetcher
from puremesh.weightsync.subscriber import WeightSubscriber
from puremesh.weightsync.transport import FetchOptions

from .engine import Engine
from .hf_engine import HfEngine
from .servicer import POLICY_VERSION, SERVICE, RolloutServicer
from .settings import RolloutSettings
from .vllm_engine import VllmEngine

log = logging.getLogger(__name__)

# vLLM's memory reservation when settings leave it open: its own default on a GPU; on the CPU
# build the same flag reserves a share of RAM, which other processes on a laptop also need.
GPU_MEMORY_SHARE = 0.9
CPU_MEMORY_SHARE = 0.3


def build_engine(settings: RolloutSettings) -> Engine:
    """The engine backend named by settings.engine (constructing it does no I/O)."""
    if not settings.model_path:
        raise ValueError("model_path is not set (PUREMESH_ROLLOUT__MODEL_PATH or model_path in --config)")
    limits = dict(
        model_name=settings.model_name or None, max_n=settings.max_n, max_new_tokens=settings.max_new_tokens
    )
    if settings.engine == "vllm":
        memory = settings.gpu_memory_utilization
        if memory is None:
            # (not torch.cuda.is_available(): it would fix the visible GPUs before the engine sets them)
            memory = GPU_MEMORY_SHARE if settings.device.startswith("cuda") else CPU_MEMORY_SHARE
        return VllmEngine(
            settings.model_path,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            enforce_eager=settings.enforce_eager,
            device=settings.device,
            tensor_parallel_size=settings.tensor_parallel_size,
            engine_kwargs={"gpu_memory_utilization": memory, **settings.vllm_engine_args},
            **limits,
        )
    return HfEngine(
        settings.model_path,
        device=settings.device,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        **limits,
    )


def rollout_service(settings: RolloutSettings) -> ServiceDefinition:
    engine = build_engine(settings)
    replica_id = settings.replica_id or f"{socket.gethostname()}:{settings.server.port}"
    servicer = RolloutServicer(settings, engine, replica_id)
    subscriber = None
    if settings.weights_target:
        options = FetchOptions(
            bulk=settings.weights_bulk,
            nccl=settings.weights_nccl and settings.device.startswith("cuda"),
            # vLLM sees its GPUs from 0 (CUDA_VISIBLE_DEVICES); the hf engine the device as named
            nccl_device="cuda:0" if settings.engine == "vllm" else settings.device,
        )
        fetcher = WeightFetcher(settings.weights_target, replica_id, options, settings.weights_security)
        subscriber = WeightSubscriber(engine, fetcher, on_version=POLICY_VERSION.set)

    async def start() -> None:
        await engine.start()
        if subscriber is not None:
            # A replica that joins late or restarts pulls the current version before it is ready.
            try:
                version = await subscriber.sync_once(settings.weights_sync_timeout_seconds)
                log.info("policy version %d pulled from %s", version, subscriber.target)
            except TimeoutError as error:
                log.warning("%s; starting with policy version %d", error, engine.policy_version)
            subscriber.start()
        POLICY_VERSION.set(engine.policy_version)

    async def stop() -> None:
        if subscriber is not None:
            await subscriber.stop()
        await engine.close()

    return ServiceDefinition(
        name=SERVICE,
        full_name="puremesh.rollout.v1.RolloutService",
        servicer=servicer,
        add_to_server=rollout_pb2_grpc.add_RolloutServiceServicer_to_server,
        start=start,
        stop=stop,
        always_available=frozenset({"GetStatus"}),
    )
