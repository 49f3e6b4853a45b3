"""The chart's security (issue 13), rendered offline: secure by default.

Every server's settings name a token file that its pod mounts from the tokens Secret, and every
client's token file is the same key; the learner's WeightService and bulk port have TLS from a
cert-manager Certificate that names the learner Service as the replicas dial it (or from an
existing Secret); the RayService turns on KubeRay's token authentication; the dashboard admits
only the KubeRay operator's pods in its namespace; every policy restricts egress; `helm test`
probes with the tokens. cert-manager's kinds have no vendored CRD here: their fields are checked
against the cert-manager.io/v1 API by a small schema of the fields the chart uses.
"""

from __future__ import annotations

import base64
from pathlib import PurePosixPath

import jsonschema
import pytest
import yaml
from chartkit import RELEASE, find, helm, one, render, template_args
from test_chart_render import FULLNAME, containers, pod_specs, serve_config

from puremesh.trainer.settings import LearnerSettings

TOKENS = ("rollout", "prm", "verify", "weights")
LEARNER_SERVICE = f"{FULLNAME}-learner"
SELECTOR = {"app.kubernetes.io/name": "puremesh", "app.kubernetes.io/instance": RELEASE}
# The cert-manager.io/v1 fields the chart writes (cert-manager's API reference).
ISSUER_REF = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "kind": {"enum": ["Issuer", "ClusterIssuer"]}, "group": {}},
    "additionalProperties": False,
}
CERT_MANAGER_SPECS = {
    "Issuer": {
        "type": "object",
        "properties": {
            "selfSigned": {"type": "object"},
            "ca": {
                "type": "object",
                "required": ["secretName"],
                "properties": {"secretName": {"type": "string"}},
            },
        },
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
    },
    "Certificate": {
        "type": "object",
        "required": ["secretName", "issuerRef"],
        "properties": {
            "secretName": {"type": "string"},
            "issuerRef": ISSUER_REF,
            "isCA": {"type": "boolean"},
            "commonName": {"type": "string", "maxLength": 64},
            "dnsNames": {"type": "array", "items": {"type": "string"}},
            "duration": {"type": "string", "pattern": "^[0-9]+h$"},
            "renewBefore": {"type": "string", "pattern": "^[0-9]+h$"},
            "usages": {
                "type": "array",
                "items": {"enum": ["server auth", "client auth", "digital signature"]},
            },
            "privateKey": {
                "type": "object",
                "properties": {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "size": {"type": "integer"},
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def settings_files(settings: dict) -> list[str]:
    """Every path the chart puts in a security setting (token_file, auth_tokens, tls_*)."""
    found = []
    for key, value in settings.items():
        if isinstance(value, dict):
            found += settings_files(value)
        elif key in ("token_file", "auth_tokens") or (key.startswith("tls_") and key != "tls_server_name"):
            found.append(value)
    return found


def mounted_files(spec: dict, container: dict) -> set[str]:
    """The files a container sees from the pod's Secret volumes."""
    volumes = {v["name"]: v for v in spec["volumes"] if "secret" in v}
    files = set()
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is not None:
            files |= {str(PurePosixPath(mount["mountPath"]) / i["path"]) for i in volume["secret"]["items"]}
    return files


def ray_group_specs(docs) -> dict[str, dict]:
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    specs.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return specs


def learner_settings(docs) -> dict:
    return yaml.safe_load(one(docs, "ConfigMap", f"{FULLNAME}-config")["data"]["learner.yaml"])["learner"]


def test_every_server_and_client_finds_its_files_in_its_pod(docs):
    apps = {a["name"]: a["args"]["settings"] for a in serve_config(docs)["applications"]}
    groups = ray_group_specs(docs)
    for name, settings in apps.items():
        spec = groups[name]
        files = mounted_files(spec, spec["containers"][0])
        assert settings["server"]["auth_tokens"] == f"/etc/puremesh/tokens/{name}.token"
        assert set(settings_files(settings)) <= files, name
        # a group holds its own token only (and the rollout group the replicas' one and the CA)
        expected = {f"/etc/puremesh/tokens/{name}.token"}
        if name == "rollout":
            expected |= {"/etc/puremesh/tokens/weights.token", "/etc/puremesh/tls/ca.crt"}
        assert files == expected, name
    assert mounted_files(groups["head"], groups["head"]["containers"][0]) == set()
    job = one(docs, "Job")["spec"]["template"]["spec"]
    learner = learner_settings(docs)
    (main,) = job["containers"]
    assert set(settings_files(learner)) <= mounted_files(job, main)
    for init in job.get("initContainers", []):  # the probes of wait-for-services use the tokens
        assert "--token-file" in init["command"][-1]
        assert {f"/etc/puremesh/tokens/{s}.token" for s in apps} <= mounted_files(job, init)
    for pod in find(docs, "Pod"):
        (probe,) = pod["spec"]["containers"]
        token = probe["args"][probe["args"].index("--token-file") + 1]
        assert mounted_files(pod["spec"], probe) == {token}


def test_secure_by_default(docs):
    learner = LearnerSettings.model_validate(learner_settings(docs))
    weights = learner.weights
    assert weights.host == "0.0.0.0" and weights.tls and weights.auth_tokens and not weights.insecure
    assert weights.bulk_tls, "the bulk port speaks TLS too"
    assert {str(k): v.token_file for k, v in learner.endpoints.security.items()} == {
        s: f"/etc/puremesh/tokens/{s}.token" for s in ("rollout", "prm", "verify")
    }
    (rollout,) = [a for a in serve_config(docs)["applications"] if a["name"] == "rollout"]
    assert rollout["args"]["settings"]["weights_security"] == {
        "tls_ca": "/etc/puremesh/tls/ca.crt",
        "token_file": "/etc/puremesh/tokens/weights.token",
    }
    (secret,) = find(docs, "Secret")
    assert secret["metadata"]["name"] == f"{FULLNAME}-tokens"
    assert sorted(secret["data"]) == sorted(TOKENS)
    tokens = [base64.b64decode(secret["data"][k]).decode() for k in TOKENS]
    assert len(set(tokens)) == 4 and all(len(t) == 48 and t.isalnum() for t in tokens)
    assert one(docs, "RayService")["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


def test_the_learner_certificate_names_the_service_the_replicas_dial(docs):
    for doc in docs:
        if doc["apiVersion"] == "cert-manager.io/v1":
            jsonschema.validate(doc["spec"], CERT_MANAGER_SPECS[doc["kind"]])
    certificate = one(docs, "Certificate", f"{FULLNAME}-learner-tls")["spec"]
    (rollout,) = [a for a in serve_config(docs)["applications"] if a["name"] == "rollout"]
    host = rollout["args"]["settings"]["weights_target"].rsplit(":", 1)[0]
    assert host in certificate["dnsNames"] and LEARNER_SERVICE in certificate["dnsNames"]
    assert certificate["usages"] == ["server auth"]
    (tls,) = [v for v in one(docs, "Job")["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == certificate["secretName"]
    # the chart's own CA: self-signed Issuer -> CA Certificate -> CA Issuer -> the learner's
    assert certificate["issuerRef"] == {"name": f"{FULLNAME}-ca", "kind": "Issuer"}
    ca = one(docs, "Issuer", f"{FULLNAME}-ca")["spec"]["ca"]["secretName"]
    ca_certificate = one(docs, "Certificate", f"{FULLNAME}-ca")["spec"]
    assert ca_certificate["secretName"] == ca and ca_certificate["isCA"]
    assert ca_certificate["issuerRef"]["name"] == f"{FULLNAME}-selfsigned"
    assert one(docs, "Issuer", f"{FULLNAME}-selfsigned")["spec"] == {"selfSigned": {}}


def test_an_issuer_or_an_existing_secret_replaces_the_charts_ca():
    docs = render(
        (),
        (
            "security.tls.certManager.issuerRef.name=corp-ca",
            "security.tls.certManager.issuerRef.kind=ClusterIssuer",
        ),
    )
    (certificate,) = find(docs, "Certificate")
    assert certificate["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"} and not find(
        docs, "Issuer"
    )
    docs = render((), ("security.tls.existingSecret=learner-tls", "security.tokens.existingSecret=tokens"))
    assert not [d for d in docs if d["apiVersion"] == "cert-manager.io/v1"] and not find(docs, "Secret")
    for where, spec in [("Job", one(docs, "Job")["spec"]["template"]["spec"]), *pod_specs(docs)]:
        for volume in spec["volumes"]:
            if volume["name"] == "tls":
                assert volume["secret"]["secretName"] == "learner-tls", where
            if volume["name"] == "tokens":
                assert volume["secret"]["secretName"] == "tokens", where


def test_tls_off_is_explicitly_insecure():
    docs = render((), ("security.tls.enabled=false",))
    weights = LearnerSettings.model_validate(learner_settings(docs)).weights
    assert not weights.tls and weights.insecure and weights.auth_tokens, "tokens stay on"
    assert not [d for d in docs if d["apiVersion"] == "cert-manager.io/v1"]
    for where, spec in pod_specs(docs):
        assert "tls" not in {v["name"] for v in spec["volumes"]}, where


def test_the_dashboard_admits_only_the_kuberay_operator_by_namespace_and_pod(docs):
    ray = one(docs, "NetworkPolicy", f"{FULLNAME}-ray")["spec"]
    (dashboard,) = [r for r in ray["ingress"] if {"port": 8265, "protocol": "TCP"} in r.get("ports", [])]
    (source,) = dashboard["from"]
    assert source == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "default"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
    }


@pytest.mark.parametrize("empty", ["namespaceSelector=null", "namespaceSelector.matchLabels=null"])
def test_a_dashboard_open_to_every_namespace_fails_the_render(empty):
    refused = helm(*template_args((), (f"networkPolicy.kuberayOperator.{empty}",)), check=False)
    assert refused.returncode != 0 and "would admit the Ray dashboard" in refused.stderr


@pytest.mark.parametrize("sets", [(), ("learner.nodes=2", "storage.workspace.accessModes={ReadWriteMany}")])
def test_every_policy_restricts_egress(sets):
    docs = render((), sets)
    dns = {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
        ],
        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
    }
    ray = one(docs, "NetworkPolicy", f"{FULLNAME}-ray")["spec"]
    ray_pods = {"podSelector": {"matchLabels": {**SELECTOR, "app.kubernetes.io/component": "ray"}}}
    learner_pods = {"podSelector": {"matchLabels": {**SELECTOR, "app.kubernetes.io/component": "learner"}}}
    assert ray["egress"] == [
        {"to": [ray_pods]},
        {
            "to": [learner_pods],
            "ports": [{"port": 50060, "protocol": "TCP"}, {"port": 50061, "protocol": "TCP"}],
        },
        dns,
    ]
    learner = one(docs, "NetworkPolicy", f"{FULLNAME}-learner")["spec"]
    assert learner["policyTypes"] == ["Ingress", "Egress"]
    ranks = [
        {
            "to": [learner_pods],
            "ports": [
                {"port": 29500, "protocol": "TCP"},
                {"port": 32768, "endPort": 60999, "protocol": "TCP"},
            ],
        }
    ]
    assert learner["egress"] == [
        {"to": [ray_pods], "ports": [{"port": 9000, "protocol": "TCP"}]},
        *(ranks if sets else []),
        dns,
    ]
    head = one(docs, "NetworkPolicy", f"{FULLNAME}-ray-head-api")["spec"]
    assert head["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert head["egress"] == [
        {
            "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
            "ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}],
        }
    ]


def test_no_pod_gets_a_token_it_does_not_need(docs):
    """Every container's Secret files, pod by pod: a rollout replica holds no PRM token, etc."""
    for where, spec in pod_specs(docs):
        for container in containers(spec):
            files = mounted_files(spec, container)
            if "Job/" in where:
                allowed = {f"/etc/puremesh/tokens/{t}.token" for t in TOKENS}
                allowed |= {"/etc/puremesh/tls/tls.crt", "/etc/puremesh/tls/tls.key"}
            elif "Pod/" in where:
                allowed = {f"/etc/puremesh/tokens/{where.rsplit('-', 1)[1]}.token"}
            else:
                allowed = {f for f in files if "tls.key" not in f}
            assert files <= allowed, (where, container["name"], files - allowed)
