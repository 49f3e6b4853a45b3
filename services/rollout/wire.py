"""The rollout service's protobuf <-> contract mapping, used by both its servicer and its client:
sampling parameters, finished samples and finish reasons (contract/sampling.py). The only
rollout module besides the servicer and the client that knows the protobuf."""

from __future__ import annotations

from puremesh.contract.sampling import FinishReason, Sample, SamplingSpec
from puremesh.rollout.v1 import rollout_pb2

FINISH_TO_PROTO = {
    FinishReason.STOP: rollout_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: rollout_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: rollout_pb2.FINISH_REASON_ABORT,
    FinishReason.UNSPECIFIED: rollout_pb2.FINISH_REASON_UNSPECIFIED,
}
FINISH_FROM_PROTO = {proto: reason for reason, proto in FINISH_TO_PROTO.items()}


def sampling_to_proto(spec: SamplingSpec) -> rollout_pb2.SamplingParams:
    params = rollout_pb2.SamplingParams(
        n=spec.n,
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_new_tokens=spec.max_new_tokens,
        stop=spec.stop,
    )
    if spec.seed is not None:
        params.seed = spec.seed
    return params


def sampling_from_proto(params: rollout_pb2.SamplingParams) -> SamplingSpec:
    """The request's parameters; top_p 0 (unset) means 1.0, as the proto says."""
    return SamplingSpec(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p or 1.0,
        max_new_tokens=params.max_new_tokens,
        seed=params.seed if params.HasField("seed") else None,
        stop=list(params.stop),
    )


def sample_to_proto(sample: Sample) -> rollout_pb2.GenerateResponse:
    return rollout_pb2.GenerateResponse(
        sample_index=sample.sample_index,
        token_ids=sample.token_ids,
        logprobs=sample.logprobs,
        finish_reason=FINISH_TO_PROTO[sample.finish_reason],
        policy_version=sample.policy_version,
        prompt_token_count=sample.prompt_token_count,
        text=sample.text,
        run_id=sample.run_id,
    )


def sample_from_proto(message: rollout_pb2.GenerateResponse) -> Sample:
    return Sample(
        sample_index=message.sample_index,
        token_ids=list(message.token_ids),
        logprobs=list(message.logprobs),
        finish_reason=FINISH_FROM_PROTO.get(message.finish_reason, FinishReason.UNSPECIFIED),
        policy_version=message.policy_version,
        prompt_token_count=message.prompt_token_count,
        text=message.text,
        run_id=message.run_id,
    )
