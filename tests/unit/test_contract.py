"""The contract's sampling and verdict values (contract/sampling.py, contract/verdict.py) and their
protobuf mappings (services/rollout/wire.py, services/verify/wire.py): ranges, edges, and round
trips through the wire that lose nothing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from puremesh.contract.sampling import (
    DEFAULT_MAX_N,
    DEFAULT_MAX_NEW_TOKENS,
    FinishReason,
    Sample,
    SamplingSpec,
)
from puremesh.contract.verdict import Verdict
from puremesh.rollout.v1 import rollout_pb2
from puremesh.services.rollout import wire as rollout_wire
from puremesh.services.verify import wire as verify_wire
from puremesh.verify.v1 import verify_pb2

# ---- sampling parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n": 0}, "n must be"),
        ({"n": 9}, r"n must be an integer in \[1, 8\]"),
        ({"n": 2.0}, "n must be"),
        ({"n": True}, "n must be"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 129}, r"max_new_tokens must be an integer in \[1, 128\]"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 2**63 - 1, "n": 2}, "seed"),  # sample 1 would draw with seed 2**63
        ({"stop": [""]}, "stop string"),
        ({"stop": ["x" * 65]}, "stop string"),
        ({"stop": [3]}, "stop string"),
        ({"stop": ["a"] * 9}, "at most 8 stop strings"),
        ({"stop": "abc"}, "list of strings"),
    ],
)
def test_sampling_spec_rejects_out_of_range_values(change, message) -> None:
    spec = dataclasses.replace(SamplingSpec(max_new_tokens=16), **change)
    with pytest.raises(ValueError, match=message):
        spec.validate(max_n=8, max_new_tokens=128, max_stop_strings=8, max_stop_length=64)


def test_sampling_spec_accepts_the_edges() -> None:
    SamplingSpec(n=8, temperature=0.0, top_p=1.0, max_new_tokens=128, seed=0, stop=["\n\n"]).validate(
        max_n=8, max_new_tokens=128
    )
    SamplingSpec(n=1, top_p=1e-9, max_new_tokens=1, seed=2**63 - 1, stop=["x" * 64] * 8).validate(
        max_n=1, max_new_tokens=1, max_stop_strings=8, max_stop_length=64
    )
    assert SamplingSpec(temperature=0.0).greedy and not SamplingSpec(temperature=0.5).greedy
    assert SamplingSpec(temperature=0.001).sampling_temperature == pytest.approx(0.01)
    assert SamplingSpec(temperature=0.7).sampling_temperature == pytest.approx(0.7)


def test_default_limits_are_the_documented_ones() -> None:
    SamplingSpec(n=DEFAULT_MAX_N, max_new_tokens=DEFAULT_MAX_NEW_TOKENS).validate()
    with pytest.raises(ValueError, match="n must be"):
        SamplingSpec(n=DEFAULT_MAX_N + 1).validate()


# ---- the rollout wire ------------------------------------------------------------------------


def test_sampling_round_trips_through_the_wire() -> None:
    for spec in (
        SamplingSpec(),
        SamplingSpec(n=4, temperature=0.5, top_p=0.25, max_new_tokens=7, seed=0, stop=["\n\n", "."]),
        SamplingSpec(seed=2**63 - 1),
    ):
        message = rollout_pb2.SamplingParams.FromString(
            rollout_wire.sampling_to_proto(spec).SerializeToString()
        )
        assert rollout_wire.sampling_from_proto(message) == spec


def test_unset_wire_fields_read_as_the_proto_defaults() -> None:
    spec = rollout_wire.sampling_from_proto(rollout_pb2.SamplingParams(n=2, max_new_tokens=3))
    assert spec.top_p == 1.0 and spec.seed is None and spec.stop == []
    assert spec.temperature == 0.0  # unset temperature is greedy, as the proto says


def test_samples_round_trip_and_unknown_finish_reasons_read_as_unspecified() -> None:
    for reason in (FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT):
        sample = Sample(2, [5, 6, 7], [-0.5, -0.25, 0.0], reason, 3, 11, "abc", run_id="run-a")
        wire = rollout_pb2.GenerateResponse.FromString(
            rollout_wire.sample_to_proto(sample).SerializeToString()
        )
        back = rollout_wire.sample_from_proto(wire)
        assert back == sample and back.finish_reason is reason
    unknown = rollout_pb2.GenerateResponse(finish_reason=99)
    assert rollout_wire.sample_from_proto(unknown).finish_reason is FinishReason.UNSPECIFIED
    assert set(rollout_wire.FINISH_FROM_PROTO) == set(rollout_pb2.FinishReason.values())


def test_a_sample_serialises_with_its_values() -> None:
    sample = Sample(0, [1], [-0.1], FinishReason.LENGTH, 4, 2, "x")
    assert json.loads(json.dumps(dataclasses.asdict(sample))) == {
        "sample_index": 0,
        "token_ids": [1],
        "logprobs": [-0.1],
        "finish_reason": "length",
        "policy_version": 4,
        "prompt_token_count": 2,
        "text": "x",
        "run_id": "",
    }


# ---- verdicts --------------------------------------------------------------------------------


def test_verdict_values_and_the_solved_notion() -> None:
    assert [v.value for v in Verdict] == [
        "correct",
        "incorrect",
        "no_answer",
        "no_ground_truth",
        "timeout",
        "error",
    ]
    assert [v for v in Verdict if v.solved] == [Verdict.CORRECT]
    assert json.dumps({"verdict": Verdict.NO_ANSWER}) == '{"verdict": "no_answer"}'
    assert Verdict("timeout") is Verdict.TIMEOUT


def test_verdicts_round_trip_through_the_wire() -> None:
    graded = [v for v in Verdict if v is not Verdict.ERROR]
    for verdict in graded:
        assert verify_wire.verdict_from_proto(verify_wire.VERDICT_TO_PROTO[verdict]) is verdict
    # Every wire value has a verdict; a failed item (UNSPECIFIED) and unknown values read as ERROR.
    assert set(verify_wire.VERDICT_TO_PROTO.values()) == set(verify_pb2.Verdict.values())
    assert verify_wire.verdict_from_proto(verify_pb2.VERDICT_UNSPECIFIED) is Verdict.ERROR
    assert verify_wire.verdict_from_proto(42) is Verdict.ERROR
