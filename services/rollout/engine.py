"""The rollout engine interface: one prompt in, n finished samples out, each tagged with the policy
version that produced it.

Backends (hf_engine.py, vllm_engine.py) implement four hooks (`_start_impl`, `_submit`,
`_load_weights_impl`, `_close_impl`); everything that must behave the same in every backend lives
here: validation, the version gate, the in-flight count and shutdown (samples are assembled in
sink.py). What the sampling parameters mean, and which log-probabilities a sample carries, is
written once in contract/sampling.py.

Versions. A generation holds the read side of a `ReadWriteGate` (gate.py) from the moment it is
admitted until its last sample finished (not until the caller has read it); `load_weights` takes
the write side, so it waits for the running generations and keeps new ones out while it swaps.
No sample ever mixes two versions, and every sample reports the version it was produced with.
The gate prefers writers, so a steady stream of requests cannot starve weight updates.

Log-probabilities are those of the processed distribution (contract/sampling.py). vLLM 0.32
defaults to "raw_logprobs" (the unmodified model distribution), which the vLLM backend therefore
overrides; the hf backend computes the same quantity itself.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from puremesh.contract.sampling import (
    DEFAULT_MAX_N,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_STOP_LENGTH,
    DEFAULT_MAX_STOP_STRINGS,
    Sample,
    SamplingSpec,
    is_integer,
)

from .gate import ReadWriteGate
from .sink import CancelFn, SampleSink

logger = logging.getLogger(__name__)

DEFAULT_CLOSE_TIMEOUT_S = 30.0


class EngineNotReadyError(RuntimeError):
    """The engine is not started, is shutting down, is closed, or failed (UNAVAILABLE)."""


class Engine(abc.ABC):
    """A rollout engine: samples responses from one policy and swaps in new policy versions.

    Lifecycle: construct (cheap, no I/O) -> `await start()` (load and warm up) -> `generate` /
    `load_weights` from one event loop -> `await close()`. Version 0 is the weights loaded from
    `model_path`; `load_weights` installs later versions (strictly increasing within one learner
    run; a version of another run is taken whatever its number: a learner that started fresh).

    Args:
        model_path: LOCAL directory with the policy (config, safetensors weights, tokenizer).
        model_name: the name reported to clients; defaults to `model_path`.
        max_n, max_new_tokens, max_stop_strings, max_stop_length: request limits (see
            `SamplingSpec.validate`).
    """

    name: ClassVar[str]

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_name: str | None = None,
        max_n: int = DEFAULT_MAX_N,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS,
        max_stop_length: int = DEFAULT_MAX_STOP_LENGTH,
    ) -> None:
        self._model_path = str(model_path)
        self._model_name = model_name or self._model_path
        self._limits = {
            "max_n": max_n,
            "max_new_tokens": max_new_tokens,
            "max_stop_strings": max_stop_strings,
            "max_stop_length": max_stop_length,
        }
        self._gate = ReadWriteGate()
        self._state: Literal["new", "starting", "ready", "closing", "closed", "failed"] = "new"
        self._failure: BaseException | None = None
        self._policy_version = 0
        self._policy_run = ""  # the learner run of _policy_version; "" = the weights from disk
        self._in_flight = 0
        self._active: dict[int, tuple[SampleSink, CancelFn]] = {}
        self._next_generation = 0
        # Filled by `_start_impl`.
        self._tokenizer: Any = None
        self._eos_token_id: int | None = None
        self._vocab_size = 0
        self._max_model_len = 0
        self._weight_shapes: dict[str, tuple[int, ...]] = {}
        self._required_weights: frozenset[str] = frozenset()

    # ------------------------------------------------------------------ properties

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def model_path(self) -> str:
        return self._model_path

    @property
    def policy_version(self) -> int:
        """The version of the weights new generations run with (0 = the weights from disk)."""
        return self._policy_version

    @property
    def policy_run(self) -> str:
        """The learner run of `policy_version` ("" = the weights from disk)."""
        return self._policy_run

    @property
    def requests_in_flight(self) -> int:
        """Generations admitted and not finished yet, including those queued behind a swap."""
        return self._in_flight

    @property
    def ready(self) -> bool:
        """True when started, not closing and not failed (a weight swap in progress still counts
        as ready: generations just wait for it)."""
        return self._state == "ready"

    @property
    def swapping(self) -> bool:
        """True while a weight swap is waiting for generations or running."""
        return self._gate.writing or self._gate.writers_waiting > 0

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def vocab_size(self) -> int:
        """Valid token ids are [0, vocab_size)."""
        return self._vocab_size

    @property
    def max_model_len(self) -> int:
        """The context length: prompt tokens + max_new_tokens may not exceed it."""
        return self._max_model_len

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the model and tokenizer and warm up (including a request with logprobs, whose
        first run is slow in vLLM). Raises if called twice."""
        if self._state != "new":
            raise RuntimeError(f"start() called on an engine that is {self._state}")
        self._state = "starting"
        try:
            await self._start_impl()
        except BaseException as error:
            self._state = "failed"
            self._failure = error
            with contextlib.suppress(Exception):
                await self._close_impl()
            raise
        self._state = "ready"
        logger.info(
            "%s engine ready: model %s, vocab %d, context %d",
            self.name,
            self._model_name,
            self._vocab_size,
            self._max_model_len,
        )

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Stop accepting work, abort running generations (their unfinished samples are
        delivered with finish reason ABORT), wait up to `timeout` s for them, release the model.
        Idempotent."""
        if self._state in ("closing", "closed"):
            return
        was_started = self._state not in ("new",)
        self._state = "closing"
        for _, cancel in list(self._active.values()):
            cancel()
        try:
            await asyncio.wait_for(self._gate.acquire_write(), timeout)
        except TimeoutError:
            logger.warning(
                "%s engine: %d generations did not stop in %.0f s", self.name, self._gate.readers, timeout
            )
        else:
            self._gate.release_write()
        for sink, _ in list(self._active.values()):
            sink.fail(EngineNotReadyError("the engine was closed"))
        if was_started:
            await self._close_impl()
        self._state = "closed"

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` with the tokenizer's default special tokens."""
        self._require_tokenizer()
        return list(self._tokenizer(text)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens skipped."""
        self._require_tokenizer()
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ generation

    async def generate(self, prompt_ids: Sequence[int], spec: SamplingSpec) -> AsyncIterator[Sample]:
        """Sample `spec.n` responses to `prompt_ids`; yield each as soon as it finishes.

        The first iteration raises ValueError (bad spec or prompt) or EngineNotReadyError before
        any work starts; a later one raises RuntimeError if the backend failed. All samples come
        from one policy version. Closing the iterator early (break, aclose, cancellation) aborts
        the samples still running; the version gate is released as soon as the backend has
        finished or aborted every sample, whether or not the caller reads them.
        """
        self._require_ready()
        spec.validate(**self._limits)
        prompt = self._check_prompt(prompt_ids, spec)
        loop = asyncio.get_running_loop()
        key = self._next_generation
        self._next_generation += 1
        self._in_flight += 1
        try:
            await self._gate.acquire_read()
        except BaseException:
            self._in_flight -= 1
            raise

        def finished() -> None:
            self._gate.release_read()
            self._in_flight -= 1
            self._active.pop(key, None)

        sink = SampleSink(
            loop, spec.n, len(prompt), self._policy_version, self.decode, finished, self._policy_run
        )
        try:
            self._require_ready()
            cancel = self._submit(prompt, spec, sink)
        except BaseException:
            if not sink.done:  # nothing runs: release here, once
                sink.done = True
                finished()
            raise
        if not sink.done:
            self._active[key] = (sink, cancel)
        try:
            for _ in range(spec.n):
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not sink.done:
                cancel()

    # ------------------------------------------------------------------ weights

    async def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, run_id: str | None = None
    ) -> None:
        """Install a new policy version.

        `named_tensors` must hold every weight of the policy, under its checkpoint (Hugging Face)
        name, with its shape (`model.named_parameters()` of the transformers model is exactly
        that). A tied alias (e.g. lm_head.weight, as `state_dict()` lists it) is ignored: the
        tied weight comes from the name `named_parameters()` uses. The tensors are validated
        first (ValueError, nothing changed). Then the swap waits for the running generations
        and holds new ones back until the new weights are in place: generations admitted before
        the call report the old version, later ones the new. `version` must be greater than
        the current one, unless `run_id` names another run (None keeps the current run).
        """
        run = self._policy_run if run_id is None else run_id
        self._require_ready()
        self._check_version(version, run)
        tensors = self._check_weights(named_tensors)
        async with self._gate.write():
            self._require_ready()
            self._check_version(version, run)
            try:
                await self._load_weights_impl(tensors)
            except BaseException as error:
                # The model may hold a mix of old and new weights: refuse further work.
                self._mark_failed(error)
                raise
            self._policy_version, self._policy_run = int(version), run
        logger.info("%s engine: policy version %d of run %r loaded", self.name, version, run)

    # ------------------------------------------------------------------ backend hooks

    @abc.abstractmethod
    async def _start_impl(self) -> None:
        """Load and warm up; set _tokenizer, _eos_token_id, _vocab_size, _max_model_len,
        _weight_shapes (every accepted weight name -> shape) and _required_weights."""

    @abc.abstractmethod
    def _submit(self, prompt_ids: list[int], spec: SamplingSpec, sink: SampleSink) -> CancelFn:
        """Start generating (on the event loop; must not block). Deliver each finished sample
        into `sink` as soon as it finishes, or fail the sink; return a function that aborts the
        generation (unfinished samples are then delivered with finish reason ABORT)."""

    @abc.abstractmethod
    async def _load_weights_impl(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Copy the validated tensors into the model. No generation runs meanwhile."""

    @abc.abstractmethod
    async def _close_impl(self) -> None:
        """Release the model and any threads. May be called after a failed start."""

    # ------------------------------------------------------------------ helpers

    def _mark_failed(self, error: BaseException) -> None:
        """Called on the event loop when the backend can no longer serve: fail everything."""
        if self._state in ("closing", "closed"):
            return
        logger.error("%s engine failed: %r", self.name, error)
        self._state = "failed"
        self._failure = error
        for sink, _ in list(self._active.values()):
            sink.fail(EngineNotReadyError(f"the {self.name} engine failed: {error!r}"))

    def _require_ready(self) -> None:
        if self._state != "ready":
            detail = f": {self._failure!r}" if self._state == "failed" and self._failure else ""
            raise EngineNotReadyError(f"the {self.name} engine is {self._state}{detail}")

    def _require_tokenizer(self) -> None:
        if self._tokenizer is None:
            raise EngineNotReadyError(f"the {self.name} engine is not started")

    def _check_prompt(self, prompt_ids: Sequence[int], spec: SamplingSpec) -> list[int]:
        if isinstance(prompt_ids, str | bytes):
            raise ValueError("prompt_ids must be a sequence of token ids, not text")
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty")
        for token in prompt:
            if not is_integer(token) or not 0 <= token < self._vocab_size:
                raise ValueError(
                    f"prompt token id {token!r} is outside the vocabulary [0, {self._vocab_size})"
                )
        if len(prompt) + spec.max_new_tokens > self._max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({spec.max_new_tokens}) exceeds the "
                f"model context of {self._max_model_len} tokens"
            )
        return [int(t) for t in prompt]

    def _check_version(self, version: int, run: str) -> None:
        floor = self._policy_version if run == self._policy_run else 0
        if not is_integer(version) or version <= floor:
            raise ValueError(
                f"version must be an integer > {floor} (the current version {self._policy_version} of "
                f"run {self._policy_run!r}), got {version!r} of run {run!r}"
            )

    def _check_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> list[tuple[str, torch.Tensor]]:
        tensors: list[tuple[str, torch.Tensor]] = []
        seen: set[str] = set()
        for item in named_tensors:
            if not isinstance(item, tuple | list) or len(item) != 2:
                raise ValueError(f"expected (name, tensor) pairs, got {type(item).__name__}")
            name, tensor = item
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise ValueError(
                    f"expected (str, Tensor) pairs, got ({type(name).__name__}, {type(tensor).__name__})"
                )
            if name in seen:
                raise ValueError(f"weight {name!r} given twice")
            expected = self._weight_shapes.get(name)
            if expected is None:
                raise ValueError(f"unknown weight {name!r} (not a weight of {self._model_name})")
            if tuple(tensor.shape) != expected:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
            if not tensor.is_floating_point():
                raise ValueError(
                    f"weight {name!r} has dtype {tensor.dtype}; expected a floating-point tensor"
                )
            seen.add(name)
            if name in self._required_weights:  # a tied alias is ignored: its weight is shared
                tensors.append((name, tensor.detach()))
        missing = sorted(self._required_weights - seen)
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(f"a weight update must hold every weight; {len(missing)} missing: {shown}")
        return tensors
