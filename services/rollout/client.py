"""Python client of RolloutService: contract values in and out (contract/sampling.py), deadlines
and bounded retries (rpc/client.py's ServiceClient); the message mapping is wire.py's."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from puremesh.common.v1 import common_pb2
from puremesh.contract.sampling import Sample, SamplingSpec
from puremesh.contract.services import SERVICES, ServiceName
from puremesh.rollout.v1 import rollout_pb2, rollout_pb2_grpc
from puremesh.rpc.client import RpcError, ServiceClient

from .wire import sample_from_proto, sampling_to_proto


@dataclass(frozen=True)
class ReplicaStatus:
    policy_version: int
    model: str
    engine: str
    ready: bool
    requests_in_flight: int
    replica_id: str
    run_id: str = ""  # the learner run of policy_version; "" = the weights from disk


class RolloutClient(ServiceClient):
    """`async with RolloutClient("host:port") as rollout: async for s in rollout.generate(...)`.

    `application`: the Ray Serve application behind a Ray Serve gRPC proxy at `target` (sent as
    `application` metadata on every call); empty for a standalone server.
    """

    SERVICE_NAME = SERVICES[ServiceName.ROLLOUT].proto_service
    STUB = rollout_pb2_grpc.RolloutServiceStub
    DEFAULT_TIMEOUT_S = 600.0

    async def generate(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingSpec,
        *,
        min_policy_version: int = 0,
        request_id: str = "",
        run_id: str = "",
    ) -> AsyncIterator[Sample]:
        """Stream the samples of one prompt (text or token ids) in completion order, from a
        replica at `min_policy_version` or newer of learner run `run_id` (empty: any run)."""
        request = rollout_pb2.GenerateRequest(
            request_id=request_id,
            sampling=sampling_to_proto(sampling),
            min_policy_version=min_policy_version,
            run_id=run_id,
        )
        if isinstance(prompt, str):
            request.prompt_text = prompt
        else:
            request.prompt_token_ids.CopyFrom(common_pb2.TokenIds(ids=list(prompt)))
        async for message in self._server_stream(self._stub.Generate, request):
            yield sample_from_proto(message)

    async def status(self) -> ReplicaStatus:
        reply = await self._unary(self._stub.GetStatus, rollout_pb2.GetStatusRequest(), self.probe_timeout)
        return ReplicaStatus(
            reply.policy_version,
            reply.model,
            reply.engine,
            reply.ready,
            reply.requests_in_flight,
            reply.replica_id,
            reply.run_id,
        )

    async def _probe_application(self) -> str:
        """GetStatus, and UNAVAILABLE unless the replica that answered is ready."""
        status = await self.status()
        if not status.ready:
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE, f"replica {status.replica_id} is not ready", self.target
            )
        return f"ready, replica {status.replica_id}, policy version {status.policy_version}"
