"""`puremesh up --ray` on CPU: a local Ray instance, the three services as Ray Serve
applications behind Ray Serve's gRPC proxy (tiny models, hf engine), and the same learner as
`puremesh up`. Two PPO steps change the policy, the rollout replica ends on the newest version
(pulled from the learner), `puremesh probe` succeeds through the proxy, and Ray leaves no
process behind.

With tokens (issue 13): each deployment accepts only its service's token, which passes the
proxy as metadata; a call without it is UNAUTHENTICATED. The learner's weight plane has TLS and
tokens, and the proxy listens on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from safetensors.torch import load_file

from puremesh.cli.export import export
from puremesh.cli.ray_mesh import run_mesh_ray
from puremesh.cli.run_settings import RunSettings
from puremesh.rpc.client import RpcError
from puremesh.rpc.settings import ClientSecurity
from puremesh.services.rollout.client import RolloutClient

pytestmark = pytest.mark.integration

STEPS = 2


def config(policy: Path, prm: Path, problems: Path, out: Path, pki) -> RunSettings:
    def server(name: str) -> dict:
        return {"auth_tokens": pki.token_file(name)}

    # the endpoints' CA is dropped for the proxy, which has no TLS (cli/ray_mesh.py)
    security = {
        name: {"tls_ca": pki.ca, "token_file": pki.token_file(name)} for name in ("rollout", "prm", "verify")
    }
    return RunSettings.model_validate(
        {
            "learner": {
                "policy_path": str(policy),
                "train_path": str(problems),
                "out_dir": str(out),
                "steps": STEPS,
                "checkpoint_every": STEPS,
                "optim": {"lr": 1e-4, "minibatches": 2},
                "sampling": {
                    "prompts_per_step": 3,
                    "samples_per_prompt": 2,
                    "temperature": 1.0,
                    "max_new_tokens": 12,
                },
                "weights": pki.server_security("weights", mtls=False),
                "endpoints": {"security": security},
            },
            "mesh": {
                "rollout_replicas": 1,
                "rollout": {
                    "engine": "hf",
                    "server": server("rollout"),
                    "weights_security": {"tls_ca": pki.ca, "token_file": pki.token_file("weights")},
                },
                "prm": {"model_path": str(prm), "server": server("prm")},
                "verify": {"workers": 1, "server": server("verify")},
                "ray": {"num_cpus": 2, "object_store_bytes": 128 << 20},
            },
        }
    )


async def probe(target: str, service: str, *extra: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "puremesh.cli.main",
        "probe",
        "--target",
        target,
        "--service",
        service,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, (out + err).decode().strip()


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP listeners on `port` (hex, as /proc/net/tcp{,6} has them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.add(local.rsplit(":", 1)[0])
    return found


# 127.0.0.1 in /proc/net/tcp, and as an IPv4-mapped address in /proc/net/tcp6
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}


def ray_processes() -> list[psutil.Process]:
    """Every process of the local Ray instance this test started: the children of this process
    that Ray launched (GCS, raylet, ...), with all their descendants (workers, replicas and the
    processes those started, such as the verify grading pool)."""
    found = []
    for child in psutil.Process().children():
        try:
            # Ray's binaries and scripts (GCS, raylet, monitors); not, say, a multiprocessing
            # fork server whose sys.path argument names Ray's folders
            if any("site-packages/ray/" in part for part in child.cmdline()[:3]):
                found += [child, *child.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return found


def describe(processes: list[psutil.Process]) -> list[str]:
    found = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(f"{process.pid} {' '.join(process.cmdline())[:100]}")
    return found


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_up_ray_trains_through_the_ray_serve_proxy(
    tiny_policy_dir, tiny_prm_dir, addition_problems, tmp_path, pki
):
    import ray

    settings = config(tiny_policy_dir, tiny_prm_dir, addition_problems, tmp_path / "run", pki)
    seen: dict = {}

    def on_mesh(ray_serve) -> None:
        seen["target"] = ray_serve.target
        seen["processes"] = ray_processes()

    async def on_step(record: dict) -> None:
        if record["step"] != STEPS:
            return  # the learner waited for the replica to hold the newest version before this
        target = seen["target"]
        seen["listening"] = listening_addresses(int(target.rsplit(":", 1)[1]))
        async with RolloutClient(target, timeout=30, application="rollout") as client:
            try:
                await client.status()
            except RpcError as error:
                seen["no token"] = error.code
        token = pki.token_file("rollout")
        async with RolloutClient(
            target, timeout=30, application="rollout", security=ClientSecurity(token_file=token)
        ) as client:
            seen["status"] = await client.status()
        for service in ("rollout", "prm", "verify"):
            flags = ("--application", service, "--timeout", "30", "--token-file", pki.token_file(service))
            seen[service] = await probe(target, service, *flags)
        # the proxy answers no grpc.health: a probe without --application cannot succeed
        seen["health"] = await probe(target, "verify", "--timeout", "2")

    began = time.monotonic()
    try:
        result = await run_mesh_ray(settings, progress=False, on_step=on_step, on_mesh=on_mesh)
    finally:
        if ray.is_initialized():  # run_mesh_ray stops Ray itself; this only guards the test
            ray.shutdown()
    elapsed = time.monotonic() - began

    assert result.steps == STEPS and result.version == STEPS
    history = [r for r in result.history if "outcome_reward" in r]
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    assert all(r["failed_groups"] == 0 for r in history)
    before = load_file(str(tiny_policy_dir / "model.safetensors"))
    exported = export(tmp_path / "run" / "checkpoints" / f"step-{STEPS:06d}", tmp_path / "exported")
    after = load_file(str(exported / "model.safetensors"))
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) > len(before) // 2, "PPO steps should change most weights"

    status = seen["status"]
    assert status.ready and status.engine == "hf" and status.replica_id.startswith("rollout-")
    assert status.policy_version == STEPS, "the replica pulls every version the learner publishes"
    for service in ("rollout", "prm", "verify"):
        code, line = seen[service]
        assert code == 0, line
        assert line.startswith(f"{service} at {seen['target']} (application {service}): ")
    assert "policy version" in seen["rollout"][1]
    code, line = seen["health"]
    assert code == 1 and "UNIMPLEMENTED" in line and len(line.splitlines()) == 1
    assert seen["no token"] == grpc.StatusCode.UNAUTHENTICATED, "the deployment checks the token"
    assert seen["listening"] and seen["listening"] <= LOOPBACK, f"the proxy listens on {seen['listening']}"

    assert seen["processes"], "Ray's processes were found while it ran"
    deadline = time.monotonic() + 30
    while left := [p for p in seen["processes"] if alive(p)]:
        assert time.monotonic() < deadline, f"Ray left processes behind: {describe(left)}"
        await asyncio.sleep(0.5)
    assert not ray_processes()
    print(f"up --ray: {STEPS} steps in {elapsed:.0f} s; {len(seen['processes'])} Ray processes, none left")
