"""The Helm chart (deploy/helm/puremesh), rendered offline for its default values and each example.

Every manifest is validated against a schema (stock kinds with kubernetes-validate, KubeRay's and
prometheus-operator's kinds against the vendored CRDs, with unknown fields rejected as the API
server would silently prune them), and the settings the chart renders are fed to the services'
own settings models, the learner's command line to the real `puremesh` parser.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chartkit import (
    CASES,
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    REPO,
    SCHEMAS,
    find,
    helm,
    one,
    render,
    template_args,
)
from torch.distributed.run import get_args_parser

from puremesh.services.prm.settings import PrmSettings
from puremesh.services.rollout.settings import RolloutSettings
from puremesh.services.verify.settings import VerifySettings
from puremesh.trainer.settings import LearnerSettings

FULLNAME = f"{RELEASE}-puremesh"
SERVE_SVC = f"{FULLNAME}-serve-svc"  # KubeRay names a RayService's Serve Service <name>-serve-svc
APPS = {
    "rollout": ("RolloutDeployment", RolloutSettings),
    "prm": ("PrmDeployment", PrmSettings),
    "verify": ("VerifyDeployment", VerifySettings),
}
CUSTOM_GROUPS = ("ray.io", "monitoring.coreos.com")
# cert-manager's kinds have no vendored CRD: test_chart_security.py checks their fields instead
CERT_MANAGER = "cert-manager.io"
CRD_FILES = {
    ("ray.io/v1", "RayService"): SCHEMAS / "kuberay" / "ray.io_rayservices.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS
    / "prometheus-operator"
    / "crd-servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): SCHEMAS / "prometheus-operator" / "crd-podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): SCHEMAS
    / "prometheus-operator"
    / "crd-prometheusrules.yaml",
}
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def serve_config(docs) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def pod_specs(docs) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod the chart makes, directly or through KubeRay."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Job":
            yield name, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            yield name, doc["spec"]
        elif doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            yield f"{name} head", cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster["workerGroupSpecs"]:
                yield f"{name} {group['groupName']}", group["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def worker_groups(docs) -> dict[str, dict[str, Any]]:
    """The RayService's worker groups by groupName."""
    groups = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return {g["groupName"]: g for g in groups}


def ray_pods(docs) -> dict[str, dict[str, Any]]:
    """The Ray pod templates by the `ray.io/group` label KubeRay gives their pods (`headgroup` for
    the head, the groupName for a worker group)."""
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    return {
        "headgroup": cluster["headGroupSpec"]["template"],
        **{name: g["template"] for name, g in worker_groups(docs).items()},
    }


def container_ports(template: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}


# --- helm lint and template -------------------------------------------------------------------


def test_lint_strict(case):
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    for path in CASES[case]:
        args += ["--values", str(path)]
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_renders_the_expected_objects(case, docs):
    kinds = sorted(d["kind"] for d in docs)
    expected = [
        "ConfigMap",  # settings
        "Job",
        "NetworkPolicy",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Pod",  # helm test, one per application
        "Pod",
        "Pod",
        "RayService",
        "Secret",  # the servers' tokens (test_chart_security.py)
        "Service",  # the learner's; KubeRay makes <name>-serve-svc
        "ServiceAccount",
        "Certificate",  # the learner's TLS, and the chart's own CA
        "Certificate",
        "Issuer",
        "Issuer",
    ]
    if case != "cpu-only":  # the head's autoscaler reaches the API server
        expected += ["NetworkPolicy"]
    if case != "monitoring-off":
        expected += ["ConfigMap", "PodMonitor", "PrometheusRule", "ServiceMonitor"]
    if case == "multi-node-learner":
        expected += ["NetworkPolicy", "Service"]  # the learner ranks' (test_chart_learner.py)
    assert kinds == sorted(expected)
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert len(doc["metadata"]["name"]) <= 63


# --- schema validation ------------------------------------------------------------------------


def test_stock_kinds_pass_kubernetes_schemas(docs):
    stock = [d for d in docs if d["apiVersion"].split("/")[0] not in (*CUSTOM_GROUPS, CERT_MANAGER)]
    assert stock
    for doc in stock:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {error.message}")


def _closed(schema: Any) -> Any:
    """A CRD schema in which objects with declared properties accept no others: the API server
    would prune an unknown (misspelt) field silently, so here it is an error."""
    if isinstance(schema, dict):
        out = {key: _closed(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    return schema


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD_FILES[(api_version, kind)].read_text())
    assert crd["spec"]["names"]["kind"] == kind
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _closed(served["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def test_custom_resources_pass_their_crd_schemas(case, docs):
    custom = [d for d in docs if d["apiVersion"].split("/")[0] in CUSTOM_GROUPS]
    assert {d["kind"] for d in custom} == (
        {"RayService"} if case == "monitoring-off" else {"RayService"} | MONITORING_KINDS
    )
    for doc in custom:
        errors = sorted(crd_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc), key=str)
        assert not errors, "\n".join(
            f"{doc['kind']}: {'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors[:10]
        )


def test_crd_validation_catches_a_misspelt_field():
    rayservice = json.loads(json.dumps(one(render(), "RayService")))
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert list(crd_validator("ray.io/v1", "RayService").iter_errors(rayservice))


# --- values.schema.json -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("services.rollout.settings.engine=tgi", "services.rollout.settings.engine"),
        ("services.verify.settings.workers=0", "services.verify.settings.workers"),
        ("services.prm.settings.max_batch_tokenz=1", "max_batch_tokenz"),
        ("learner.settings.sampling.samples_per_prompt=1", "learner.settings.sampling.samples_per_prompt"),
        ("learner.settings.algo.credit=sum-of-logs", "learner.settings.algo.credit"),
        ("ray.grpcPort=70000", "ray.grpcPort"),
        ("image.flavor=rocm", "image.flavor"),
        ("monitoring.prometheusRule.rules.jumpWindow=soon", "monitoring.prometheusRule.rules.jumpWindow"),
        ("services.rollout.autoscaling.max_replica=3", "max_replica"),
        ("learnr.enabled=false", "learnr"),
        ("services.prm.maxReplicasPerNode=0", "services.prm.maxReplicasPerNode"),
        (
            "services.verify.workerGroup.rayStartParams.resources=x",
            "services.verify.workerGroup.rayStartParams",
        ),
        ("services.rollout.workerGroup.maxReplica=3", "maxReplica"),
        ("ray.workerGroups=[]", "workerGroups"),  # the groups are per service now
    ],
)
def test_values_schema_rejects_a_bad_value(setting, message):
    result = helm(*template_args(sets=(setting,)), check=False)
    assert result.returncode != 0, f"--set {setting} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_values_schema_settings_follow_the_settings_models():
    spec = importlib.util.spec_from_file_location("sync_schema", REPO / "deploy" / "helm" / "sync_schema.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    current = (CHART / "values.schema.json").read_text()
    assert current == sync.render(sync.synced(json.loads(current))), (
        "values.schema.json is out of date with the settings models: run `make chart-schema`"
    )


# --- the RayService and its Serve config ------------------------------------------------------


def test_serve_config_has_one_application_per_service(case, docs):
    config = serve_config(docs)
    apps = {app["name"]: app for app in config["applications"]}
    assert set(apps) == set(APPS)
    for name, (deployment, _) in APPS.items():
        app = apps[name]
        assert app["import_path"] == f"puremesh.services.{name}.ray_app:build_app"
        assert app["route_prefix"] == f"/{name}"
        assert set(app["args"]) == {"settings"}
        (spec,) = app["deployments"]
        assert spec["name"] == deployment
        autoscaling = spec["autoscaling_config"]
        assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]
        assert 0 < autoscaling["target_ongoing_requests"] <= spec["max_ongoing_requests"]
        assert "num_replicas" not in spec  # Serve refuses it beside autoscaling_config
        assert set(spec["ray_actor_options"]) >= {"num_cpus", "num_gpus"}
        # placement: only on the app's own worker group, one replica of the app per pod
        assert spec["ray_actor_options"]["resources"] == {f"puremesh_{name}": 1}
        assert spec["max_replicas_per_node"] == 1
    gpus = {name: apps[name]["deployments"][0]["ray_actor_options"]["num_gpus"] for name in APPS}
    group_gpus = {
        name: "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        for name, g in worker_groups(docs).items()
    }
    if case in ("gpu-cluster", "multi-node-learner"):
        assert gpus["rollout"] >= 1 and gpus["prm"] >= 1 and gpus["verify"] == 0
        assert group_gpus == {"rollout": True, "prm": True, "verify": False}
    else:
        assert set(gpus.values()) == {0}
        assert not any(group_gpus.values())


def test_serve_grpc_ingress_registers_the_generated_servicers(docs):
    grpc_options = serve_config(docs)["grpc_options"]
    assert grpc_options["port"] == 9000
    assert len(grpc_options["grpc_servicer_functions"]) == 3
    for path in grpc_options["grpc_servicer_functions"]:
        module, _, function = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), function)), path
        assert function.startswith("add_") and function.endswith("Servicer_to_server")


def test_serve_service_exposes_the_grpc_port(docs):
    spec = one(docs, "RayService")["spec"]
    ports = {p["name"]: p for p in spec["serveService"]["spec"]["ports"]}
    assert ports["serve-grpc"]["port"] == 9000
    # KubeRay puts the head container's ports named `serve` and `serve-*` on <name>-serve-svc.
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert head_ports["serve-grpc"] == 9000 and head_ports["serve"] == ports["serve"]["port"]
    assert one(docs, "RayService")["metadata"]["name"] + "-serve-svc" == SERVE_SVC


def test_rendered_settings_are_accepted_by_the_services(case, docs):
    config_map = one(docs, "ConfigMap", f"{FULLNAME}-config")
    for app in serve_config(docs)["applications"]:
        _, model = APPS[app["name"]]
        settings = app["args"]["settings"]
        model.model_validate(settings)
        assert yaml.safe_load(config_map["data"][f"{app['name']}.yaml"]) == settings
    learner = yaml.safe_load(config_map["data"]["learner.yaml"])
    assert set(learner) == {"learner"}
    LearnerSettings.model_validate(learner["learner"])


def test_rollout_replicas_pull_weights_from_the_learner(docs):
    (rollout,) = [a for a in serve_config(docs)["applications"] if a["name"] == "rollout"]
    service = one(docs, "Service", f"{FULLNAME}-learner")
    (weights,) = [p for p in service["spec"]["ports"] if p["name"] == "weights"]
    # replicas dial the announced bulk port on the Service name: the two numbers must agree
    (bulk,) = [p for p in service["spec"]["ports"] if p["name"] == "weights-bulk"]
    assert rollout["args"]["settings"]["weights_target"] == (
        f"{FULLNAME}-learner.{NAMESPACE}.svc:{weights['port']}"
    )
    learner = yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["learner.yaml"])["learner"]
    where = {"host": "0.0.0.0", "port": weights["port"], "bulk_port": bulk["port"]}
    assert {k: v for k, v in learner["weights"].items() if k in where} == where
    pod = one(docs, "Job")["spec"]["template"]
    # (an indexed Job's pods also carry their index, which the Service selects: test_chart_learner.py)
    selector = {
        k: v for k, v in service["spec"]["selector"].items() if not k.startswith("batch.kubernetes.io/")
    }
    assert all(pod["metadata"]["labels"][k] == v for k, v in selector.items())
    learner_ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    learner_ports.pop("rendezvous", None)  # a multi-pod learner's (test_chart_learner.py)
    assert learner_ports == {
        "weights": weights["port"],
        "weights-bulk": bulk["port"],
        "metrics": learner["metrics_port"],
    }


def test_metrics_ports_match_the_settings(docs):
    apps = {a["name"]: a for a in serve_config(docs)["applications"]}
    pods = ray_pods(docs)
    for group, template in pods.items():
        ports = container_ports(template)
        assert ports["metrics"] == 8080  # Ray's own, on every Ray pod
        # a worker group's pods declare their own service's metrics port only; the head none
        services = {name for name in ports if name.startswith("metrics-")}
        assert services == (set() if group == "headgroup" else {f"metrics-{group}"}), group
    for name, app in apps.items():
        assert (
            container_ports(pods[name])[f"metrics-{name}"]
            == app["args"]["settings"]["server"]["metrics_port"]
        )


def test_one_worker_group_per_service_advertising_its_resource(case, docs):
    """Each service has its own worker group, whose pods advertise the custom resource its
    replicas request, read the way KubeRay's autoscaler reads it: only that group's pods (never
    the head) fit a replica, and the group can grow to the application's max_replicas."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from puremesh.services.ray_serve import APPS as RAY_APPS

    rayservice = one(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = worker_groups(docs)
    assert list(groups) == list(APPS)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # proxy and controller only
    for name, group in groups.items():
        param = group["rayStartParams"]["resources"]
        expected = {f"puremesh_{name}": 100}
        # KubeRay's getResourcesMap (pod.go; it adds GPUs and accelerators to the same JSON) trims
        # quotes and spaces, then parses JSON
        assert json.loads(param.strip("'\"` ")) == expected
        # KubeRay runs `ray start ... --resources=<param> ...` through bash
        (flag,) = shlex.split(f"--resources={param}")
        assert json.loads(flag.removeprefix("--resources=")) == expected
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
    ray_cr = {"metadata": {"name": FULLNAME, "namespace": NAMESPACE}, "spec": cluster}
    node_types = _derive_autoscaling_config_from_ray_cr(ray_cr)["available_node_types"]
    assert set(node_types) == {"headgroup", *APPS}
    assert node_types["headgroup"]["resources"]["CPU"] == 0
    apps = {a["name"]: a["deployments"][0] for a in serve_config(docs)["applications"]}
    for name, deployment in apps.items():
        actor = deployment["ray_actor_options"]
        demand = {"CPU": actor["num_cpus"], "GPU": actor["num_gpus"], **actor["resources"]}
        demand = {k: v for k, v in demand.items() if v}
        fits = {
            node: spec["resources"]
            for node, spec in node_types.items()
            if all(spec["resources"].get(k, 0) >= v for k, v in demand.items())
        }
        assert list(fits) == [name], f"a {name} replica ({demand}) fits on {list(fits)}"
        assert RAY_APPS[name].resource in fits[name]
        scaling = deployment["autoscaling_config"]
        group = groups[name]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert node_types[name]["max_workers"] == group["maxReplicas"]
        pods = group["maxReplicas"] if cluster["enableInTreeAutoscaling"] else group["replicas"]
        assert pods * deployment["max_replicas_per_node"] >= scaling["max_replicas"], name


@pytest.mark.parametrize(
    ("values", "sets", "message"),
    [
        (
            (),
            ("services.rollout.autoscaling.max_replicas=8",),
            "services.rollout: autoscaling.max_replicas is 8, but its worker group holds at most "
            "workerGroup.maxReplicas (4) x maxReplicasPerNode (1) = 4 replica(s); raise "
            "services.rollout.workerGroup.maxReplicas to at least 8",
        ),
        (
            ("gpu-cluster",),
            ("services.prm.workerGroup.maxReplicas=1", "services.prm.workerGroup.replicas=1"),
            "raise services.prm.workerGroup.maxReplicas to at least 2",
        ),
        (
            ("cpu-only",),
            ("services.verify.autoscaling.max_replicas=3",),
            "without the autoscaler (ray.autoscaler.enabled: false) its worker group runs "
            "workerGroup.replicas (1) pods",
        ),
        (
            (),
            ("services.verify.workerGroup.minReplicas=5",),
            "services.verify.workerGroup: minReplicas (5) exceeds maxReplicas (4)",
        ),
    ],
    ids=["max-replicas", "gpu-prm", "no-autoscaler", "min-above-max"],
)
def test_a_worker_group_too_small_for_its_application_fails_the_render(values, sets, message):
    files = tuple(path for case in values for path in CASES[case])
    result = helm(*template_args(files, sets), check=False)
    assert result.returncode != 0, f"--set {sets} was accepted"
    assert message in result.stderr, result.stderr
    # raising both together is the documented way to scale
    scaled = ("services.rollout.autoscaling.max_replicas=8", "services.rollout.workerGroup.maxReplicas=8")
    assert worker_groups(render((), scaled))["rollout"]["maxReplicas"] == 8


# --- the learner ------------------------------------------------------------------------------


@functools.cache
def cli_parser():
    from puremesh.cli.main import build_parser

    return build_parser()


def test_learner_job_runs_puremesh_train_with_the_rendered_config(docs):
    job = one(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    (learner,) = pod["containers"]
    argv = learner["args"]
    if learner.get("command") == ["torchrun"]:  # several ranks (test_chart_learner.py)
        # the kubelet expands $(JOB_COMPLETION_INDEX) from the pod's env: pod 0 here
        run = get_args_parser().parse_args([a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in argv])
        assert run.module and run.training_script == "puremesh.cli.main"
        argv = run.training_script_args
    args = cli_parser().parse_args(argv)
    assert args.command == "train" and args.resume
    mounts = {m["name"]: m for m in learner["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert args.config == f"{mounts['config']['mountPath']}/learner.yaml"
    assert volumes["config"]["configMap"]["name"] == f"{FULLNAME}-config"
    claim = one(docs, "PersistentVolumeClaim")
    assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    settings = yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["learner.yaml"])["learner"]
    assert Path(settings["out_dir"]).is_relative_to(mounts["workspace"]["mountPath"])
    target = f"{SERVE_SVC}.{NAMESPACE}.svc:9000"
    assert settings["endpoints"] == {
        "rollout": [target],
        "prm": [target],
        "verify": [target],
        "applications": {"rollout": "rollout", "prm": "prm", "verify": "verify"},
        # each service's token, which the Ray Serve proxy passes on (test_chart_security.py)
        "security": {
            s: {"token_file": f"/etc/puremesh/tokens/{s}.token"} for s in ("rollout", "prm", "verify")
        },
    }
    assert job["spec"]["template"]["metadata"]["labels"]["puremesh.io/rpc-client"] == "true"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_learner_job_is_replaced_when_its_pod_changes():
    def job_name(*sets: str) -> str:
        return one(render((), sets), "Job")["metadata"]["name"]

    assert job_name() == job_name()
    assert job_name("learner.settings.steps=7") != job_name()
    assert job_name("image.tag=other") != job_name()
    assert job_name("monitoring.podMonitor.enabled=false") == job_name()


def test_credentials_come_from_the_existing_secret():
    """Only the learner gets credentials, and only those listed: nothing downloads at run time,
    so no pod gets HF_TOKEN."""
    for where, spec in pod_specs(render()):
        assert all("HF_TOKEN" not in {e["name"] for e in c.get("env", [])} for c in containers(spec)), where
    sets = ("credentials.existingSecret=creds", "credentials.env.WANDB_API_KEY=wandb-api-key")
    docs = render((), (*sets, "storage.models.existingClaim=models"))
    for where, spec in pod_specs(docs):
        if "test" in where:
            continue
        main = spec["containers"][0]
        keys = [e for e in main["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]]
        if where.startswith("Job/"):
            (key,) = keys
            assert key["name"] == "WANDB_API_KEY"
            assert key["valueFrom"]["secretKeyRef"] == {
                "name": "creds",
                "key": "wandb-api-key",
                "optional": True,
            }
        else:
            assert keys == [], where
        mounts = {m["name"]: m for m in main["volumeMounts"]}
        assert mounts["models"]["readOnly"] and mounts["models"]["mountPath"] == "/models"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "models"
    secrets = [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]
    assert secrets == [f"{FULLNAME}-tokens"], "the only Secret the chart makes holds the servers' tokens"


# --- helm test --------------------------------------------------------------------------------


def test_helm_test_probes_each_application_through_the_serve_service(docs):
    pods = [d for d in docs if d["kind"] == "Pod"]
    assert len(pods) == 3
    probed = set()
    for pod in pods:
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert pod["metadata"]["labels"]["puremesh.io/rpc-client"] == "true"
        (container,) = pod["spec"]["containers"]
        args = container["args"]
        assert args[0] == "probe"
        assert args[args.index("--target") + 1] == f"{SERVE_SVC}.{NAMESPACE}.svc:9000"
        service = args[args.index("--service") + 1]
        assert args[args.index("--application") + 1] == service
        token = args[args.index("--token-file") + 1]  # the deployment refuses calls without it
        assert token == f"/etc/puremesh/tokens/{service}.token"
        (tokens,) = [v for v in pod["spec"]["volumes"] if v["name"] == "tokens"]
        assert tokens["secret"]["items"] == [{"key": service, "path": f"{service}.token"}]
        probed.add(service)
        assert cli_parser().parse_args(args).command == "probe"
    assert probed == set(APPS)


# --- security ---------------------------------------------------------------------------------


def test_every_pod_and_container_is_locked_down(docs):
    specs = list(pod_specs(docs))
    assert len(specs) >= 6
    for where, spec in specs:
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert security["runAsUser"] != 0, where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in containers(spec):
            context = container["securityContext"]
            name = f"{where} {container['name']}"
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert context["readOnlyRootFilesystem"] is True, name
            # a read-only root needs somewhere to write: Ray's session dir, caches, HOME
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, name
    autoscaler = one(docs, "RayService")["spec"]["rayClusterConfig"].get("autoscalerOptions")
    if autoscaler:
        assert autoscaler["securityContext"]["readOnlyRootFilesystem"] is True
        assert autoscaler["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_only_the_head_mounts_a_service_account_token(case, docs):
    for where, spec in pod_specs(docs):
        mounted = spec["automountServiceAccountToken"]
        # KubeRay's in-tree autoscaler runs beside the head and talks to the Kubernetes API
        assert mounted == (where.endswith(" head") and case != "cpu-only"), where


def test_network_policies_admit_only_the_intended_callers(docs):
    selector = {"app.kubernetes.io/name": "puremesh", "app.kubernetes.io/instance": RELEASE}
    monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    ray = one(docs, "NetworkPolicy", f"{FULLNAME}-ray")["spec"]
    assert ray["podSelector"]["matchLabels"] == {**selector, "app.kubernetes.io/component": "ray"}
    assert ray["policyTypes"] == ["Ingress", "Egress"]  # egress: test_chart_security.py
    rules = ray["ingress"]
    # all ports among the Ray pods themselves (Ray's own traffic) and nothing else unrestricted
    unrestricted = [r for r in rules if "ports" not in r]
    assert unrestricted == [
        {"from": [{"podSelector": {"matchLabels": {**selector, "app.kubernetes.io/component": "ray"}}}]}
    ]
    grpc = [r for r in rules if {"port": 9000, "protocol": "TCP"} in r.get("ports", [])]
    assert grpc == [
        {
            "from": [{"podSelector": {"matchLabels": {**selector, "puremesh.io/rpc-client": "true"}}}],
            "ports": [{"port": 9000, "protocol": "TCP"}],
        }
    ]
    clients = [
        f"{d['kind']}/{d['metadata']['name']}"
        for d in docs
        if d["kind"] in ("Job", "Pod")
        and (d["spec"].get("template", d)["metadata"]["labels"].get("puremesh.io/rpc-client") == "true")
    ]
    assert len(clients) == 4  # the learner and the three helm test pods
    # the metrics ports by name: each Ray pod admits scrapes on the metrics ports it declares
    (metrics,) = [r for r in rules if r["from"] == [{"namespaceSelector": monitoring}]]
    metric_ports = {
        name
        for template in ray_pods(docs).values()
        for name in container_ports(template)
        if "metrics" in name
    }
    assert metric_ports == {"metrics", "metrics-rollout", "metrics-prm", "metrics-verify"}
    assert {p["port"] for p in metrics["ports"]} == metric_ports
    learner = one(docs, "NetworkPolicy", f"{FULLNAME}-learner")["spec"]
    # the WeightService only from the rollout group's pods (KubeRay's ray.io/group label)
    rollout_pods = {**selector, "app.kubernetes.io/component": "ray", "ray.io/group": "rollout"}
    assert learner["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": rollout_pods}}],
            "ports": [{"port": 50060, "protocol": "TCP"}, {"port": 50061, "protocol": "TCP"}],
        },
        {"from": [{"namespaceSelector": monitoring}], "ports": [{"port": 9100, "protocol": "TCP"}]},
    ]


def test_monitoring_namespace_is_configurable():
    docs = render((), ("networkPolicy.monitoringNamespaceSelector.matchLabels.team=observability",))
    for policy in find(docs, "NetworkPolicy"):
        if "ingress" not in policy["spec"]:
            continue  # the head's egress to the API server
        selectors = [
            f["namespaceSelector"]
            for r in policy["spec"]["ingress"]
            for f in r["from"]
            if "podSelector" not in f
        ]
        assert {"kubernetes.io/metadata.name": "monitoring", "team": "observability"} in [
            s["matchLabels"] for s in selectors
        ]
    assert not find(render((), ("networkPolicy.enabled=false",)), "NetworkPolicy")


# --- monitoring objects -----------------------------------------------------------------------


def test_dashboard_ships_as_a_grafana_sidecar_config_map(case, docs):
    if case == "monitoring-off":
        assert not find(docs, "ConfigMap", f"{FULLNAME}-dashboard")
        return
    config_map = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (data,) = config_map["data"].values()
    dashboard = json.loads(data)
    assert dashboard == json.loads((CHART / "dashboards" / "puremesh.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert panels and all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)


def test_monitoring_objects_select_the_chart_pods(case, docs):
    if case == "monitoring-off":
        assert not [d for d in docs if d["kind"] in MONITORING_KINDS]
        return
    service_monitor = one(docs, "ServiceMonitor")["spec"]
    service = one(docs, "Service", f"{FULLNAME}-learner")
    assert service_monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in service_monitor["endpoints"]] == ["metrics"]
    # the metrics' own `service` label (the gRPC service) must win over the target label
    assert service_monitor["endpoints"][0]["honorLabels"] is True
    pod_monitor = one(docs, "PodMonitor")["spec"]
    for template in ray_pods(docs).values():
        assert pod_monitor["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    if case == "gpu-cluster":
        for kind in MONITORING_KINDS:
            assert one(docs, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def scrape_targets(endpoint: dict[str, Any], group: str, template: dict[str, Any]) -> bool:
    """Whether a PodMonitor endpoint makes a target of a Ray pod, as prometheus-operator's scrape
    config does: the pod declares the endpoint's port name, and every `keep` relabeling matches."""
    if endpoint["port"] not in container_ports(template):
        return False
    meta = {"__meta_kubernetes_pod_label_ray_io_group": group}  # KubeRay's label ray.io/group
    for rule in endpoint.get("relabelings", []):
        assert rule["action"] == "keep" and rule["sourceLabels"][0] in meta, rule
        if meta[rule["sourceLabels"][0]] != rule["regex"]:
            return False
    return True


def test_pod_monitor_scrapes_each_application_on_its_own_group_only(case, docs):
    if case == "monitoring-off":
        return
    endpoints = one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} == {"metrics", "metrics-rollout", "metrics-prm", "metrics-verify"}
    assert all(e["honorLabels"] for e in endpoints)
    for group, template in ray_pods(docs).items():
        targets = {e["port"] for e in endpoints if scrape_targets(e, group, template)}
        # Ray's metrics everywhere, the application's where its replicas run: no target without one
        assert targets == ({"metrics"} if group == "headgroup" else {"metrics", f"metrics-{group}"}), group
    for endpoint in endpoints:
        if endpoint["port"] != "metrics":  # selected by group, not only by the port's name
            (keep,) = endpoint["relabelings"]
            assert (keep["action"], keep["regex"]) == ("keep", endpoint["port"].removeprefix("metrics-"))
            assert keep["sourceLabels"] == ["__meta_kubernetes_pod_label_ray_io_group"]


def test_dashboard_shows_every_learner_metric():
    """Each reward-hacking sign of pure-algorithm.md section 7 that the learner exports has a panel."""
    from puremesh.trainer import metrics

    dashboard = json.loads((CHART / "dashboards" / "puremesh.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    learner = [gauge._name for gauge in metrics.STAT_GAUGES.values()]
    learner += [metrics.STEP._name, metrics.PHASE_SECONDS._name, metrics.REPLICA_LAG._name]
    missing = [name for name in learner if name not in exprs]
    assert not missing, f"learner metrics without a panel: {missing}"


# --- against Ray Serve and the Ray apps -------------------------------------------------------


def test_serve_config_passes_ray_serves_own_schema(case, docs):
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(serve_config(docs))
    assert config.grpc_options.port == 9000
    assert [a.name for a in config.applications] == [a["name"] for a in serve_config(docs)["applications"]]


def test_values_schema_allows_only_ray_serve_options():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import RayActorOptionsSchema

    definitions = json.loads((CHART / "values.schema.json").read_text())["definitions"]
    assert set(definitions["serveAutoscaling"]["properties"]) <= set(AutoscalingConfig.model_fields)
    assert set(definitions["rayActorOptions"]["properties"]) <= set(RayActorOptionsSchema.model_fields)


def test_serve_config_matches_the_ray_apps(docs):
    from puremesh.services.ray_serve import APPS as RAY_APPS
    from puremesh.services.ray_serve import GRPC_SERVICER_FUNCTIONS, parse_args

    config = serve_config(docs)
    assert sorted(config["grpc_options"]["grpc_servicer_functions"]) == sorted(GRPC_SERVICER_FUNCTIONS)
    for app in config["applications"]:
        expected = RAY_APPS[app["name"]]
        assert app["import_path"] == expected.import_path
        assert app["route_prefix"] == expected.route_prefix
        assert app["deployments"][0]["name"] == expected.deployment
        assert set(app["deployments"][0]["ray_actor_options"]["resources"]) == {expected.resource}
        module_name, _, builder = app["import_path"].partition(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, builder))
        settings, _ = parse_args(module.SPEC, app["args"])  # what build_app checks at deploy time
        assert settings == app["args"]["settings"]
