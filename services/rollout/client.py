"""Python client of RolloutService: plain values in and out, deadlines and bounded retries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from puremesh.common.v1 import common_pb2
from puremesh.rollout.v1 import rollout_pb2, rollout_pb2_grpc
from puremesh.rpc.client import (
    RetryPolicy,
    RpcError,
    call_metadata,
    call_server_stream,
    call_unary,
    check_health,
    open_channel,
)

FINISH_NAMES = {
    rollout_pb2.FINISH_REASON_STOP: "stop",
    rollout_pb2.FINISH_REASON_LENGTH: "length",
    rollout_pb2.FINISH_REASON_ABORT: "abort",
}


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int
    prompt_token_count: int
    text: str


@dataclass(frozen=True)
class ReplicaStatus:
    policy_version: int
    model: str
    engine: str
    ready: bool
    requests_in_flight: int
    replica_id: str


SERVICE_NAME = "puremesh.rollout.v1.RolloutService"


class RolloutClient:
    """`async with RolloutClient("host:port") as rollout: async for s in rollout.generate(...)`.

    `application`: the Ray Serve application behind a Ray Serve gRPC proxy at `target` (sent as
    `application` metadata on every call); empty for a standalone server.
    """

    def __init__(
        self, target: str, timeout: float = 600.0, retry: RetryPolicy | None = None, application: str = ""
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.application = application
        self._metadata = call_metadata(application)
        self._channel = open_channel(target)
        self._stub = rollout_pb2_grpc.RolloutServiceStub(self._channel)

    async def generate(
        self,
        prompt: str | Sequence[int],
        sampling: Sampling,
        *,
        min_policy_version: int = 0,
        request_id: str = "",
    ) -> AsyncIterator[Sample]:
        """Stream the samples of one prompt (text or token ids) in completion order."""
        params = rollout_pb2.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
            stop=sampling.stop,
        )
        if sampling.seed is not None:
            params.seed = sampling.seed
        request = rollout_pb2.GenerateRequest(
            request_id=request_id, sampling=params, min_policy_version=min_policy_version
        )
        if isinstance(prompt, str):
            request.prompt_text = prompt
        else:
            request.prompt_token_ids.CopyFrom(common_pb2.TokenIds(ids=list(prompt)))
        stream = call_server_stream(
            self._stub.Generate,
            request,
            timeout=self.timeout,
            retry=self.retry,
            target=self.target,
            metadata=self._metadata,
        )
        async for message in stream:
            yield Sample(
                sample_index=message.sample_index,
                token_ids=list(message.token_ids),
                logprobs=list(message.logprobs),
                finish_reason=FINISH_NAMES.get(message.finish_reason, "unspecified"),
                policy_version=message.policy_version,
                prompt_token_count=message.prompt_token_count,
                text=message.text,
            )

    async def status(self) -> ReplicaStatus:
        reply = await call_unary(
            self._stub.GetStatus,
            rollout_pb2.GetStatusRequest(),
            timeout=min(self.timeout, 30.0),
            retry=self.retry,
            target=self.target,
            metadata=self._metadata,
        )
        return ReplicaStatus(
            reply.policy_version,
            reply.model,
            reply.engine,
            reply.ready,
            reply.requests_in_flight,
            reply.replica_id,
        )

    async def probe(self) -> str:
        """Check that the service answers; a one-line description, or RpcError. Standalone:
        grpc.health.v1. Through a Ray Serve proxy (which answers no grpc.health): GetStatus, and
        UNAVAILABLE unless the replica that answered is ready."""
        if not self.application:
            timeout = min(self.timeout, 30.0)
            await check_health(
                self._channel, SERVICE_NAME, timeout=timeout, retry=self.retry, target=self.target
            )
            return "SERVING"
        status = await self.status()
        if not status.ready:
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE, f"replica {status.replica_id} is not ready", self.target
            )
        return f"ready, replica {status.replica_id}, policy version {status.policy_version}"

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> RolloutClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
