"""The chart tests' tools and rendering (imported by the tests and by conftest.py).

helm, promtool and prometheus come from `make tools` (into .tools/bin, git-ignored); `make test`
fetches them first. A test that needs a missing tool is skipped and says how to get it.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from puremesh.cli.chart_alerts import AlertsUnavailable, find_tool

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "puremesh"
EXAMPLES = REPO / "deploy" / "helm" / "examples"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The Kubernetes version the manifests are rendered for and validated against (kubernetes-validate
# ships schemas for 1.25 to 1.37; the chart asks for >= 1.25).
KUBE_VERSION = "1.31.0"
RELEASE = "pm"
NAMESPACE = "puremesh"
# Values cases: the chart's defaults and each example file.
CASES = {
    "default": (),
    "gpu-cluster": (EXAMPLES / "gpu-cluster.yaml",),
    "cpu-only": (EXAMPLES / "cpu-only.yaml",),
    "monitoring-off": (EXAMPLES / "monitoring-off.yaml",),
    "multi-node-learner": (EXAMPLES / "gpu-cluster.yaml", EXAMPLES / "multi-node-learner.yaml"),
}


def tool(name: str) -> str:
    """The path of a tool from .tools/bin (or PATH), found as the demo finds it; skips the test
    if it is missing."""
    try:
        return find_tool(name)
    except AlertsUnavailable as missing:
        pytest.skip(f"{missing} (`make test` does it first)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def template_args(values: tuple[Path, ...] = (), sets: tuple[str, ...] = ()) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    for path in values:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


@functools.cache
def render(values: tuple[Path, ...] = (), sets: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    """`helm template` of the chart: every manifest (test hooks included), parsed."""
    out = helm(*template_args(values, sets)).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def find(docs, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]
