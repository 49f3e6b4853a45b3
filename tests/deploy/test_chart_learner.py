"""The chart's learner layouts: one pod (the default), one pod with several GPUs, and N pods x G
GPUs as an indexed Job running torchrun with a static rendezvous at pod 0 through a headless
Service. The torchrun command line is parsed by torch.distributed.run's own parser and the
command it runs by `puremesh`'s; the settings by LearnerSettings."""

from __future__ import annotations

import pytest
import yaml
from chartkit import CASES, RELEASE, find, helm, one, render, template_args
from torch.distributed.run import get_args_parser

from puremesh.cli.main import build_parser
from puremesh.trainer.settings import LearnerSettings

FULLNAME = f"{RELEASE}-puremesh"
RANKS = f"{FULLNAME}-learner-ranks"
INDEX = "batch.kubernetes.io/job-completion-index"
MULTI = CASES["multi-node-learner"]


def learner_container(docs) -> dict:
    (container,) = one(docs, "Job")["spec"]["template"]["spec"]["containers"]
    return container


def torchrun(container: dict, index: int = 0):
    """(torchrun's arguments, puremesh's arguments) of the learner container, as pod `index`
    runs them (the kubelet expands $(JOB_COMPLETION_INDEX) from the container's env)."""
    assert container["command"] == ["torchrun"]
    argv = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in container["args"]]
    run = get_args_parser().parse_args(argv)
    assert run.module and run.training_script == "puremesh.cli.main"
    return run, build_parser().parse_args(run.training_script_args)


def test_the_default_learner_is_one_pod_running_one_rank():
    docs = render()
    job = one(docs, "Job")
    assert "completionMode" not in job["spec"] and "command" not in learner_container(docs)
    assert build_parser().parse_args(learner_container(docs)["args"]).command == "train"
    assert not find(docs, "Service", RANKS) and not find(docs, "NetworkPolicy", RANKS)
    assert INDEX not in one(docs, "Service", f"{FULLNAME}-learner")["spec"]["selector"]
    assert "subdomain" not in job["spec"]["template"]["spec"]


def test_one_pod_with_several_gpus_runs_a_standalone_torchrun():
    docs = render((), ("learner.gpusPerNode=4", "learner.settings.device=cuda"))
    job = one(docs, "Job")
    assert "completionMode" not in job["spec"]
    run, args = torchrun(learner_container(docs))
    assert run.standalone and run.nnodes == "1" and run.nproc_per_node == "4" and run.max_restarts == 0
    assert args.command == "train" and args.resume
    resources = learner_container(docs)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "4" == resources["requests"]["nvidia.com/gpu"]
    assert not find(docs, "Service", RANKS)


def test_n_pods_by_g_gpus_rendezvous_at_pod_zero():
    docs = render(MULTI)
    job = one(docs, "Job")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == RANKS and pod["restartPolicy"] == "Never"
    container = learner_container(docs)
    (index,) = [e for e in container["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{INDEX}']"
    for rank in (0, 1):
        run, args = torchrun(container, rank)
        assert (run.nnodes, run.nproc_per_node, run.node_rank) == ("2", "8", rank)
        # pod 0 of an indexed Job is <job>-0.<subdomain>: torchrun's node rank 0, global rank 0
        assert run.master_addr == f"{job['metadata']['name']}-0.{RANKS}"
        assert run.master_port == 29500 and not run.standalone
        assert args.command == "train" and args.resume
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["rendezvous"] == 29500
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    headless = one(docs, "Service", RANKS)["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert headless["selector"]["app.kubernetes.io/component"] == "learner"
    # the WeightService, bulk port and metrics are rank 0's: the learner Service selects pod 0
    assert one(docs, "Service", f"{FULLNAME}-learner")["spec"]["selector"][INDEX] == "0"
    settings = yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["learner.yaml"])
    learner = LearnerSettings.model_validate(settings["learner"])
    assert learner.device == "cuda" and learner.memory.activation_checkpointing


def test_the_ranks_reach_each_other_on_the_rendezvous_and_collective_ports_only():
    docs = render(MULTI)
    policy = one(docs, "NetworkPolicy", RANKS)["spec"]
    learner_pods = {
        "app.kubernetes.io/name": "puremesh",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "learner",
    }
    assert policy["podSelector"]["matchLabels"] == learner_pods
    assert policy["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": learner_pods}}],
            "ports": [
                {"port": 29500, "protocol": "TCP"},
                {"port": 32768, "endPort": 60999, "protocol": "TCP"},
            ],
        }
    ]
    assert not find(render(MULTI, ("networkPolicy.enabled=false",)), "NetworkPolicy")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("learner.nodes=2",), "storage.workspace.accessModes needs ReadWriteMany"),
        (("learner.gpusPerNode=1",), "learner.gpusPerNode > 0 needs learner.settings.device: cuda"),
        (("learner.nodes=0",), "nodes"),
        (("learner.gpusPerNode=-1",), "gpusPerNode"),
        (("learner.rendezvousPort=70000",), "rendezvousPort"),
    ],
)
def test_impossible_layouts_fail_the_render(sets, message):
    args = template_args((), sets)
    result = helm(*args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_an_existing_claim_is_trusted_to_be_shared():
    docs = render((), ("learner.nodes=3", "storage.workspace.existingClaim=shared"))
    assert one(docs, "Job")["spec"]["completions"] == 3


def test_the_job_is_replaced_when_the_layout_changes():
    def name(*sets: str) -> str:
        return one(render(MULTI, sets), "Job")["metadata"]["name"]

    assert name() == name()
    assert name("learner.nodes=4") != name()
    assert name("learner.gpusPerNode=4") != name()
