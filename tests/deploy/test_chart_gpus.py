"""The chart and tensor parallelism: a vllm rollout replica on cuda spanning
settings.tensor_parallel_size GPUs reserves that many in its deployment (rayActorOptions.num_gpus)
and in its worker group's pods; a mismatch fails the render with one line naming the values."""

from __future__ import annotations

import yaml
from chartkit import EXAMPLES, helm, one, render, template_args

GPU_CLUSTER = (EXAMPLES / "gpu-cluster.yaml",)
TWO_GPUS = (
    "services.rollout.settings.tensor_parallel_size=2",
    "services.rollout.rayActorOptions.num_gpus=2",
)
POD_GPUS = ("limits", "requests")


def pod_gpus(count: int) -> tuple[str, ...]:
    prefix = "services.rollout.workerGroup.resources"
    return tuple(f"{prefix}.{kind}.nvidia\\.com/gpu={count}" for kind in POD_GPUS)


def rollout_deployment(docs) -> dict:
    config = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    (app,) = [app for app in config["applications"] if app["name"] == "rollout"]
    return app


def test_a_replica_spanning_two_gpus_reserves_them() -> None:
    docs = render(GPU_CLUSTER, TWO_GPUS + pod_gpus(2))
    app = rollout_deployment(docs)
    assert app["args"]["settings"]["tensor_parallel_size"] == 2
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 2
    assert rollout_deployment(render(GPU_CLUSTER))["args"]["settings"]["tensor_parallel_size"] == 1


def test_too_few_gpus_fail_the_render() -> None:
    few_reserved = helm(*template_args(GPU_CLUSTER, TWO_GPUS[:1]), check=False)
    assert few_reserved.returncode != 0
    assert "tensor_parallel_size is 2, but rayActorOptions.num_gpus reserves 1 GPU(s)" in few_reserved.stderr
    few_in_pod = helm(*template_args(GPU_CLUSTER, TWO_GPUS), check=False)
    assert few_in_pod.returncode != 0
    assert "workerGroup.resources.limits nvidia.com/gpu is 1; raise it to 2" in few_in_pod.stderr
