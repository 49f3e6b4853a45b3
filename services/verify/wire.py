"""The verify service's protobuf <-> contract mapping, used by both its servicer and its client:
`Verdict` (contract/verdict.py) against the wire enum. An item that failed travels as an
ItemError with VERDICT_UNSPECIFIED (verify.proto), which reads back as Verdict.ERROR."""

from __future__ import annotations

from puremesh.contract.verdict import Verdict
from puremesh.verify.v1 import verify_pb2

VERDICT_TO_PROTO = {
    Verdict.CORRECT: verify_pb2.VERDICT_CORRECT,
    Verdict.INCORRECT: verify_pb2.VERDICT_INCORRECT,
    Verdict.NO_ANSWER: verify_pb2.VERDICT_NO_ANSWER,
    Verdict.NO_GROUND_TRUTH: verify_pb2.VERDICT_NO_GROUND_TRUTH,
    Verdict.TIMEOUT: verify_pb2.VERDICT_TIMEOUT,
    Verdict.ERROR: verify_pb2.VERDICT_UNSPECIFIED,
}
VERDICT_FROM_PROTO = {proto: verdict for verdict, proto in VERDICT_TO_PROTO.items()}


def verdict_from_proto(value: int) -> Verdict:
    """The verdict of a wire value; ERROR for UNSPECIFIED and for values this side does not know."""
    return VERDICT_FROM_PROTO.get(value, Verdict.ERROR)
