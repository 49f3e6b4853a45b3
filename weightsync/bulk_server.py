"""The learner's bulk data plane: the tensor bytes of retained versions over plain TCP.

gRPC (servicer.py) stays the control plane: announcements, the manifest and the checksums. The
bytes themselves go out here, with no framing per chunk and no copy, so that a replica receives
a version about as fast as a raw socket copy of it. The protocol is described in the file
comment of weights.proto; its framing is contract/bulk.py.

`BulkServer` listens on one TCP port. A thread accepts connections; a thread per connection
reads requests and answers each with a reply header and `socket.sendall` of a memoryview slice
of the version's retained buffer (zero copy). It holds the version (`acquire` / `release` of
its `VersionSource`, the store) while it sends, so that a publish cannot reuse the buffer
mid-send. Bad requests get an error reply and the server goes on serving.

The composition root (cli/learner.py) builds it beside the store and closes it: the listener
and every open connection are shut down, so sends in flight stop at once.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Protocol

from prometheus_client import Counter

from puremesh.contract import bulk
from puremesh.contract.bulk import BulkStatus

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 64
# A connection idle this long between requests, or a send stalled this long, is closed.
DEFAULT_IO_TIMEOUT_S = 60.0
# Bytes per sendall: bounds how long close() waits for a send in flight to notice.
SEND_SLICE_BYTES = 4 << 20
ACCEPT_POLL_S = 0.5

BULK_SENT_BYTES = Counter(
    "puremesh_learner_weight_bulk_sent_bytes_total", "Tensor bytes sent over the bulk data plane"
)
BULK_REQUESTS = Counter(
    "puremesh_learner_weight_bulk_requests_total",
    "Requests answered by the bulk data plane, by reply status",
    ["status"],  # BulkStatus labels: ok | not_found | out_of_range | bad_request | unavailable
)


class HeldVersion(Protocol):
    """A version's bytes, intact while held."""

    data: memoryview


class VersionSource(Protocol):
    """What the bulk server reads: the learner's version store (store.WeightStore)."""

    @property
    def closed(self) -> bool: ...

    def acquire(self, version: int) -> HeldVersion:
        """The version, held until `release`; LookupError if it is not retained."""
        ...

    def release(self, held: HeldVersion) -> None: ...

    def record_replica(self, replica_id: str, version: int | None = None, watching: int = 0) -> None: ...


class BulkServer:
    """Serves byte ranges of a VersionSource's versions over TCP (see the module docstring).
    Binds at construction (`port` 0 picks a free one; `self.port` says which).

    `payload(held, start, stop)` gives the bytes sent for [start, stop) of a version: a view of
    its buffer; tests override it to tamper with what goes out.
    """

    def __init__(
        self,
        source: VersionSource,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        io_timeout_s: float = DEFAULT_IO_TIMEOUT_S,
    ) -> None:
        self.source = source
        self.max_connections = max_connections
        self.io_timeout_s = io_timeout_s
        self._listener = _listen(host, port)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._closed = False
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"weights-bulk-accept-{self.port}", daemon=True
        )
        self._acceptor.start()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connections(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._connections)

    def payload(self, held: HeldVersion, start: int, stop: int) -> memoryview | bytes:
        return held.data[start:stop]

    def close(self, timeout: float = 2.0) -> None:
        """Stop accepting, shut down every open connection (sends in flight fail at once) and
        wait up to `timeout` s for the threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connections = dict(self._connections)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() (Linux); else the poll does
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in (self._acceptor, *connections.values()):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ threads

    def _accept_loop(self) -> None:
        try:
            while not self._closed:
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._closed:
                        return
                    log.warning("weights bulk: accept failed", exc_info=True)
                    time.sleep(ACCEPT_POLL_S)  # e.g. out of file descriptors: do not spin
                    continue
                self._admit(conn)
        finally:
            self._listener.close()

    def _admit(self, conn: socket.socket) -> None:
        conn.settimeout(self.io_timeout_s)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            refused = self._closed or len(self._connections) >= self.max_connections
            if refused:
                why = "shutting down" if self._closed else f"{self.max_connections} connections are open"
                thread = threading.Thread(
                    target=self._refuse, args=(conn, f"the learner's bulk server is {why}"), daemon=True
                )
            else:
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name=f"weights-bulk-{self.port}", daemon=True
                )
                self._connections[conn] = thread
        thread.start()

    def _refuse(self, conn: socket.socket, message: str) -> None:
        with contextlib.suppress(OSError):
            _reply_error(conn, BulkStatus.UNAVAILABLE, message)
            _close_gracefully(conn)
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        """One connection: answer requests in order until the client closes it, a request is
        malformed, or the server closes."""
        try:
            while not self._closed:
                head = bulk.recv_exact(conn, bulk.REQUEST.size, eof_ok=True)
                if head is None:
                    return
                request = bulk.unpack_request(head)
                replica_id = _read_replica_id(conn, request)
                if replica_id is None or not self._answer(conn, replica_id, request):
                    _close_gracefully(conn)
                    return
        except OSError:
            return  # the client went away, stalled past io_timeout_s, or the server closed
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()

    def _answer(self, conn: socket.socket, replica_id: str, request: bulk.Request) -> bool:
        """Answer one well-formed request; False when the connection must close."""
        source, version, offset, length = self.source, request.version, request.offset, request.length
        if self._closed or source.closed:
            _reply_error(conn, BulkStatus.UNAVAILABLE, "the learner is shutting down")
            return False
        try:
            held = source.acquire(version)  # its bytes stay intact until release
        except LookupError as error:  # VersionNotFound
            _reply_error(conn, BulkStatus.NOT_FOUND, str(error))
            return True
        try:
            total = len(held.data)
            if offset > total or length > total - offset:
                message = (
                    f"bytes [{offset}, {offset + length}) out of range: version {version} has {total} bytes"
                )
                _reply_error(conn, BulkStatus.OUT_OF_RANGE, message)
                return True
            conn.sendall(bulk.pack_reply(BulkStatus.OK, length))
            if not self._send(conn, held, offset, offset + length):
                return False
        finally:
            source.release(held)
        BULK_REQUESTS.labels(BulkStatus.OK.label).inc()
        if offset == 0 and length == total and replica_id:
            source.record_replica(replica_id, version)
        return True

    def _send(self, conn: socket.socket, held: HeldVersion, start: int, stop: int) -> bool:
        """Send [start, stop) of `held` in slices; False if a close stopped it."""
        for begin in range(start, stop, SEND_SLICE_BYTES):
            if self._closed or self.source.closed:
                return False
            end = min(begin + SEND_SLICE_BYTES, stop)
            conn.sendall(self.payload(held, begin, end))
            BULK_SENT_BYTES.inc(end - begin)
        return True


def _read_replica_id(conn: socket.socket, request: bulk.Request) -> str | None:
    """The replica id after a request header; None (after a BAD_REQUEST reply) when the
    header or the id is malformed."""
    if not request.well_formed:
        _reply_error(
            conn,
            BulkStatus.BAD_REQUEST,
            f"expected magic {bulk.MAGIC!r} protocol {bulk.PROTOCOL} and a replica id of at most "
            f"{bulk.MAX_ID_BYTES} bytes, got {request.magic!r} protocol {request.protocol} id of "
            f"{request.id_length} bytes",
        )
        return None
    raw_id = bulk.recv_exact(conn, request.id_length)
    assert raw_id is not None
    try:
        return raw_id.decode()
    except UnicodeDecodeError:
        _reply_error(conn, BulkStatus.BAD_REQUEST, "the replica id is not UTF-8")
        return None


def _reply_error(conn: socket.socket, status: BulkStatus, message: str) -> None:
    BULK_REQUESTS.labels(status.label).inc()
    conn.sendall(bulk.pack_error(status, message))


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4, IPv6 or a name; "0.0.0.0" / "::" = all)."""
    host = host.strip("[]")
    family, _, _, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    dualstack = family == socket.AF_INET6 and host in ("", "::") and socket.has_dualstack_ipv6()
    listener = socket.create_server(address[:2], family=family, backlog=128, dualstack_ipv6=dualstack)
    listener.settimeout(ACCEPT_POLL_S)
    return listener


def _close_gracefully(conn: socket.socket, linger_s: float = 1.0) -> None:
    """End our side after a final reply and read what the client still sends (up to `linger_s`
    s): closing with unread input would reset the connection, and a reset can destroy the reply
    before the client reads it."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(linger_s)
        deadline = time.monotonic() + linger_s
        while time.monotonic() < deadline and conn.recv(65536):
            pass
