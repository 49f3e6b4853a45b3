"""Every port the chart's monitors scrape is bound on an address the scrape reaches, never on a
loopback address (issue 12, point 2): the PodMonitor and the ServiceMonitor dial the pod's own
address, so a /metrics endpoint on 127.0.0.1 leaves its targets down and their alerts dark.

Each scraped port is traced to the process that binds it and to the settings that choose the
address (a port the test cannot trace fails it, so a new monitor needs a rule here):

- `metrics-<svc>` on the `<svc>` worker group's pods: the Serve application's settings,
  `server.metrics_bind_host` (rpc/settings.py);
- `metrics` on every Ray pod: Ray's own metrics agent, which listens on all interfaces; the test
  checks that rayStartParams do not pin the node to loopback;
- `metrics` on the learner Service: the learner's server (cli/learner.py `learner_server`).
"""

from __future__ import annotations

import ipaddress

import yaml
from chartkit import one

from puremesh.cli.learner import learner_server
from puremesh.services.prm.settings import PrmSettings
from puremesh.services.rollout.settings import RolloutSettings
from puremesh.services.verify.settings import VerifySettings
from puremesh.trainer.settings import LearnerSettings

MODELS = {"rollout": RolloutSettings, "prm": PrmSettings, "verify": VerifySettings}


def loopback(host: str) -> bool:
    if host.strip("[]") in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: resolved in the pod, not a loopback literal


def serve_apps(docs) -> dict[str, dict]:
    config = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    return {app["name"]: app for app in config["applications"]}


def ray_start_params(docs) -> list[dict]:
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["rayStartParams"]] + [
        g["rayStartParams"] for g in cluster["workerGroupSpecs"]
    ]


def bind_address(docs, port_name: str, monitor: str) -> str:
    """The address the process behind `port_name` (scraped by `monitor`) binds to."""
    if monitor == "ServiceMonitor" and port_name == "metrics":
        config = yaml.safe_load(one(docs, "ConfigMap", docs_config_name(docs))["data"]["learner.yaml"])
        return learner_server(LearnerSettings.model_validate(config["learner"])).metrics_bind_host
    if monitor == "PodMonitor" and port_name.startswith("metrics-"):
        name = port_name.removeprefix("metrics-")
        settings = MODELS[name].model_validate(serve_apps(docs)[name]["args"]["settings"])
        return settings.server.metrics_bind_host
    if monitor == "PodMonitor" and port_name == "metrics":
        nodes = {params.get("node-ip-address", "") for params in ray_start_params(docs)}
        return "127.0.0.1" if any(loopback(node) for node in nodes if node) else "0.0.0.0"
    raise AssertionError(f"no rule says what binds the {monitor} port {port_name!r}: add one")


def docs_config_name(docs) -> str:
    (config,) = [
        d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap" and "learner.yaml" in d["data"]
    ]
    return config


def scraped_ports(docs) -> list[tuple[str, str]]:
    ports = []
    for doc in docs:
        if doc["kind"] == "PodMonitor":
            ports += [("PodMonitor", e["port"]) for e in doc["spec"]["podMetricsEndpoints"]]
        elif doc["kind"] == "ServiceMonitor":
            ports += [("ServiceMonitor", e["port"]) for e in doc["spec"]["endpoints"]]
    return ports


def test_no_scraped_port_binds_loopback(case, docs):
    ports = scraped_ports(docs)
    if case == "monitoring-off":
        assert ports == []
        return
    assert {("PodMonitor", f"metrics-{name}") for name in MODELS} <= set(ports)
    bound = {port: bind_address(docs, port[1], port[0]) for port in ports}
    assert not [port for port, host in bound.items() if loopback(host)], bound


def test_the_rule_catches_a_loopback_setting():
    """The check is not vacuous: the services' own default binds /metrics to loopback."""
    assert loopback(PrmSettings().server.metrics_bind_host)
    assert not loopback(
        PrmSettings.model_validate({"server": {"metrics_host": "0.0.0.0"}}).server.metrics_bind_host
    )
    assert loopback("::1") and loopback("localhost") and not loopback("learner.puremesh.svc")
