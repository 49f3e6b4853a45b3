"""The local launcher: the services of `puremesh up` as processes on loopback.

Each service runs as `puremesh serve <service>` with its settings in a YAML file. It reports
that it serves with a `ReadyRecord`, a JSON file written atomically to the path the launcher
gives in PUREMESH_READY_FILE; the launcher waits for that file (or the process's death).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Set by the launcher to its pid: the service then asks to be stopped when the launcher dies.
DIE_WITH_PARENT_ENV = "PUREMESH_DIE_WITH_PARENT"
# Set by the launcher: where the service writes its ReadyRecord once it serves.
READY_FILE_ENV = "PUREMESH_READY_FILE"
READY_POLL_S = 0.05


def die_with_parent() -> None:
    """Get SIGTERM when the launcher dies, even by SIGKILL (Linux; elsewhere the launcher's own
    shutdown still stops its services). Called by `puremesh serve` at start."""
    expected = os.environ.get(DIE_WITH_PARENT_ENV)
    if not expected:
        return
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != expected:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass(frozen=True)
class ReadyRecord:
    """What a launched service reports once it serves."""

    service: str
    target: str  # host:port of its gRPC server
    metrics_port: int | None
    pid: int = field(default_factory=os.getpid)

    def publish(self) -> None:
        """Write the record to $PUREMESH_READY_FILE (atomically); nothing when it is unset."""
        path = os.environ.get(READY_FILE_ENV)
        if not path:
            return
        partial = Path(f"{path}.partial")
        partial.write_text(json.dumps(asdict(self)))
        partial.replace(path)

    @classmethod
    def read(cls, path: Path) -> ReadyRecord | None:
        """The record at `path`, or None while there is none."""
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None


@dataclass
class ServiceProcess:
    name: str
    service: str
    process: subprocess.Popen
    target: str
    metrics_port: int | None
    log_path: Path


@dataclass
class _Launched:
    name: str
    service: str
    process: subprocess.Popen
    log_path: Path
    ready_path: Path


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

    def _launch(self, name: str, service: str, settings: dict[str, Any]) -> _Launched:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump(settings, sort_keys=True))
        log_path = self.workdir / f"{name}.log"
        ready_path = self.workdir / f"{name}.ready.json"
        ready_path.unlink(missing_ok=True)
        command = [sys.executable, "-m", "puremesh.cli.main", "serve", service, "--config", str(config)]
        env = {
            **os.environ,
            **self.env,
            DIE_WITH_PARENT_ENV: str(os.getpid()),
            READY_FILE_ENV: str(ready_path),
        }
        with log_path.open("a") as handle:
            process = subprocess.Popen(
                [*command, "--port", "0", "--metrics-port", "0"],
                stdout=handle,
                stderr=handle,
                env=env,
                start_new_session=True,
            )
        return _Launched(name, service, process, log_path, ready_path)

    def _wait_ready(self, launched: _Launched, ready_timeout: float) -> ServiceProcess:
        deadline = time.monotonic() + ready_timeout
        process = launched.process
        while time.monotonic() < deadline and process.poll() is None:
            record = ReadyRecord.read(launched.ready_path)
            if record is not None:
                started = ServiceProcess(
                    launched.name, launched.service, process, record.target, record.metrics_port,
                    launched.log_path,
                )  # fmt: skip
                self.processes[launched.name] = started
                return started
            time.sleep(READY_POLL_S)
        why = "exited" if process.poll() is not None else f"was not serving after {ready_timeout:.0f} s"
        process.kill()
        process.wait()
        tail = "".join(launched.log_path.read_text().splitlines(keepends=True)[-5:])
        raise RuntimeError(f"{launched.name} ({launched.service}) {why}; last log lines:\n{tail}")

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
