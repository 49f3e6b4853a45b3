"""The local launcher: the services of `puremesh up` as processes on loopback, supervised.

Each service runs as `puremesh serve <service>` with its settings in a YAML file. It reports
that it serves with a `ReadyRecord`, a JSON file written atomically to the path the launcher
gives in PUREMESH_READY_FILE; the launcher waits for that file (or the process's death).

Supervision (`SupervisionSettings`, `mesh.supervision`): while the mesh runs, a service that
exits (a crash, SIGKILL) is started again on the same ports, so the learner's endpoints stay
valid, after a backoff that doubles with each restart, up to `max_restarts` per service. A
restarted rollout replica pulls the learner's current version before it reports ready. A
service that cannot be brought back stays down; the learner's fail-over then stops training
with one error naming it (trainer/failover.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from puremesh.rpc.settings import FrozenSettings

# Set by the launcher to its pid: the service then asks to be stopped when the launcher dies.
DIE_WITH_PARENT_ENV = "PUREMESH_DIE_WITH_PARENT"
# Set by the launcher: where the service writes its ReadyRecord once it serves.
READY_FILE_ENV = "PUREMESH_READY_FILE"
READY_POLL_S = 0.05
SUPERVISE_POLL_S = 0.2

log = logging.getLogger(__name__)


class SupervisionSettings(FrozenSettings):
    """`mesh.supervision`: restarting local services that die (module docstring)."""

    restart: bool = Field(True, description="start a service that exits again, on the same ports")
    max_restarts: int = Field(5, ge=0, description="restarts per service before it is left down")
    restart_backoff_seconds: float = Field(
        0.5, ge=0, description="pause before the first restart of a service; doubles with each one"
    )
    ready_timeout_seconds: float = Field(600.0, gt=0, description="how long a (re)started service may load")


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
    settings: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0

    @property
    def port(self) -> int:
        return int(self.target.rsplit(":", 1)[1])


@dataclass
class _Launched:
    name: str
    service: str
    process: subprocess.Popen
    log_path: Path
    ready_path: Path
    settings: dict[str, Any]


@dataclass
class LocalMesh:
    """Services as local processes on loopback. `start_*` return when the service is SERVING;
    `start_many` also starts the supervisor (module docstring), `stop` ends it."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    supervision: SupervisionSettings = field(default_factory=SupervisionSettings)
    _supervisor: asyncio.Task | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _launching: set[subprocess.Popen] = field(default_factory=set)  # started, not serving yet
    _stopping: bool = False

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
        if self.supervision.restart and self._supervisor is None:
            self._loop = asyncio.get_running_loop()
            self._supervisor = asyncio.create_task(self.supervise(), name="local-mesh-supervisor")

    async def supervise(self) -> None:
        """Restart the services that exit, until `stop` (runs on the event loop's thread, which
        the parent-death signal of the restarted processes is tied to)."""
        while not self._stopping:
            await asyncio.sleep(SUPERVISE_POLL_S)
            for started in list(self.processes.values()):
                code = started.process.poll()
                if (
                    code is not None
                    and not self._stopping
                    and started.restarts < self.supervision.max_restarts
                ):
                    await self._restart(started, code)

    async def _restart(self, started: ServiceProcess, code: int) -> None:
        started.restarts += 1
        pause = self.supervision.restart_backoff_seconds * 2 ** (started.restarts - 1)
        log.warning(
            "%s exited with code %s; restarting it on %s in %.1f s (restart %d of at most %d)",
            started.name, code, started.target, pause, started.restarts, self.supervision.max_restarts,
        )  # fmt: skip
        await asyncio.sleep(pause)
        if self._stopping:
            return
        launched = self._launch(
            started.name, started.service, started.settings, started.port, started.metrics_port
        )
        try:
            restarted = await asyncio.to_thread(
                self._wait_ready, launched, self.supervision.ready_timeout_seconds
            )
        except RuntimeError as error:
            log.error("could not restart %s: %s", started.name, error)
            return
        restarted.restarts = started.restarts
        log.warning("%s is serving again on %s", started.name, restarted.target)

    def _launch(
        self,
        name: str,
        service: str,
        settings: dict[str, Any],
        port: int = 0,
        metrics_port: int | None = 0,
    ) -> _Launched:
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
        ports = ["--port", str(port), "--metrics-port", str(metrics_port or 0)]
        with log_path.open("a") as handle:
            process = subprocess.Popen(
                [*command, *ports],
                stdout=handle,
                stderr=handle,
                env=env,
                start_new_session=True,
            )
        self._launching.add(process)
        return _Launched(name, service, process, log_path, ready_path, settings)

    def _wait_ready(self, launched: _Launched, ready_timeout: float) -> ServiceProcess:
        try:
            return self._await_record(launched, ready_timeout)
        finally:
            self._launching.discard(launched.process)

    def _await_record(self, launched: _Launched, ready_timeout: float) -> ServiceProcess:
        deadline = time.monotonic() + ready_timeout
        process = launched.process
        while time.monotonic() < deadline and process.poll() is None:
            record = ReadyRecord.read(launched.ready_path)
            if record is not None:
                started = ServiceProcess(
                    launched.name, launched.service, process, record.target, record.metrics_port,
                    launched.log_path, launched.settings,
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
        """Stop the supervisor and every service (SIGTERM, then SIGKILL after `timeout` s); safe
        from any thread."""
        self._stopping = True
        if self._supervisor is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: so is the supervisor
                self._loop.call_soon_threadsafe(self._supervisor.cancel)
        for process in list(self._launching):
            process.kill()
        for started in self.processes.values():
            if started.process.poll() is None:
                started.process.send_signal(signal.SIGTERM)
        for started in self.processes.values():
            try:
                started.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                started.process.kill()
                started.process.wait()
