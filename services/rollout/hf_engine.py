"""The "hf" rollout engine: transformers `generate` in a worker thread (the CPU default).

One worker thread owns the model; generations run one at a time (the n samples of a request are
one batch of n rows), weight loads run on the same thread between them. While a batch runs, a
stopping criterion notices each row that finishes and delivers it at once, so samples stream in
completion order here too.

Sampling is done by our own logits processor, last in the chain, with transformers itself in
greedy mode: temperature (`TemperatureLogitsWarper`) and top-p (`TopPLogitsWarper`) are applied,
the token is drawn with a `torch.Generator` per row (seed + row), and the log-probability of the
drawn token under that processed distribution is recorded (see contract/sampling.py, "Log-probabilities").
This is why there is no `output_scores` / `compute_transition_scores`: the processor already
holds the processed distribution, and per-request generators need no global RNG state, so
concurrent requests cannot disturb each other's seeds. The checkpoint's own generation config
(sampling defaults such as top_k) is ignored, as the vLLM backend does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from puremesh.contract.sampling import MAX_SEED, FinishReason, SamplingSpec

from .engine import Engine
from .sink import CancelFn, SampleSink

logger = logging.getLogger(__name__)

# (row, token_ids, logprobs, finish_reason), called on the worker thread.
OnFinish = Callable[[int, list[int], list[float], FinishReason], None]

STOP_WINDOW_MARGIN = 8


class _Sampler(LogitsProcessor):
    """Chooses each row's next token and records its log-probability (the last processor)."""

    def __init__(self, spec: SamplingSpec, seed: int, device: torch.device) -> None:
        self.greedy = spec.greedy
        self.warpers: list[LogitsProcessor] = []
        self.generators: list[torch.Generator] = []
        if not self.greedy:
            self.warpers.append(TemperatureLogitsWarper(spec.sampling_temperature))
            if spec.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=float(spec.top_p)))
            self.generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(spec.n)]
        self.logprobs: list[torch.Tensor] = []  # one [n] tensor per generated position

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        if self.greedy:
            chosen = scores.argmax(dim=-1)  # the same argmax transformers takes next
            self.logprobs.append(torch.log_softmax(scores, dim=-1).gather(1, chosen[:, None])[:, 0])
            return scores
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        logprobs = torch.log_softmax(scores, dim=-1)
        probs = logprobs.exp()
        chosen = torch.stack(
            [torch.multinomial(probs[row], 1, generator=g)[0] for row, g in enumerate(self.generators)]
        )
        self.logprobs.append(logprobs.gather(1, chosen[:, None])[:, 0])
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, chosen[:, None], 0.0)
        return forced


def _common_prefix_length(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


class _FinishTracker(StoppingCriteria):
    """Decides per row when it is finished (eos, stop string, length, abort) and reports it."""

    def __init__(
        self,
        prompt_len: int,
        spec: SamplingSpec,
        eos_token_id: int | None,
        decode: Callable[[list[int]], str],
        sampler: _Sampler,
        on_finish: OnFinish,
        cancelled: threading.Event,
    ) -> None:
        self.prompt_len = prompt_len
        self.max_new_tokens = spec.max_new_tokens
        self.stop = list(spec.stop)
        self.eos = eos_token_id
        self.decode = decode
        self.sampler = sampler
        self.on_finish = on_finish
        self.cancelled = cancelled
        self.done = [False] * spec.n
        # Tokens decoded to look for a stop string: enough for the longest one (a token is at
        # least one character, except for bytes of a split multi-byte character).
        self.window = max((len(s) for s in self.stop), default=0) + STOP_WINDOW_MARGIN
        self.generated: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_len :]
        self.generated = generated
        count = generated.shape[1]
        cancelled = self.cancelled.is_set()
        last = generated[:, -1].tolist()
        for row in range(len(self.done)):
            if self.done[row]:
                continue
            reason: FinishReason | None = None
            if (self.eos is not None and last[row] == self.eos) or (
                self.stop and self._hit_stop(generated[row, -self.window :].tolist())
            ):
                reason = FinishReason.STOP
            elif count >= self.max_new_tokens:
                reason = FinishReason.LENGTH
            elif cancelled:
                reason = FinishReason.ABORT
            if reason is not None:
                self._finish(row, generated[row].tolist(), reason)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def finish_remaining(self, reason: FinishReason) -> None:
        """Report the rows still open (after an abort), with the tokens they have."""
        for row in range(len(self.done)):
            if not self.done[row]:
                tokens = self.generated[row].tolist() if self.generated is not None else []
                self._finish(row, tokens, reason)

    def _hit_stop(self, window: list[int]) -> bool:
        # vLLM's rule: a stop string that ends within the text added by the newest token.
        text, before = self.decode(window), self.decode(window[:-1])
        start = _common_prefix_length(before, text)
        return any(text.find(s, max(0, start - len(s) + 1)) != -1 for s in self.stop)

    def _finish(self, row: int, tokens: list[int], reason: FinishReason) -> None:
        self.done[row] = True
        steps = self.sampler.logprobs[: len(tokens)]
        logprobs = torch.stack(steps, dim=1)[row].tolist() if steps else []
        self.on_finish(row, tokens, logprobs, reason)


class HfEngine(Engine):
    """Rollouts with transformers on one device.

    Args:
        model_path: LOCAL directory of a causal LM with its tokenizer (loaded with
            local_files_only: nothing is downloaded).
        device: torch device ("cpu", "cuda", "cuda:1", ...).
        dtype: model dtype name ("float32", "bfloat16", ...) or "auto" (the checkpoint's).
        max_model_len: context length; defaults to the model's max_position_embeddings.
        **limits: request limits, see `Engine`.
    """

    name = "hf"

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        max_model_len: int | None = None,
        **limits: Any,
    ) -> None:
        super().__init__(model_path, **limits)
        self._device = torch.device(device)
        self._dtype = dtype
        self._max_model_len_override = max_model_len
        self._executor: ThreadPoolExecutor | None = None
        self._model: Any = None
        self._stop_tokenizer: Any = None  # used on the worker thread only
        self._pad_token_id: int | None = None

    # ------------------------------------------------------------------ hooks

    async def _start_impl(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await loop.run_in_executor(self._executor, self._load)
        loaded = time.perf_counter()
        await loop.run_in_executor(self._executor, self._warm_up)
        logger.info(
            "hf engine: loaded in %.1f s, warmed up in %.1f s", loaded - started, time.perf_counter() - loaded
        )

    def _submit(self, prompt_ids: list[int], spec: SamplingSpec, sink: SampleSink) -> CancelFn:
        assert self._executor is not None
        cancelled = threading.Event()
        seed = spec.seed if spec.seed is not None else secrets.randbelow(MAX_SEED - spec.n + 2)
        deliver: OnFinish = sink.deliver_threadsafe
        if spec.greedy and spec.n > 1:  # greedy samples are identical: run one row, deliver n copies
            copies, spec = spec.n, dataclasses.replace(spec, n=1)

            def deliver(row: int, tokens: list[int], logprobs: list[float], reason: FinishReason) -> None:
                for index in range(copies):
                    sink.deliver_threadsafe(index, tokens, logprobs, reason)

        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._generate, prompt_ids, spec, seed, deliver, cancelled
        )

        def settle(done: asyncio.Future) -> None:
            error = done.exception() if not done.cancelled() else None
            if error is not None:
                sink.fail(RuntimeError(f"hf generation failed: {error!r}"))

        future.add_done_callback(settle)
        return cancelled.set

    async def _load_weights_impl(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        assert self._executor is not None
        await asyncio.get_running_loop().run_in_executor(self._executor, self._copy_weights, tensors)

    async def _close_impl(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)
        self._model = None
        gc.collect()

    # ------------------------------------------------------------------ worker thread

    def _load(self) -> None:
        path = self._model_path
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._stop_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            dtype=self._dtype if self._dtype == "auto" else getattr(torch, self._dtype),
        )
        model.to(self._device).eval()
        eos = tokenizer.eos_token_id
        if eos is None:
            config_eos = model.config.eos_token_id
            eos = config_eos[0] if isinstance(config_eos, list) else config_eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        # Ignore the checkpoint's sampling defaults: every parameter comes from the request.
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
        context = self._max_model_len_override or getattr(model.config, "max_position_embeddings", None)
        if not context:
            raise ValueError(f"{path}: no max_position_embeddings in the config; pass max_model_len")

        self._model = model
        self._tokenizer = tokenizer
        self._eos_token_id = eos
        self._pad_token_id = pad
        self._vocab_size = model.get_input_embeddings().num_embeddings
        self._max_model_len = int(context)
        self._weight_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        # named_parameters() lists a tied (shared) weight once: that name is required, aliases optional.
        self._required_weights = frozenset(name for name, _ in model.named_parameters())

    def _warm_up(self) -> None:
        prompt = self._stop_tokenizer("Warm up.")["input_ids"] or [0]
        ignore: OnFinish = lambda *_: None  # noqa: E731
        never = threading.Event()
        self._generate(prompt, SamplingSpec(n=1, temperature=0.0, max_new_tokens=2), 0, ignore, never)
        self._generate(prompt, SamplingSpec(n=2, top_p=0.9, max_new_tokens=2, stop=["."]), 0, ignore, never)

    def _generate(
        self,
        prompt_ids: list[int],
        spec: SamplingSpec,
        seed: int,
        on_finish: OnFinish,
        cancelled: threading.Event,
    ) -> None:
        def decode(tokens: list[int]) -> str:
            return self._stop_tokenizer.decode(tokens, skip_special_tokens=True)

        sampler = _Sampler(spec, seed, self._device)
        tracker = _FinishTracker(
            len(prompt_ids), spec, self._eos_token_id, decode, sampler, on_finish, cancelled
        )
        if cancelled.is_set():
            tracker.finish_remaining(FinishReason.ABORT)
            return
        input_ids = torch.tensor([prompt_ids] * spec.n, dtype=torch.long, device=self._device)
        config = GenerationConfig(
            max_new_tokens=spec.max_new_tokens,
            do_sample=False,  # _Sampler draws the tokens
            num_beams=1,
            eos_token_id=self._eos_token_id,
            pad_token_id=self._pad_token_id,
            use_cache=True,
        )
        with torch.inference_mode():
            self._model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]),
                stopping_criteria=StoppingCriteriaList([tracker]),
            )
        tracker.finish_remaining(FinishReason.ABORT)  # only rows cut short by a cancel are left

    def _copy_weights(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        params = self._model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, tensor in tensors:
                params[name].copy_(tensor)
