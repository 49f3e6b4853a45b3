"""The rollout engine interface: one prompt in, n finished samples out, each tagged with the policy
version that produced it.

Backends (hf_engine.py, vllm_engine.py) implement four hooks (`_start_impl`, `_submit`,
`_load_weights_impl`, `_close_impl`); everything that must behave the same in every backend lives
here: validation, the version gate, the in-flight count, sample assembly and shutdown.

Versions. A generation holds the read side of a `ReadWriteGate` from the moment it is admitted
until its last sample finished (not until the caller has read it); `load_weights` takes the
write side, so it waits for the running generations and keeps new ones out while it swaps. No
sample ever mixes two versions, and every sample reports the version it was produced with. The
gate prefers writers: once a swap is waiting, newly arriving generations queue behind it, so a
steady stream of requests cannot starve weight updates.

Log-probabilities. `FinishedSample.logprobs[i]` is the natural-log probability of `token_ids[i]`
under the distribution the token was drawn from: the model's logits divided by the temperature,
then restricted to the top-p nucleus and renormalised (tokens outside the nucleus have
probability 0). For greedy decoding (temperature 0) it is the model's plain log_softmax. This is
vLLM's `logprobs_mode="processed_logprobs"` (vLLM 0.32 defaults to "raw_logprobs", the
unmodified model distribution, which the vLLM backend therefore overrides); the hf backend
computes the same quantity itself. It is what the proto promises (GenerateResponse.logprobs).

Sampling semantics shared by both backends (they follow vLLM where the two libraries differ):
- temperature < GREEDY_TEMPERATURE is greedy; a positive temperature below
  MIN_SAMPLING_TEMPERATURE is raised to it (vLLM does so to avoid inf/nan).
- with a seed, sample i draws from a generator seeded with seed + i (reproducible per engine,
  version and hardware; the two backends do not draw the same samples from the same seed).
- stop strings: a sample stops at the token whose decoded text completes a stop string; that
  token is kept (token_ids and text include the stop string; text is decode(token_ids) and may
  run a few characters past the stop string when the stop string ends inside a token).
- end of sequence is the tokenizer's eos token; it is kept in token_ids (and skipped in text).
  Precedence when several apply at one token: eos, then a stop string ("stop"), then the length
  limit ("length").
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import numbers
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort"]

# Default request limits; a service passes its own from its settings.
DEFAULT_MAX_N = 64
DEFAULT_MAX_NEW_TOKENS = 4096
DEFAULT_MAX_STOP_STRINGS = 8
DEFAULT_MAX_STOP_LENGTH = 128
DEFAULT_CLOSE_TIMEOUT_S = 30.0

# Sampling conventions (vLLM's, vllm/sampling_params.py: _SAMPLING_EPS and _MAX_TEMP).
GREEDY_TEMPERATURE = 1e-5
MIN_SAMPLING_TEMPERATURE = 1e-2
MAX_SEED = 2**63 - 1


class EngineNotReadyError(RuntimeError):
    """The engine is not started, is shutting down, is closed, or failed (UNAVAILABLE)."""


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample the responses to one prompt. `validate` checks the ranges."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(
        self,
        *,
        max_n: int = DEFAULT_MAX_N,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS,
        max_stop_length: int = DEFAULT_MAX_STOP_LENGTH,
    ) -> None:
        """Raise ValueError, naming the field, the allowed range and the value, if out of range."""
        if not _is_int(self.n) or not 1 <= self.n <= max_n:
            raise ValueError(f"n must be an integer in [1, {max_n}], got {self.n!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= max_new_tokens:
            raise ValueError(
                f"max_new_tokens must be an integer in [1, {max_new_tokens}], got {self.max_new_tokens!r}"
            )
        if self.seed is not None and (
            not _is_int(self.seed) or self.seed < 0 or self.seed + self.n - 1 > MAX_SEED
        ):
            raise ValueError(f"seed must be None or an integer in [0, 2**63 - n], got {self.seed!r}")
        if isinstance(self.stop, str | bytes) or not isinstance(self.stop, Sequence):
            raise ValueError(f"stop must be a list of strings, got {type(self.stop).__name__}")
        if len(self.stop) > max_stop_strings:
            raise ValueError(f"at most {max_stop_strings} stop strings are allowed, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 1 <= len(s) <= max_stop_length:
                raise ValueError(
                    f"each stop string must be a non-empty str of at most {max_stop_length} chars, got {s!r}"
                )

    @property
    def greedy(self) -> bool:
        """True when the temperature means greedy decoding (argmax; top_p and seed are ignored)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def sampling_temperature(self) -> float:
        """The temperature actually applied when sampling (see the module docstring)."""
        return max(float(self.temperature), MIN_SAMPLING_TEMPERATURE)


@dataclass(frozen=True)
class FinishedSample:
    """One finished response. `logprobs` has one entry per token of `token_ids`."""

    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str
    policy_version: int
    prompt_token_count: int


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class ReadWriteGate:
    """An asyncio read-write gate that prefers writers.

    Any number of readers (generations) hold it together; a writer (a weight swap) holds it
    alone. A writer that is waiting keeps new readers out, so it gets in as soon as the readers
    already inside have left. Releases are synchronous, so they are safe in callbacks and
    `finally` blocks. Use from one event loop only.
    """

    def __init__(self) -> None:
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def readers(self) -> int:
        return self._readers

    @property
    def writing(self) -> bool:
        return self._writing

    @property
    def writers_waiting(self) -> int:
        return self._writers_waiting

    async def acquire_read(self) -> None:
        while self._writing or self._writers_waiting:
            await self._wait()
        self._readers += 1

    def release_read(self) -> None:
        if self._readers <= 0:
            raise RuntimeError("release_read without a matching acquire_read")
        self._readers -= 1
        if self._readers == 0:
            self._wake()

    async def acquire_write(self) -> None:
        self._writers_waiting += 1
        try:
            while self._writing or self._readers:
                await self._wait()
        except BaseException:
            self._writers_waiting -= 1
            self._wake()  # readers held back by this writer may go on
            raise
        self._writers_waiting -= 1
        self._writing = True

    def release_write(self) -> None:
        if not self._writing:
            raise RuntimeError("release_write without a matching acquire_write")
        self._writing = False
        self._wake()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        await self.acquire_write()
        try:
            yield
        finally:
            self.release_write()

    async def _wait(self) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        finally:
            if future in self._waiters:
                self._waiters.remove(future)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)


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
    ) -> None:
        self._loop = loop
        self._pending = set(range(n))
        self._decode = decode
        self._on_done = on_done
        self.prompt_token_count = prompt_token_count
        self.policy_version = policy_version
        self.queue: asyncio.Queue[FinishedSample | BaseException] = asyncio.Queue()
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
        sample = FinishedSample(
            sample_index=index,
            token_ids=[int(t) for t in token_ids],
            logprobs=[float(x) for x in logprobs],
            finish_reason=reason,
            text=self._decode(token_ids),
            policy_version=self.policy_version,
            prompt_token_count=self.prompt_token_count,
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
# delivers the unfinished samples with finish_reason "abort" (tokens so far) and completes the sink.
CancelFn = Callable[[], None]


class Engine(abc.ABC):
    """A rollout engine: samples responses from one policy and swaps in new policy versions.

    Lifecycle: construct (cheap, no I/O) -> `await start()` (load and warm up) -> `generate` /
    `load_weights` from one event loop -> `await close()`. Version 0 is the weights loaded from
    `model_path`; `load_weights` installs later versions (strictly increasing).

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
        delivered with finish_reason "abort"), wait up to `timeout` s for them, release the model.
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

    async def generate(self, prompt_ids: Sequence[int], spec: SamplingSpec) -> AsyncIterator[FinishedSample]:
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

        sink = SampleSink(loop, spec.n, len(prompt), self._policy_version, self.decode, finished)
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

    async def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Install a new policy version.

        `named_tensors` must hold every weight of the policy, under its checkpoint (Hugging Face)
        name, with its shape (`model.named_parameters()` of the transformers model is exactly
        that). A tied alias (e.g. lm_head.weight when tied to the input embedding, as listed by
        `state_dict()`) may be given and is ignored: the tied weight comes from the name
        `named_parameters()` uses. The tensors are
        validated first (ValueError, nothing changed). Then the swap waits for the running
        generations to finish and holds new ones back until the new weights are in place:
        generations admitted before the call report the old version, those after it the new one.
        `version` must be greater than the current version.
        """
        self._require_ready()
        self._check_version(version)
        tensors = self._check_weights(named_tensors)
        async with self._gate.write():
            self._require_ready()
            self._check_version(version)
            try:
                await self._load_weights_impl(tensors)
            except BaseException as error:
                # The model may hold a mix of old and new weights: refuse further work.
                self._mark_failed(error)
                raise
            self._policy_version = int(version)
        logger.info("%s engine: policy version %d loaded", self.name, version)

    # ------------------------------------------------------------------ backend hooks

    @abc.abstractmethod
    async def _start_impl(self) -> None:
        """Load and warm up; set _tokenizer, _eos_token_id, _vocab_size, _max_model_len,
        _weight_shapes (every accepted weight name -> shape) and _required_weights."""

    @abc.abstractmethod
    def _submit(self, prompt_ids: list[int], spec: SamplingSpec, sink: SampleSink) -> CancelFn:
        """Start generating (on the event loop; must not block). Deliver each finished sample
        into `sink` as soon as it finishes, or fail the sink; return a function that aborts the
        generation (unfinished samples are then delivered with finish_reason "abort")."""

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
            if not _is_int(token) or not 0 <= token < self._vocab_size:
                raise ValueError(
                    f"prompt token id {token!r} is outside the vocabulary [0, {self._vocab_size})"
                )
        if len(prompt) + spec.max_new_tokens > self._max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({spec.max_new_tokens}) exceeds the "
                f"model context of {self._max_model_len} tokens"
            )
        return [int(t) for t in prompt]

    def _check_version(self, version: int) -> None:
        if not _is_int(version) or version <= self._policy_version:
            raise ValueError(
                f"version must be an integer > the current version {self._policy_version}, got {version!r}"
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
