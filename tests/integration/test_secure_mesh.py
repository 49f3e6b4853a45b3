"""The whole local mesh with TLS and tokens on every channel: `puremesh up` on configs/secure.yaml
as written (its pki/ paths resolved from the folder the README's openssl block ran in), with only
the models, the data and the sizes replaced by the tiny test world.

It trains; the replicas pull every version over the authenticated, encrypted bulk port (no
fallback to FetchWeights); meanwhile the services refuse a caller without a token, and one that
speaks plaintext.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest

from puremesh.cli.process_mesh import run_mesh
from puremesh.cli.run_settings import load_run_settings
from puremesh.rpc.client import RpcError
from puremesh.rpc.settings import ClientSecurity
from puremesh.services.prm.client import PrmClient
from puremesh.services.rollout.client import RolloutClient
from puremesh.weightsync.bulk_server import BULK_SENT_BYTES

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "secure.yaml"
STEPS = 2


def overrides(policy: Path, prm: Path, problems: Path, out: Path) -> dict:
    return {
        "learner": {
            "policy_path": str(policy),
            "train_path": str(problems),
            "out_dir": str(out),
            "steps": STEPS,
            "checkpoint_every": STEPS,
            "metrics_port": None,
            "optim": {"lr": 1e-4, "minibatches": 2},
            "sampling": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8},
            "eval": {"heldout_path": str(problems), "n_eval": 2, "max_new_tokens": 8},
        },
        "mesh": {"rollout_replicas": 1, "rollout": {"engine": "hf"}, "prm": {"model_path": str(prm)}},
    }


async def test_the_mesh_trains_with_tls_and_tokens_on(
    tiny_policy_dir, tiny_prm_dir, addition_problems, pki, tmp_path, monkeypatch
):
    monkeypatch.chdir(pki.root.parent)  # configs/secure.yaml names pki/...
    config = load_run_settings(CONFIG, overrides(tiny_policy_dir, tiny_prm_dir, addition_problems, tmp_path))
    assert config.learner.weights.tls and config.mesh.prm["server"]["auth_tokens"] == "pki/prm.token"
    mesh, seen = {}, {}
    sent_before = BULK_SENT_BYTES._value.get()

    async def on_step(record: dict) -> None:
        if record["step"] != STEPS:
            return
        (prm,) = mesh["local"].targets("prm")
        async with PrmClient(prm, timeout=10, security=ClientSecurity(tls_ca="pki/ca.crt")) as client:
            try:
                await client.score([("1+1?", "2")])
            except RpcError as error:
                seen["no token"] = error.code
        async with PrmClient(prm, timeout=10) as client:
            try:
                await client.score([("1+1?", "2")])
            except RpcError as error:
                seen["plaintext"] = error.code
        (rollout,) = mesh["local"].targets("rollout")
        security = ClientSecurity(tls_ca="pki/ca.crt", token_file="pki/rollout.token")
        async with RolloutClient(rollout, timeout=10, security=security) as client:
            seen["version"] = (await client.status()).policy_version
        replica = mesh["local"].processes["rollout-0"]
        with urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=10) as page:
            seen["replica metrics"] = page.read().decode()

    result = await run_mesh(
        config, progress=False, on_step=on_step, on_mesh=lambda local: mesh.update(local=local)
    )
    assert result.steps == STEPS and result.version == STEPS
    assert seen["no token"] == grpc.StatusCode.UNAUTHENTICATED
    assert seen["plaintext"] == grpc.StatusCode.UNAVAILABLE
    assert seen["version"] == STEPS
    assert BULK_SENT_BYTES._value.get() > sent_before, "the versions went out over the bulk port"
    fallbacks = [
        line
        for line in seen["replica metrics"].splitlines()
        if line.startswith("puremesh_rollout_weight_bulk_fallbacks_total{") and not line.endswith(" 0.0")
    ]
    assert fallbacks == [], "every version came over the authenticated bulk port"
