"""The composition root's wiring: service clients adapted to the learner's backends, with
fail-over across endpoints, and the local launcher that runs the mesh as processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml

from puremesh.services.common.client import RetryPolicy, RpcError
from puremesh.services.prm.client import PrmClient
from puremesh.services.rollout.client import RolloutClient, Sampling
from puremesh.services.verify.client import VerifyClient
from puremesh.trainer.backends import BackendError, Sample, SamplingRequest, StepScores

log = logging.getLogger(__name__)
Client = TypeVar("Client")
Result = TypeVar("Result")

# Codes after which the same request may succeed on another endpoint (or the same one later).
FAILOVER_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,  # a rollout replica still swapping in the requested version
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    }
)


class EndpointPool:
    """Round-robin over the clients of one service; a call that fails with a fail-over code
    moves to the next endpoint, with backoff, for up to `max_rounds` passes over all of them."""

    def __init__(
        self, name: str, clients: Sequence[Any], max_rounds: int = 20, backoff_s: float = 0.2
    ) -> None:
        if not clients:
            raise ValueError(f"no {name} endpoints configured")
        self.name = name
        self.clients = list(clients)
        self.max_rounds = max_rounds
        self.backoff_s = backoff_s
        self._next = itertools.cycle(range(len(self.clients)))

    async def call(self, operation: Callable[[Any], Awaitable[Result]]) -> Result:
        attempts = self.max_rounds * len(self.clients)
        last: RpcError | None = None
        for attempt in range(attempts):
            client = self.clients[next(self._next)]
            try:
                return await operation(client)
            except RpcError as error:
                if error.code not in FAILOVER_CODES:
                    raise BackendError(
                        f"{self.name} at {error.target}: {error.code.name}: {error.details}"
                    ) from error
                last = error
            if (attempt + 1) % len(self.clients) == 0:
                await asyncio.sleep(min(2.0, self.backoff_s * (1 + attempt // len(self.clients))))
        assert last is not None
        raise BackendError(f"{self.name}: every endpoint failed; last {last.code.name}: {last.details}")

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients), return_exceptions=True)


# One try per endpoint inside a client: the pool does the retrying and the moving on.
SINGLE_TRY = RetryPolicy(max_attempts=1)


class MeshRollout:
    """`application`: the Ray Serve application name when the targets are Ray Serve proxies."""

    def __init__(self, targets: Sequence[str], timeout: float, application: str = "") -> None:
        clients = [RolloutClient(t, timeout, SINGLE_TRY, application) for t in targets]
        self.pool = EndpointPool("rollout", clients)

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingRequest, min_policy_version: int
    ) -> list[Sample]:
        request = Sampling(
            sampling.n, sampling.temperature, sampling.top_p, sampling.max_new_tokens, sampling.seed
        )

        async def call(client: RolloutClient) -> list[Sample]:
            # A stream cut midway is retried whole elsewhere: partial samples are discarded.
            return [
                Sample(s.token_ids, s.logprobs, s.text, s.policy_version, s.finish_reason)
                async for s in client.generate(prompt_ids, request, min_policy_version=min_policy_version)
            ]

        return await self.pool.call(call)


class MeshScorer:
    def __init__(self, targets: Sequence[str], timeout: float, application: str = "") -> None:
        self.pool = EndpointPool("prm", [PrmClient(t, timeout, SINGLE_TRY, application) for t in targets])

    async def score(self, prompt_ids: list[int], responses: list[list[int]]) -> list[StepScores]:
        results = await self.pool.call(lambda client: client.score([(prompt_ids, r) for r in responses]))
        failed = [r.error for r in results if r.error is not None]
        if failed:
            raise BackendError(f"prm could not score {len(failed)} response(s): {failed[0]}")
        return [StepScores([(s.token_start, s.token_end) for s in r.steps], r.scores) for r in results]


class MeshVerifier:
    def __init__(self, targets: Sequence[str], timeout: float, application: str = "") -> None:
        self.pool = EndpointPool(
            "verify", [VerifyClient(t, timeout, SINGLE_TRY, application) for t in targets]
        )

    async def verify(self, responses: list[str], ground_truth: str | None) -> list[str]:
        outcomes = await self.pool.call(lambda client: client.verify([(r, ground_truth) for r in responses]))
        return [outcome.verdict for outcome in outcomes]


# --- the local launcher ---------------------------------------------------------------------

# Set by the launcher to its pid: the service then asks to be stopped when the launcher dies.
DIE_WITH_PARENT_ENV = "PUREMESH_DIE_WITH_PARENT"


def die_with_parent() -> None:
    """Get SIGTERM when the launcher dies, even by SIGKILL (Linux; elsewhere the launcher's own
    shutdown still stops its services). Called by `puremesh serve` at start."""
    import ctypes

    expected = os.environ.get(DIE_WITH_PARENT_ENV)
    if not expected:
        return
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != expected:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class ServiceProcess:
    name: str
    service: str
    process: subprocess.Popen
    target: str
    metrics_port: int
    log_path: Path


@dataclass
class LocalMesh:
    """Services as local processes on loopback. `start_*` return when the service is SERVING."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def start(
        self, name: str, service: str, settings: dict[str, Any], ready_timeout: float = 600
    ) -> ServiceProcess:
        """Launch one service and wait until it serves."""
        return self._wait_ready(self._launch(name, service, settings), ready_timeout)

    async def start_many(
        self, jobs: list[tuple[str, str, dict[str, Any]]], ready_timeout: float = 600
    ) -> None:
        """Launch several services from this thread (their parent-death signal is tied to the
        launching thread), then wait for all of them concurrently."""
        launched = [self._launch(*job) for job in jobs]
        await asyncio.gather(*(asyncio.to_thread(self._wait_ready, item, ready_timeout) for item in launched))

    def _launch(self, name: str, service: str, settings: dict[str, Any]):
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump(settings, sort_keys=True))
        log_path = self.workdir / f"{name}.log"
        with log_path.open("a") as handle:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "puremesh.cli.main",
                    "serve",
                    service,
                    "--config",
                    str(config),
                    "--port",
                    "0",
                    "--metrics-port",
                    "0",
                ],
                stdout=subprocess.PIPE,
                stderr=handle,
                text=True,
                env={**os.environ, **self.env, DIE_WITH_PARENT_ENV: str(os.getpid())},
                start_new_session=True,
            )
        return name, service, process, log_path

    def _wait_ready(self, launched, ready_timeout: float) -> ServiceProcess:
        name, service, process, log_path = launched
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            match = re.search(r"serving on (\S+) \(metrics on port (\d+)\)", line)
            if match:
                started = ServiceProcess(
                    name, service, process, match.group(1), int(match.group(2)), log_path
                )
                self.processes[name] = started
                return started
            if not line and process.poll() is not None:
                break
        process.kill()
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-5:])
        raise RuntimeError(f"{name} ({service}) did not start; last log lines:\n{tail}")

    def targets(self, service: str) -> list[str]:
        return [
            p.target for p in self.processes.values() if p.service == service and p.process.poll() is None
        ]

    def kill(self, name: str) -> None:
        """Kill a service hard (SIGKILL), as a crash would."""
        process = self.processes[name].process
        process.kill()
        process.wait()

    def stop(self, timeout: float = 30) -> None:
        for started in self.processes.values():
            if started.process.poll() is None:
                started.process.send_signal(signal.SIGTERM)
        for started in self.processes.values():
            try:
                started.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                started.process.kill()
                started.process.wait()
