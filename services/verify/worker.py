"""One grading process of `pool.GradingPool`, both sides of its pipe.

Worker side: `worker_main` warms up (`warm_up`: one real comparison, so that sympy and the LaTeX
parser are initialised before the first item), then answers ``(answer, ground_truth)`` with
``(True, match)`` or ``(False, error)`` until its pipe closes. Host side: `Worker` (the process
and its pipe; kill and reap), `receive` (the next message, on the event loop, with a timeout)
and `stop_processes` (shutdown). The design is described once, in pool.py's docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from multiprocessing.connection import Connection
from typing import Any

from .grading import answers_match

_WARMUP = ("(x+1)^2", "x^2+2x+1")  # one real comparison: parse, simplify (answer, ground truth)
_JOIN_TIMEOUT_S = 5.0  # waiting for a killed process to be reaped
_MAX_ERROR_CHARS = 300


class _DropDisabledTimeoutWarning(logging.Filter):
    # math-verify warns once per process that its own timeout is off; the pool is the timeout.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


_warm = False


def warm_up() -> None:
    """Prepare a grading process: quiet math-verify's timeout warning, run one real comparison.

    Runs in every worker, and once in the fork server (module `_forkserver_warmup`), so that the
    lazy initialisation of sympy and the LaTeX parser (~0.4 s) is inherited by forked workers.
    """
    global _warm
    if not _warm:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
        _warm = True
    answers_match(*_WARMUP)


def worker_main(conn: Connection) -> None:
    """Worker loop: receive ``(answer, ground_truth)``, reply ``(True, match)`` or ``(False, error)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the host process
    warm_up()
    conn.send(os.getpid())
    while True:
        try:
            answer, ground_truth = conn.recv()
        except EOFError:  # the pool closed our pipe
            return
        try:
            reply: tuple[bool, Any] = (True, answers_match(answer, ground_truth))
        except Exception as exc:
            reply = (False, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS])
        conn.send(reply)


class Worker:
    __slots__ = ("conn", "pid", "process")

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.pid: int | None = None

    def kill(self) -> None:
        """SIGKILL (does not wait); safe to call more than once."""
        # ValueError: the Process object is closed already (reaped); then there is nothing to kill.
        with contextlib.suppress(OSError, ValueError):
            if self.process.pid is not None:
                self.process.kill()

    def reap(self) -> None:
        """Wait for the killed process and release its pipe (blocks up to _JOIN_TIMEOUT_S)."""
        with contextlib.suppress(OSError, ValueError, AssertionError):
            self.process.join(_JOIN_TIMEOUT_S)
        with contextlib.suppress(OSError, ValueError):
            self.process.close()
        close_quietly(self.conn)


def close_quietly(conn: Connection) -> None:
    with contextlib.suppress(OSError):
        conn.close()


def stop_processes(workers: list[Worker]) -> None:
    """Wait for terminated workers to exit, SIGKILL the stubborn ones, release the processes."""
    for worker in workers:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            worker.process.join(_JOIN_TIMEOUT_S)
        worker.kill()
        with contextlib.suppress(OSError, ValueError, AssertionError):
            worker.process.join(_JOIN_TIMEOUT_S)
        with contextlib.suppress(OSError, ValueError):
            worker.process.close()


async def receive(conn: Connection, timeout_s: float) -> Any:
    """The next message on ``conn``; TimeoutError after ``timeout_s``; EOFError if the peer died."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    fd = conn.fileno()

    def on_readable() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await asyncio.wait_for(readable, timeout_s)
    finally:
        loop.remove_reader(fd)
    return conn.recv()
