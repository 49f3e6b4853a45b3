"""The learner's bulk data plane: the tensor bytes of retained versions over plain TCP.

gRPC (WeightService) stays the control plane: announcements, the manifest and the checksums
(DescribeVersion). The bytes themselves go out here, with no framing per chunk and no copy, so
that a replica receives a version about as fast as a raw socket copy of it. The protocol is part
of the contract and is specified in the file comment of weights.proto (the rollout side
implements it from there: trainer/ and services/ never import each other).

`BulkServer` listens on one TCP port. A thread accepts connections; a thread per connection
reads requests (magic, protocol, version, offset, length, replica id) and answers each with a
16-byte reply header and `socket.sendall` of a memoryview slice of the version's retained buffer
(zero copy). It holds the version (WeightPublisher.acquire / release) while it sends, so that a
publish cannot reuse the buffer mid-send. Bad requests get an error reply (NOT_FOUND,
OUT_OF_RANGE, BAD_REQUEST, UNAVAILABLE) and the server goes on serving.

WeightPublisher starts it (`bulk_host`) and `close()` stops it: the listener and every open
connection are shut down, so sends in flight stop at once.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING

from prometheus_client import Counter

if TYPE_CHECKING:
    from .weights import StoredVersion, WeightPublisher

log = logging.getLogger(__name__)

MAGIC = b"PMWB"
PROTOCOL = 1
REQUEST = struct.Struct("<4sHHQQQ")  # magic, protocol, id_length, version, offset, length
REPLY = struct.Struct("<4sHHQ")  # magic, status, reserved, length
MAX_ID_BYTES = 1024
# reply statuses (weights.proto, "Bulk data plane")
OK, NOT_FOUND, OUT_OF_RANGE, BAD_REQUEST, UNAVAILABLE = range(5)
STATUS_NAMES = {
    OK: "ok",
    NOT_FOUND: "not_found",
    OUT_OF_RANGE: "out_of_range",
    BAD_REQUEST: "bad_request",
    UNAVAILABLE: "unavailable",
}

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
    ["status"],  # ok | not_found | out_of_range | bad_request | unavailable
)


class BulkServer:
    """Serves byte ranges of a WeightPublisher's retained versions over TCP (see the module
    docstring). Binds at construction (`port` 0 picks a free one; `self.port` says which).

    `payload(stored, start, stop)` gives the bytes sent for [start, stop) of a version: a view
    of its buffer; tests override it to tamper with what goes out.
    """

    def __init__(
        self,
        publisher: WeightPublisher,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        io_timeout_s: float = DEFAULT_IO_TIMEOUT_S,
    ) -> None:
        self.publisher = publisher
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

    def payload(self, stored: StoredVersion, start: int, stop: int) -> memoryview | bytes:
        return stored.data[start:stop]

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
            self._reply_error(conn, UNAVAILABLE, message)
            _close_gracefully(conn)
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        """One connection: answer requests in order until the client closes it, a request is
        malformed, or the server closes."""
        try:
            while not self._closed:
                head = _recv_exact(conn, REQUEST.size, eof_ok=True)
                if head is None:
                    return
                magic, protocol, id_length, version, offset, length = REQUEST.unpack(head)
                if magic != MAGIC or protocol != PROTOCOL or id_length > MAX_ID_BYTES:
                    self._reply_error(
                        conn,
                        BAD_REQUEST,
                        f"expected magic {MAGIC!r} protocol {PROTOCOL} and a replica id of at most "
                        f"{MAX_ID_BYTES} bytes, got {magic!r} protocol {protocol} id of {id_length} bytes",
                    )
                    _close_gracefully(conn)
                    return
                raw_id = _recv_exact(conn, id_length)
                try:
                    replica_id = raw_id.decode()
                except UnicodeDecodeError:
                    self._reply_error(conn, BAD_REQUEST, "the replica id is not UTF-8")
                    _close_gracefully(conn)
                    return
                if not self._answer(conn, replica_id, version, offset, length):
                    _close_gracefully(conn)
                    return
        except OSError:
            return  # the client went away, stalled past io_timeout_s, or the server closed
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()

    def _answer(self, conn: socket.socket, replica_id: str, version: int, offset: int, length: int) -> bool:
        """Answer one request; False when the connection must close."""
        publisher = self.publisher
        if self._closed or publisher.closed:
            self._reply_error(conn, UNAVAILABLE, "the learner is shutting down")
            return False
        try:
            stored = publisher.acquire(version)  # its bytes stay intact until release
        except LookupError as error:  # VersionNotFound
            self._reply_error(conn, NOT_FOUND, str(error))
            return True
        try:
            total = stored.info.total_bytes
            if offset > total or length > total - offset:
                self._reply_error(
                    conn,
                    OUT_OF_RANGE,
                    f"bytes [{offset}, {offset + length}) out of range: version {version} has {total} bytes",
                )
                return True
            conn.sendall(REPLY.pack(MAGIC, OK, 0, length))
            stop = offset + length
            for start in range(offset, stop, SEND_SLICE_BYTES):
                if self._closed:
                    return False
                conn.sendall(self.payload(stored, start, min(start + SEND_SLICE_BYTES, stop)))
                BULK_SENT_BYTES.inc(min(SEND_SLICE_BYTES, stop - start))
        finally:
            publisher.release(stored)
        BULK_REQUESTS.labels(STATUS_NAMES[OK]).inc()
        if offset == 0 and length == total and replica_id:
            publisher.record_replica(replica_id, version)
        return True

    @staticmethod
    def _reply_error(conn: socket.socket, status: int, message: str) -> None:
        BULK_REQUESTS.labels(STATUS_NAMES[status]).inc()
        text = message.encode()
        conn.sendall(REPLY.pack(MAGIC, status, 0, len(text)) + text)


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


def _recv_exact(conn: socket.socket, size: int, eof_ok: bool = False) -> bytes | None:
    """Exactly `size` bytes; None on EOF before the first byte if `eof_ok`, else
    ConnectionError on EOF."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = conn.recv_into(view[got:])
        if not n:
            if eof_ok and not got:
                return None
            raise ConnectionError("the connection closed in the middle of a request")
        got += n
    return bytes(buffer)
