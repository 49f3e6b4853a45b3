"""Ray Serve applications without a Ray cluster: the args and deployment settings, the
applications build_app returns, and the deployment classes called directly, with the real
servicers (and, for rollout, a real learner WeightService) underneath. Also `puremesh probe`
against standalone servers. The same classes behind a real Ray Serve gRPC proxy:
tests/integration/test_ray.py."""

from __future__ import annotations

import asyncio
import importlib

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from puremesh.cli.main import main
from puremesh.prm.v1 import prm_pb2
from puremesh.rollout.v1 import rollout_pb2
from puremesh.rpc import metrics
from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import ServerSettings, SettingsError
from puremesh.services.prm.ray_app import PrmDeployment
from puremesh.services.ray_serve import (
    APPS,
    GRPC_SERVICER_FUNCTIONS,
    CallAborted,
    RayDeploymentSettings,
    parse_args,
)
from puremesh.services.rollout.ray_app import SPEC as ROLLOUT_SPEC
from puremesh.services.rollout.ray_app import RolloutDeployment
from puremesh.services.verify.app import verify_service
from puremesh.services.verify.ray_app import SPEC as VERIFY_SPEC
from puremesh.services.verify.ray_app import VerifyDeployment
from puremesh.services.verify.settings import VerifySettings
from puremesh.verify.v1 import verify_pb2
from puremesh.weightsync.servicer import WeightServicer, weight_service
from puremesh.weightsync.store import WeightStore

NO_METRICS = {"server": {"metrics_port": None}}


class FakeGrpcContext:
    """What Ray Serve passes as `grpc_context` (RayServegRPCContext), as far as we use it."""

    def __init__(self) -> None:
        self.code, self.details = None, ""

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def invocation_metadata(self):
        return [("application", "verify")]


def test_fixed_names_resolve():
    for name, app in APPS.items():
        assert app.name == name and app.route_prefix == f"/{name}"
        module, _, attribute = app.import_path.partition(":")
        assert module == f"puremesh.services.{name}.ray_app" and attribute == "build_app"
        ray_app = importlib.import_module(module)
        assert callable(ray_app.build_app)
        assert getattr(ray_app, app.deployment).spec.app is app
        assert app.resource == f"puremesh_{name}"  # the chart's worker group of the app advertises it
    for path in GRPC_SERVICER_FUNCTIONS:
        module, _, function = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), function))
    assert [a.deployment for a in APPS.values()] == ["RolloutDeployment", "PrmDeployment", "VerifyDeployment"]


def test_deployment_settings_defaults_limits_and_serve_options():
    default = RayDeploymentSettings()
    assert (default.min_replicas, default.max_replicas, default.num_cpus, default.num_gpus) == (
        1,
        1,
        1.0,
        0.0,
    )
    with pytest.raises(ValueError, match="min_replicas"):
        RayDeploymentSettings(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="initial_replicas"):
        RayDeploymentSettings(min_replicas=1, max_replicas=2, initial_replicas=5)
    with pytest.raises(ValueError, match="extra"):
        RayDeploymentSettings.model_validate({"replicas": 2})
    options = RayDeploymentSettings(
        min_replicas=1,
        max_replicas=4,
        target_ongoing_requests=8,
        num_cpus=2,
        num_gpus=0.5,
        env_vars={"A": "1"},
    ).serve_options()
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["autoscaling_config"]["target_ongoing_requests"] == 8
    assert options["ray_actor_options"] == {
        "num_cpus": 2,
        "num_gpus": 0.5,
        "runtime_env": {"env_vars": {"A": "1"}},
    }
    # unset: no custom resources, no per-node cap (`puremesh up --ray` runs everything on one node)
    assert default.max_replicas_per_node is None and default.resources == {}
    assert "max_replicas_per_node" not in options and "resources" not in options["ray_actor_options"]
    placed = RayDeploymentSettings(max_replicas_per_node=1, resources={"puremesh_prm": 1}).serve_options()
    assert placed["max_replicas_per_node"] == 1
    assert placed["ray_actor_options"]["resources"] == {"puremesh_prm": 1}
    with pytest.raises(ValueError, match="max_replicas_per_node"):
        RayDeploymentSettings(max_replicas_per_node=0)
    with pytest.raises(ValueError, match="num_gpus"):
        RayDeploymentSettings(resources={"GPU": 1})
    with pytest.raises(ValueError, match="negative"):
        RayDeploymentSettings(resources={"puremesh_prm": -1})


def test_args_are_checked_and_the_environment_overrides_settings(monkeypatch):
    settings, deployment = parse_args(
        VERIFY_SPEC, {"settings": {"workers": 2}, "deployment": {"num_cpus": 0}}
    )
    assert settings == {"workers": 2} and deployment.num_cpus == 0
    assert deployment.max_ongoing_requests == 32  # the verify default
    _, placed = parse_args(
        VERIFY_SPEC, {"deployment": {"max_replicas_per_node": 1, "resources": {"puremesh_verify": 0.5}}}
    )
    assert placed.max_replicas_per_node == 1 and placed.resources == {"puremesh_verify": 0.5}
    with pytest.raises(SettingsError, match="deployment setting max_replicas_per_node"):
        parse_args(VERIFY_SPEC, {"deployment": {"max_replicas_per_node": 0}})
    with pytest.raises(SettingsError, match="deployment setting resources"):
        parse_args(VERIFY_SPEC, {"deployment": {"resources": {"puremesh_verify": "lots"}}})
    with pytest.raises(SettingsError, match="setting"):
        parse_args(VERIFY_SPEC, {"settings": {"workers": 0}})
    with pytest.raises(SettingsError, match="wokers"):
        parse_args(VERIFY_SPEC, {"settings": {"wokers": 2}})
    with pytest.raises(SettingsError, match="deployment setting max_replicas"):
        parse_args(VERIFY_SPEC, {"deployment": {"max_replicas": 0}})
    with pytest.raises(SettingsError, match="replicas"):
        parse_args(VERIFY_SPEC, {"replicas": 2})
    monkeypatch.setenv("PUREMESH_VERIFY__WORKERS", "3")
    assert VERIFY_SPEC.load({"workers": 2}).workers == 3  # as for `puremesh serve`


def test_build_app_binds_the_deployment_class_with_its_options():
    from puremesh.services.rollout.ray_app import build_app

    app = build_app(
        {
            "settings": {"engine": "hf", "model_path": "/models/policy", "weights_target": "learner:50060"},
            "deployment": {
                "min_replicas": 2,
                "max_replicas": 6,
                "num_gpus": 1,
                "max_replicas_per_node": 1,
                "resources": {APPS["rollout"].resource: 1},
            },
        }
    )
    deployment = app._bound_deployment
    assert deployment.name == "RolloutDeployment" and deployment.func_or_class is RolloutDeployment
    assert deployment.init_args == (
        {"engine": "hf", "model_path": "/models/policy", "weights_target": "learner:50060"},
    )
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (2, 6, 16)
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert deployment.ray_actor_options["resources"] == {"puremesh_rollout": 1}
    assert deployment._replica_config.max_replicas_per_node == 1
    assert deployment.max_ongoing_requests == 64


async def test_verify_replica_runs_the_servicer_behind_the_hosts_accounting():
    replica = await VerifyDeployment.create({"workers": 1, "max_items": 4, **NO_METRICS})
    try:
        replica.check_health()
        request = verify_pb2.VerifyRequest(
            items=[
                verify_pb2.VerifyItem(response="so \\boxed{7}", ground_truth="7"),
                verify_pb2.VerifyItem(response="so \\boxed{8}", ground_truth="7"),
            ]
        )
        ok = metrics.RPC_REQUESTS.labels("verify", "Verify", "OK")
        before = ok._value.get()
        reply = await replica.Verify(request, grpc_context=FakeGrpcContext())
        assert [r.verdict for r in reply.results] == [
            verify_pb2.VERDICT_CORRECT,
            verify_pb2.VERDICT_INCORRECT,
        ]
        assert ok._value.get() == before + 1
        # a domain error leaves with its status code, set on Ray Serve's context for the proxy
        context = FakeGrpcContext()
        too_many = verify_pb2.VerifyRequest(items=[verify_pb2.VerifyItem(response="1")] * 5)
        with pytest.raises(CallAborted) as info:
            await replica.Verify(too_many, grpc_context=context)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "limit is 4" in context.details
        assert metrics.RPC_ERRORS.labels("verify", "Verify", "INVALID_ARGUMENT")._value.get() >= 1
    finally:
        await replica.shutdown()
    with pytest.raises(RuntimeError, match="not serving"):
        replica.check_health()
    assert replica.__del__() is None  # already shut down: nothing left for Ray to await


async def test_prm_replica_scores_steps(tiny_prm_dir):
    replica = await PrmDeployment.create({"model_path": str(tiny_prm_dir), **NO_METRICS})
    try:
        item = prm_pb2.ScoreItem(prompt_text="What is 3+4?", response_text="3 + 4 = 7\n\nSo \\boxed{7}")
        reply = await replica.ScoreSteps(prm_pb2.ScoreStepsRequest(items=[item]))
        [result] = reply.results
        assert len(result.steps) == 2 and all(-1 <= s.score <= 1 for s in result.steps)
        empty = await replica.ScoreSteps(prm_pb2.ScoreStepsRequest())  # what the probe sends
        assert list(empty.results) == []
    finally:
        await replica.shutdown()


async def test_rollout_replica_pulls_the_learners_weights_before_it_is_ready(tiny_policy_dir):
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_policy_dir), local_files_only=True, dtype=torch.float32
    )
    generator = torch.Generator().manual_seed(3)
    weights = [
        (n, p.detach() + 0.05 * torch.randn(p.shape, generator=generator))
        for n, p in model.named_parameters()
    ]
    publisher = WeightStore(retain=2, chunk_bytes=64 << 10)
    learner = ServiceHost(
        [weight_service(WeightServicer(publisher))], ServerSettings(port=0, metrics_port=None)
    )
    await learner.start()
    publisher.publish(3, weights)
    settings = {"model_path": str(tiny_policy_dir), "weights_target": learner.target, **NO_METRICS}
    replica = await RolloutDeployment.create(settings)
    try:
        status = await replica.GetStatus(rollout_pb2.GetStatusRequest())
        assert status.ready and status.policy_version == 3  # pulled before the constructor returned
        assert status.replica_id.startswith("rollout-")
        assert publisher.replicas[status.replica_id].version == 3
        request = rollout_pb2.GenerateRequest(
            prompt_text="What is 3 + 4?",
            sampling=rollout_pb2.SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=1),
            min_policy_version=3,
        )
        samples = [m async for m in replica.Generate(request, grpc_context=FakeGrpcContext())]
        assert sorted(s.sample_index for s in samples) == [0, 1]
        assert {s.policy_version for s in samples} == {3}
        stale = rollout_pb2.GenerateRequest(prompt_text="1", min_policy_version=9)
        stale.sampling.max_new_tokens = 2
        with pytest.raises(CallAborted) as info:
            [m async for m in replica.Generate(stale)]
        assert info.value.code == grpc.StatusCode.ABORTED
    finally:
        await replica.shutdown()
        publisher.close()
        await learner.drain(grace=1)
    assert ROLLOUT_SPEC.prepare is not None


def run_cli(*args: str) -> int:
    return main(list(args))


async def test_probe_standalone_server(capsys):
    settings = VerifySettings(workers=1)
    host = ServiceHost([verify_service(settings)], ServerSettings(port=0, metrics_port=None))
    await host.start(wait_ready=False)  # health NOT_SERVING until loaded
    try:
        code = await asyncio.to_thread(
            run_cli, "probe", "--target", host.target, "--service", "verify", "--timeout", "1"
        )
        assert code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("puremesh probe: error: verify at") and "NOT_SERVING" in err and "\n" not in err
        await host.load()
        code = await asyncio.to_thread(run_cli, "probe", "--target", host.target, "--service", "verify")
        assert code == 0
        assert capsys.readouterr().out.strip() == f"verify at {host.target}: SERVING"
        # the light real call the Ray proxy routes works on a standalone server too
        code = await asyncio.to_thread(
            run_cli, "probe", "--target", host.target, "--service", "verify", "--application", "verify"
        )
        assert code == 0
        assert "application verify" in capsys.readouterr().out
    finally:
        await host.drain(grace=0)
    code = await asyncio.to_thread(
        run_cli, "probe", "--target", host.target, "--service", "verify", "--timeout", "0.5"
    )
    assert code == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
