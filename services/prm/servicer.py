"""PrmService: protobuf in, step scores out. Splitting and layout live in contract/steps.py, the
model in scorer.py, request coalescing in batcher.py.

Tokenisation and layout of a call's items, and decoding of its step texts, run on
`prepare_threads` worker threads of their own: a call of 1024 long texts would otherwise stall
the event loop (and health checks with it), and a small pool keeps the Python part of that work
from crowding the loop out of the GIL. The wait for a batch is bounded by the call's deadline
(`rpc.server.queue_budget`)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import Histogram

from puremesh.common.v1 import common_pb2
from puremesh.prm.v1 import prm_pb2, prm_pb2_grpc
from puremesh.rpc import metrics
from puremesh.rpc.errors import DeadlineExceeded, InvalidArgument, NotReady, Overloaded
from puremesh.rpc.server import queue_budget

from .batcher import BatcherFull, BatcherStopped, BatcherTimeout, DynamicBatcher
from .scorer import PrmScorer
from .settings import PrmSettings

log = logging.getLogger(__name__)
SERVICE = "prm"
BATCH_TOKENS = Histogram(
    "puremesh_prm_batch_tokens",
    "Padded tokens per PRM forward pass",
    buckets=(64, 256, 1024, 4096, 16384, 65536, 262144),
)


@dataclass
class _Prepared:
    index: int
    response_ids: list[int]
    spans: list[tuple[int, int]]
    input_ids: list[int]
    positions: list[int]


def _item_error(code: int, message: str) -> prm_pb2.ScoreResult:
    return prm_pb2.ScoreResult(error=common_pb2.ItemError(code=code, message=message))


class PrmServicer(prm_pb2_grpc.PrmServiceServicer):
    def __init__(self, settings: PrmSettings) -> None:
        self.settings = settings
        self.scorer: PrmScorer | None = None
        self.batcher: DynamicBatcher | None = None
        self._preparer = ThreadPoolExecutor(settings.prepare_threads, thread_name_prefix="prm-prepare")

    async def start(self) -> None:
        """Load the PRM, warm it up with one forward pass, start the batcher."""
        if not self.settings.model_path:
            raise ValueError("model_path is not set (PUREMESH_PRM__MODEL_PATH or model_path in --config)")
        self.scorer = await asyncio.to_thread(
            PrmScorer,
            self.settings.model_path,
            device=self.settings.device,
            dtype=self.settings.dtype,
            max_tokens_per_forward=self.settings.max_batch_tokens,
            step_tag=self.settings.step_tag,
            readout=self.settings.readout,
        )
        log.info("PRM layout %s, tokenizer %s", self.scorer.layout, self.scorer.fingerprint)
        warm = self.scorer.prepare(self.scorer.tokenize("1 + 1"), self.scorer.tokenize("2\n\n2"))
        await asyncio.to_thread(self.scorer.score, [(warm[1], warm[2])])
        self.batcher = DynamicBatcher(
            self.scorer.score,
            max_batch_tokens=self.settings.max_batch_tokens,
            max_wait_ms=self.settings.max_wait_ms,
            enabled=self.settings.batching,
            max_queue=self.settings.max_queue,
            on_batch=self._observe,
        )
        await self.batcher.start()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self._preparer.shutdown(wait=False)

    def _observe(self, stats) -> None:
        metrics.BATCH_SIZE.labels(SERVICE).observe(stats.items)
        BATCH_TOKENS.observe(stats.tokens)
        if self.batcher is not None:
            metrics.QUEUE_DEPTH.labels(SERVICE).set(self.batcher.queued_items)

    def _token_ids(self, item: prm_pb2.ScoreItem, field: str) -> list[int]:
        """The prompt or response of an item as token ids (ValueError if unusable)."""
        kind = item.WhichOneof(field)
        if kind is None:
            raise ValueError(f"no {field} given")
        assert self.scorer is not None
        if kind.endswith("_text"):
            text = getattr(item, kind)
            if len(text) > self.settings.max_text_chars:
                raise ValueError(f"{kind} has {len(text)} characters, limit {self.settings.max_text_chars}")
            return self.scorer.tokenize(text)
        ids = list(getattr(item, kind).ids)
        bad = [i for i in ids if not 0 <= i < self.scorer.vocab_size]
        if bad:
            raise ValueError(f"{kind} holds id {bad[0]} outside the vocabulary [0, {self.scorer.vocab_size})")
        return ids

    def _prepare(self, index: int, item: prm_pb2.ScoreItem) -> _Prepared:
        assert self.scorer is not None
        prompt_ids = self._token_ids(item, "prompt")
        given = None
        if item.WhichOneof("response") == "response_steps":
            steps = list(item.response_steps.steps)
            if sum(map(len, steps)) > self.settings.max_text_chars:
                raise ValueError(f"response_steps hold more than {self.settings.max_text_chars} characters")
            response_ids, given = self.scorer.step_ids(steps)
        else:
            response_ids = self._token_ids(item, "response")
        spans, input_ids, positions = self.scorer.prepare(prompt_ids, response_ids, given)
        if spans:
            self.scorer.check_item(input_ids, positions)
        return _Prepared(index, response_ids, list(spans), input_ids, positions)

    def _prepare_all(self, items) -> tuple[list[prm_pb2.ScoreResult], list[_Prepared]]:
        """Worker thread: the items' layouts; items that cannot be scored get their error."""
        results: list[prm_pb2.ScoreResult] = [prm_pb2.ScoreResult() for _ in items]
        prepared: list[_Prepared] = []
        for index, item in enumerate(items):
            try:
                prepared.append(self._prepare(index, item))
            except ValueError as error:
                results[index] = _item_error(common_pb2.ERROR_CODE_INVALID_ARGUMENT, str(error))
        return results, [p for p in prepared if p.spans]

    def _step_texts(self, to_score: list[_Prepared]) -> list[str]:
        """Worker thread: every step's text in one tokenizer call."""
        assert self.scorer is not None
        return self.scorer.tokenizer.batch_decode(
            [p.response_ids[start:end] for p in to_score for start, end in p.spans],
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )

    async def DescribeTokenizer(self, request, context) -> prm_pb2.TokenizerIdentity:
        if self.scorer is None:
            raise NotReady("the PRM is not loaded")
        return prm_pb2.TokenizerIdentity(
            fingerprint=self.scorer.fingerprint,
            vocab_size=self.scorer.vocab_size,
            step_tag=self.scorer.layout.step_tag,
            readout=str(self.scorer.layout.readout),
        )

    async def ScoreSteps(self, request: prm_pb2.ScoreStepsRequest, context) -> prm_pb2.ScoreStepsResponse:
        if self.scorer is None or self.batcher is None:
            raise NotReady("the PRM is not loaded")
        if len(request.items) > self.settings.max_items:
            raise InvalidArgument(
                f"{len(request.items)} items in one call; the limit is {self.settings.max_items}"
            )
        loop = asyncio.get_running_loop()
        results, to_score = await loop.run_in_executor(self._preparer, self._prepare_all, request.items)
        cap = self.settings.server.max_queue_wait_seconds
        budget = queue_budget(context, cap)
        try:
            scores = await self.batcher.submit([(p.input_ids, p.positions) for p in to_score], timeout=budget)
        except BatcherFull as error:
            raise Overloaded(str(error)) from error
        except BatcherTimeout as error:
            raise (DeadlineExceeded if budget < cap else Overloaded)(str(error)) from None
        except BatcherStopped as error:
            raise NotReady(str(error)) from error
        except Exception as error:  # a failed forward pass fails these items, not the service
            log.exception("PRM forward pass failed")
            for p in to_score:
                results[p.index] = _item_error(
                    common_pb2.ERROR_CODE_INTERNAL, f"forward pass failed: {error}"
                )
            return prm_pb2.ScoreStepsResponse(results=results)
        texts = iter(await loop.run_in_executor(self._preparer, self._step_texts, to_score))
        for p, step_scores in zip(to_score, scores, strict=True):
            results[p.index] = prm_pb2.ScoreResult(
                steps=[
                    prm_pb2.StepScore(score=score, token_start=start, token_end=end, text=next(texts))
                    for (start, end), score in zip(p.spans, step_scores, strict=True)
                ]
            )
        return prm_pb2.ScoreStepsResponse(results=results)
