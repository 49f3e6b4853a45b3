"""`puremesh up --ray` on CPU: a local Ray instance, the three services as Ray Serve
applications behind Ray Serve's gRPC proxy (tiny models, hf engine), and the same learner as
`puremesh up`. Two PPO steps change the policy, the rollout replica ends on the newest version
(pulled from the learner), `puremesh probe` succeeds through the proxy, and Ray leaves no
process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from puremesh.cli.ray_mesh import run_mesh_ray
from puremesh.cli.run_settings import RunSettings
from puremesh.services.rollout.client import RolloutClient

pytestmark = pytest.mark.integration

STEPS = 2


def config(policy: Path, prm: Path, problems: Path, out: Path) -> RunSettings:
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
            },
            "mesh": {
                "rollout_replicas": 1,
                "rollout": {"engine": "hf"},
                "prm": {"model_path": str(prm)},
                "verify": {"workers": 1},
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
    tiny_policy_dir, tiny_prm_dir, addition_problems, tmp_path
):
    import ray

    settings = config(tiny_policy_dir, tiny_prm_dir, addition_problems, tmp_path / "run")
    seen: dict = {}

    def on_mesh(ray_serve) -> None:
        seen["target"] = ray_serve.target
        seen["processes"] = ray_processes()

    async def on_step(record: dict) -> None:
        if record["step"] != STEPS:
            return  # the learner waited for the replica to hold the newest version before this
        target = seen["target"]
        async with RolloutClient(target, timeout=30, application="rollout") as client:
            seen["status"] = await client.status()
        for service in ("rollout", "prm", "verify"):
            seen[service] = await probe(target, service, "--application", service, "--timeout", "30")
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
    after = load_file(
        str(tmp_path / "run" / "checkpoints" / f"step-{STEPS:06d}" / "policy" / "model.safetensors")
    )
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

    assert seen["processes"], "Ray's processes were found while it ran"
    deadline = time.monotonic() + 30
    while left := [p for p in seen["processes"] if alive(p)]:
        assert time.monotonic() < deadline, f"Ray left processes behind: {describe(left)}"
        await asyncio.sleep(0.5)
    assert not ray_processes()
    print(f"up --ray: {STEPS} steps in {elapsed:.0f} s; {len(seen['processes'])} Ray processes, none left")
