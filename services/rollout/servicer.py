"""RolloutService: protobuf in, streamed samples out. Sampling lives in the engine adapters, the
message mapping in wire.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

from prometheus_client import Counter, Gauge

from puremesh.rollout.v1 import rollout_pb2, rollout_pb2_grpc
from puremesh.rpc import metrics
from puremesh.rpc.errors import InvalidArgument, NotReady, Overloaded, StaleWeights

from .engine import Engine, EngineNotReadyError
from .settings import RolloutSettings
from .wire import sample_to_proto, sampling_from_proto

SERVICE = "rollout"
GENERATED_TOKENS = Counter("puremesh_rollout_generated_tokens_total", "Response tokens generated")
SAMPLES = Counter("puremesh_rollout_samples_total", "Finished samples by finish reason", ["finish_reason"])
POLICY_VERSION = Gauge("puremesh_rollout_policy_version", "Policy version held by this replica")


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, settings: RolloutSettings, engine: Engine, replica_id: str) -> None:
        self.settings = settings
        self.engine = engine
        self.replica_id = replica_id

    def _prompt_ids(self, request: rollout_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise InvalidArgument("no prompt given (set prompt_text or prompt_token_ids)")
        if kind == "prompt_text":
            if len(request.prompt_text) > self.settings.max_prompt_chars:
                limit = self.settings.max_prompt_chars
                raise InvalidArgument(f"prompt_text has {len(request.prompt_text)} characters, limit {limit}")
            return self.engine.tokenize(request.prompt_text)
        return list(request.prompt_token_ids.ids)

    async def Generate(
        self, request: rollout_pb2.GenerateRequest, context
    ) -> AsyncIterator[rollout_pb2.GenerateResponse]:
        if not self.engine.ready:
            raise NotReady("the rollout engine is not ready")
        self._check_weights(request)
        if self.engine.requests_in_flight >= self.settings.max_in_flight:
            raise Overloaded(f"{self.engine.requests_in_flight} generations in flight on this replica")
        prompt = self._prompt_ids(request)
        spec = sampling_from_proto(request.sampling)
        metrics.BATCH_SIZE.labels(SERVICE).observe(spec.n)
        try:
            async for sample in self.engine.generate(prompt, spec):
                GENERATED_TOKENS.inc(len(sample.token_ids))
                SAMPLES.labels(sample.finish_reason.value).inc()
                yield sample_to_proto(sample)
        except ValueError as error:  # the engine validates before it yields anything
            raise InvalidArgument(str(error)) from error
        except EngineNotReadyError as error:
            raise NotReady(str(error)) from error

    def _check_weights(self, request: rollout_pb2.GenerateRequest) -> None:
        """StaleWeights unless the replica's weights are the run and version the caller needs
        (rollout.proto GenerateRequest.run_id: the weights from disk match any run at 0)."""
        engine = self.engine
        run, version = engine.policy_run, engine.policy_version
        from_disk = run == "" and version == 0
        if request.run_id and run != request.run_id and not from_disk:
            raise StaleWeights(
                f"replica holds policy version {version} of run {run!r}, the caller's run is "
                f"{request.run_id!r}"
            )
        if request.min_policy_version > version:
            raise StaleWeights(
                f"replica holds policy version {version}, the caller needs >= {request.min_policy_version}"
            )

    async def GetStatus(
        self, request: rollout_pb2.GetStatusRequest, context
    ) -> rollout_pb2.GetStatusResponse:
        POLICY_VERSION.set(self.engine.policy_version)
        return rollout_pb2.GetStatusResponse(
            policy_version=self.engine.policy_version,
            model=self.engine.model_name,
            engine=self.engine.name,
            ready=self.engine.ready,
            requests_in_flight=self.engine.requests_in_flight,
            replica_id=self.replica_id,
            run_id=self.engine.policy_run,
        )
