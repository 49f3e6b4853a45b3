"""VerifyService: protobuf in, verdicts out. Grading itself lives in grading.py and pool.py, the
verdict mapping in wire.py. With `grader: pure` the items are graded in the server (grading.py
`grade_pure`: string work, linear time); math-verify runs in the pool's processes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from puremesh.common.v1 import common_pb2
from puremesh.rpc import metrics
from puremesh.rpc.errors import DeadlineExceeded, InvalidArgument, Overloaded
from puremesh.rpc.server import queue_budget
from puremesh.verify.v1 import verify_pb2, verify_pb2_grpc

from .grading import Grader, grade_pure
from .pool import GradeResult, GradingPool, PoolBusyError
from .settings import VerifySettings
from .wire import VERDICT_TO_PROTO

SERVICE = "verify"
VERDICTS = Counter(
    "puremesh_verify_verdicts_total",
    "Graded items by verdict ('error' for items that could not be graded)",
    ["verdict"],
)
BUSY_WORKERS = Gauge("puremesh_verify_busy_workers", "Grading processes working on an item")


def _item_error(code: int, message: str) -> verify_pb2.VerifyResult:
    return verify_pb2.VerifyResult(error=common_pb2.ItemError(code=code, message=message))


class VerifyServicer(verify_pb2_grpc.VerifyServiceServicer):
    def __init__(self, settings: VerifySettings, pool: GradingPool) -> None:
        self.settings = settings
        self.pool = pool

    def _check(self, item: verify_pb2.VerifyItem) -> str | None:
        """The reason an item cannot be graded, or None."""
        if len(item.response) > self.settings.max_response_chars:
            return f"response is {len(item.response)} characters, limit {self.settings.max_response_chars}"
        if item.HasField("ground_truth") and len(item.ground_truth) > self.settings.max_ground_truth_chars:
            return f"ground_truth is longer than {self.settings.max_ground_truth_chars} characters"
        return None

    async def _grade(self, work: list[tuple[str, str | None]], context) -> list[GradeResult]:
        if self.settings.grader is Grader.PURE:
            return [GradeResult(*grade_pure(response, truth)) for response, truth in work]
        cap = self.settings.server.max_queue_wait_seconds
        budget = queue_budget(context, cap)
        try:
            return await self.pool.grade_many(
                work, self.settings.item_timeout_seconds, queue_timeout_s=budget
            )
        except PoolBusyError as error:
            raise (DeadlineExceeded if budget < cap else Overloaded)(str(error)) from None

    async def Verify(self, request: verify_pb2.VerifyRequest, context) -> verify_pb2.VerifyResponse:
        items = request.items
        if len(items) > self.settings.max_items:
            raise InvalidArgument(f"{len(items)} items in one call; the limit is {self.settings.max_items}")
        metrics.BATCH_SIZE.labels(SERVICE).observe(len(items))
        results: list[verify_pb2.VerifyResult | None] = [None] * len(items)
        work: list[tuple[int, tuple[str, str | None]]] = []
        for index, item in enumerate(items):
            problem = self._check(item)
            if problem is not None:
                results[index] = _item_error(common_pb2.ERROR_CODE_INVALID_ARGUMENT, problem)
            else:
                truth = item.ground_truth if item.HasField("ground_truth") else None
                work.append((index, (item.response, truth)))
        # Sampled around each call: the pool's waiting items and busy workers.
        metrics.QUEUE_DEPTH.labels(SERVICE).set(self.pool.queue_depth + len(work))
        BUSY_WORKERS.set(self.pool.busy)
        graded = await self._grade([w for _, w in work], context)
        metrics.QUEUE_DEPTH.labels(SERVICE).set(self.pool.queue_depth)
        BUSY_WORKERS.set(self.pool.busy)
        for (index, _), outcome in zip(work, graded, strict=True):
            if outcome.error is not None:
                results[index] = _item_error(common_pb2.ERROR_CODE_INTERNAL, outcome.error)
            else:
                results[index] = verify_pb2.VerifyResult(
                    verdict=VERDICT_TO_PROTO[outcome.verdict], extracted_answer=outcome.answer or ""
                )
            VERDICTS.labels(outcome.verdict.value).inc()
        return verify_pb2.VerifyResponse(results=results)
