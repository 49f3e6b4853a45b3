"""The chart's alerts and dashboard against what the code really exports.

One short training run on the local mesh (tiny models: rollout, PRM and verify as processes, the
learner in this process) is watched by a real Prometheus (Debian's binary from `make tools`)
scraping every /metrics endpoint each second, with the chart's rendered alerting rules loaded.
As in the cluster, the endpoints bind all addresses (the chart's server.metrics_host 0.0.0.0,
the learner's weights.host) and Prometheus scrapes them through a non-loopback address of this
machine, so an endpoint left on loopback shows up as a down target with no data (on a machine
without such an address it scrapes 127.0.0.1, and the address test says so).
At the last step, while everything still serves:

- every metric name in the alerts and the dashboard is one that some endpoint exports;
- every dashboard query returns data from that Prometheus;
- every alerting rule evaluates without error.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from chartkit import CHART, one, render, tool

from puremesh.cli.process_mesh import run_mesh
from puremesh.cli.run_settings import RunSettings

pytestmark = pytest.mark.integration

STEPS = 3
ALL_ADDRESSES = {"metrics_host": "0.0.0.0"}  # what the chart sets (templates/_helpers.tpl)
METRIC_NAME = re.compile(r"\bpuremesh_[a-z0-9_]+")
# Grafana's variables, as an operator's dashboard would resolve them here.
GRAFANA_VARIABLES = {"$__rate_interval": "20s", "$__interval": "1s", "$namespace": ".*"}


@dataclass
class Observed:
    exported: dict[str, set[str]] = field(default_factory=dict)  # endpoint -> metric names
    queries: dict[str, dict] = field(default_factory=dict)  # dashboard expr -> API response
    rules: list[dict] = field(default_factory=list)  # /api/v1/rules
    errors: list[str] = field(default_factory=list)


def scrape_address() -> str | None:
    """A non-loopback IPv4 address of this machine (`ip -4 addr`), or None."""
    try:
        out = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
        )
    except OSError:
        return None
    found = re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", out.stdout)
    return found[0] if found else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def exported_names(text: str) -> set[str]:
    """Metric names in a /metrics page, as PromQL sees them (with _total, _bucket, ... suffixes),
    including declared families that have no samples yet (a labelled counter never incremented)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names.add(name)
            if kind == "counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
            elif kind in ("histogram", "summary"):
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard() -> dict:
    return json.loads((CHART / "dashboards" / "puremesh.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] if p["type"] != "row" for t in p["targets"]]


def resolve(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def rule_groups() -> list[dict]:
    return one(render(), "PrometheusRule")["spec"]["groups"]


class LocalPrometheus:
    """Debian's prometheus on a free loopback port: 1 s scrapes of `targets`, the chart's rules."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        rules = workdir / "rules.yaml"
        rules.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    # as the chart's ServiceMonitor and PodMonitor: the metrics' own labels win
                    "scrape_configs": [
                        {
                            "job_name": "puremesh",
                            "honor_labels": True,
                            "static_configs": [{"targets": targets}],
                        }
                    ],
                }
            )
        )
        self.log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, expr: str) -> dict:
        return json.loads(get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def observe(prometheus: LocalPrometheus, targets: list[str], observed: Observed) -> None:
    """At the last step: read every endpoint, then query until each dashboard expression has data
    (rate() needs a few scrapes of series that appeared during the run), then read the rules."""
    for target in targets:
        observed.exported[target] = exported_names(get(f"http://{target}/metrics"))
    exprs = dashboard_exprs()
    deadline = time.monotonic() + 30
    while True:
        observed.queries = {expr: prometheus.query(resolve(expr)) for expr in exprs}
        missing = [e for e, r in observed.queries.items() if not r["data"]["result"]]
        up = prometheus.query("up == 1")["data"]["result"]
        if (not missing and len(up) == len(targets)) or time.monotonic() > deadline:
            break
        time.sleep(1)
    observed.rules = json.loads(get(f"{prometheus.url}/api/v1/rules"))["data"]["groups"]


@pytest.fixture(scope="module")
def observed(tiny_policy_dir, tiny_prm_dir, addition_problems, pki, tmp_path_factory) -> Observed:
    tool("prometheus")  # skip early when it is missing
    work = tmp_path_factory.mktemp("metrics")
    learner_port = free_port()
    config = RunSettings.model_validate(
        {
            "learner": {
                "policy_path": str(tiny_policy_dir),
                "train_path": str(addition_problems),
                "out_dir": str(work / "run"),
                "steps": STEPS,
                "checkpoint_every": STEPS,
                "metrics_port": learner_port,
                # as the chart sets it: /metrics binds there too; all addresses need TLS and tokens
                "weights": {"host": "0.0.0.0", **pki.server_security("weights", mtls=False)},
                "optim": {"lr": 1e-4, "minibatches": 2},
                "sampling": {
                    "prompts_per_step": 2,
                    "samples_per_prompt": 2,
                    "temperature": 1.0,
                    "max_new_tokens": 8,
                },
            },
            "mesh": {
                "rollout_replicas": 1,
                "rollout": {
                    "engine": "hf",
                    "server": ALL_ADDRESSES,
                    "weights_security": {"tls_ca": pki.ca, "token_file": pki.token_file("weights")},
                },
                "prm": {"model_path": str(tiny_prm_dir), "server": ALL_ADDRESSES},
                "verify": {"workers": 1, "server": ALL_ADDRESSES},
            },
        }
    )
    observed = Observed()
    state: dict = {}
    address = scrape_address() or "127.0.0.1"

    def on_mesh(local) -> None:  # the services are serving; the learner is about to start
        state["targets"] = [f"{address}:{p.metrics_port}" for p in local.processes.values()]
        state["targets"].append(f"{address}:{learner_port}")
        state["prometheus"] = LocalPrometheus(work / "prometheus", state["targets"])

    async def on_step(record: dict) -> None:
        if record["step"] == STEPS:
            await asyncio.to_thread(observe, state["prometheus"], state["targets"], observed)

    try:
        result = asyncio.run(run_mesh(config, progress=False, on_step=on_step, on_mesh=on_mesh))
    finally:
        if "prometheus" in state:
            state["prometheus"].stop()
    assert result.steps == STEPS
    assert len(observed.exported) == 4, "rollout, prm, verify and the learner"
    return observed


def test_the_scrapes_went_through_a_non_loopback_address(observed):
    hosts = {target.rsplit(":", 1)[0] for target in observed.exported}
    assert len(hosts) == 1
    if hosts == {"127.0.0.1"}:
        pytest.skip("this machine has no non-loopback IPv4 address: Prometheus scraped 127.0.0.1")
    assert not ipaddress.ip_address(hosts.pop()).is_loopback


def test_every_metric_in_the_alerts_and_the_dashboard_is_exported(observed):
    exported = set().union(*observed.exported.values())
    used: dict[str, set[str]] = {}
    for group in rule_groups():
        for rule in group["rules"]:
            for name in METRIC_NAME.findall(rule["expr"]):
                used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            for name in METRIC_NAME.findall(target["expr"]):
                used.setdefault(name, set()).add(f"panel {panel['title']!r}")
    for variable in dashboard()["templating"]["list"]:
        for name in METRIC_NAME.findall(json.dumps(variable.get("query", ""))):
            used.setdefault(name, set()).add(f"variable {variable['name']}")
    assert len(used) > 30
    unknown = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert not unknown, f"not exported by any endpoint: {unknown}"


def test_every_dashboard_query_returns_data(observed):
    assert observed.queries
    empty = [expr for expr, response in observed.queries.items() if not response["data"]["result"]]
    assert all(r["status"] == "success" for r in observed.queries.values())
    assert not empty, f"no data for: {empty}"


def test_every_alerting_rule_evaluates_cleanly(observed):
    rules = [rule for group in observed.rules for rule in group["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in rule_groups())
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken
    # healthy tiny training raises none of them
    assert [r["name"] for r in rules if r["state"] == "firing"] == []
