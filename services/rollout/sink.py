"""Where a backend delivers the samples of one generation: `SampleSink` turns the backend's
tokens and log-probabilities into contract `Sample`s, in completion order, on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from puremesh.contract.sampling import FinishReason, Sample


class SampleSink:
    """Collects the samples of one generation; backends deliver into it.

    `deliver` / `fail` run on the event loop; the `*_threadsafe` variants may be called from any
    thread. The sink is complete (`done`) when every index was delivered once or it failed; later
    deliveries are ignored. Text is decoded here, on the event loop thread.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        n: int,
        prompt_token_count: int,
        policy_version: int,
        decode: Callable[[list[int]], str],
        on_done: Callable[[], None],
        run_id: str = "",
    ) -> None:
        self._loop = loop
        self._pending = set(range(n))
        self._decode = decode
        self._on_done = on_done
        self.prompt_token_count = prompt_token_count
        self.policy_version = policy_version
        self.run_id = run_id
        self.queue: asyncio.Queue[Sample | BaseException] = asyncio.Queue()
        self.done = False

    @property
    def pending(self) -> frozenset[int]:
        """Sample indices not delivered yet."""
        return frozenset(self._pending)

    def deliver(self, index: int, token_ids: list[int], logprobs: list[float], reason: FinishReason) -> None:
        if self.done or index not in self._pending:
            return
        if len(logprobs) != len(token_ids):
            self.fail(RuntimeError(f"engine returned {len(logprobs)} logprobs for {len(token_ids)} tokens"))
            return
        self._pending.discard(index)
        sample = Sample(
            sample_index=index,
            token_ids=[int(t) for t in token_ids],
            logprobs=[float(x) for x in logprobs],
            finish_reason=FinishReason(reason),
            text=self._decode(token_ids),
            policy_version=self.policy_version,
            prompt_token_count=self.prompt_token_count,
            run_id=self.run_id,
        )
        self.queue.put_nowait(sample)
        if not self._pending:
            self._finish()

    def fail(self, error: BaseException) -> None:
        if self.done:
            return
        self.queue.put_nowait(error)
        self._finish()

    def deliver_threadsafe(
        self, index: int, token_ids: list[int], logprobs: list[float], reason: FinishReason
    ) -> None:
        self._call_soon(self.deliver, index, token_ids, logprobs, reason)

    def fail_threadsafe(self, error: BaseException) -> None:
        self._call_soon(self.fail, error)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(fn, *args)

    def _finish(self) -> None:
        self.done = True
        self._on_done()


# A backend's `_submit` returns this: asks it to stop the generation early. The backend then
# delivers the unfinished samples with finish reason ABORT (tokens so far) and completes the sink.
CancelFn = Callable[[], None]
