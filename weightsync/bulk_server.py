"""The learner's bulk data plane: the tensor bytes of retained versions over plain TCP.

gRPC (servicer.py) stays the control plane: announcements, the manifest and the checksums. The
bytes themselves go out here, with no framing per chunk and no copy, so that a replica receives
a version about as fast as a raw socket copy of it. The protocol, with its limits, is described
in the file comment of weights.proto; its framing is contract/bulk.py.

`BulkServer` listens on one TCP port. A thread accepts connections; a thread per admitted
connection reads requests and answers each with a reply header and `socket.sendall` of
memoryview slices of the version's retained buffer (zero copy). Limits, none set by clients:

- at most `max_connections` connections, `max_connections_per_peer` per peer address; a refused
  connection gets its UNAVAILABLE reply from the accepting thread (non-blocking), no thread;
- a request header must arrive within `header_timeout_s` of its first byte, and a connection
  idle for `idle_timeout_s` between requests is closed (trickled headers hold no slot long);
- a reply must go out within `transfer_deadline(length)` (servicer.py: a grace plus a minimum
  throughput), else the connection is closed (a slow reader holds no buffer long);
- the version is held (`acquire` / `release` of its `VersionSource`, the store) only while a
  reply is sent; a publish that revokes it (store.py) shuts the connection down at once.

Bad requests get an error reply and the server goes on serving. The byte range of each reply
is noted with the store (`sent`) as it goes out; the store counts a transfer complete once the
ranges cover the version, and the replica's ConfirmVersion, with the version's SHA-256, proves
the bytes arrived (replicas.py). The composition root
(cli/learner.py) builds the server beside the store and closes it: the listener and every open
connection are shut down, so sends in flight stop at once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import Counter

from puremesh.contract import bulk
from puremesh.contract.bulk import BulkStatus

from .servicer import DEFAULT_MIN_BYTES_PER_SECOND, DEFAULT_TRANSFER_GRACE_S, transfer_deadline

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_CONNECTIONS_PER_PEER = 4
DEFAULT_HEADER_TIMEOUT_S = 5.0
DEFAULT_IDLE_TIMEOUT_S = 60.0
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
BULK_CLOSED = Counter(
    "puremesh_learner_weight_bulk_cut_connections_total",
    "Bulk connections the learner cut, by reason",
    ["reason"],  # refused | header_timeout | idle | slow_reader | revoked
)


class HeldVersion(Protocol):
    """A version's bytes, intact while held; `revoked` once a publish needs its buffer."""

    data: memoryview
    revoked: bool


class VersionSource(Protocol):
    """What the bulk server reads: the learner's version store (store.WeightStore)."""

    @property
    def closed(self) -> bool: ...

    def acquire(self, version: int) -> HeldVersion:
        """The version, held until `release`; LookupError if it is not retained."""
        ...

    def release(self, held: HeldVersion) -> None: ...

    def sent(self, replica_id: str, version: int, start: int, stop: int) -> None: ...

    def on_revoke(self, listener: Callable[[HeldVersion], None]) -> None: ...


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
        max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER,
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        transfer_grace_s: float = DEFAULT_TRANSFER_GRACE_S,
        min_bytes_per_second: float = DEFAULT_MIN_BYTES_PER_SECOND,
    ) -> None:
        self.source = source
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.header_timeout_s, self.idle_timeout_s = header_timeout_s, idle_timeout_s
        self.transfer_grace_s, self.min_bytes_per_second = transfer_grace_s, min_bytes_per_second
        self._listener = _listen(host, port)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._peers: collections.Counter[str] = collections.Counter()
        self._sending: dict[socket.socket, HeldVersion] = {}
        self._closed = False
        source.on_revoke(self._revoked)
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

    def _revoked(self, stored: HeldVersion) -> None:
        """The store revoked a version: cut the connections sending it (the store's thread)."""
        with self._lock:
            cut = [conn for conn, held in self._sending.items() if held is stored]
        for conn in cut:
            BULK_CLOSED.labels("revoked").inc()
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------------ threads

    def _accept_loop(self) -> None:
        try:
            while not self._closed:
                try:
                    conn, address = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._closed:
                        return
                    log.warning("weights bulk: accept failed", exc_info=True)
                    time.sleep(ACCEPT_POLL_S)  # e.g. out of file descriptors: do not spin
                    continue
                self._admit(conn, str(address[0]))
        finally:
            self._listener.close()

    def _admit(self, conn: socket.socket, peer: str) -> None:
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            why = self._refusal(peer)
            if why is None:
                thread = threading.Thread(
                    target=self._serve, args=(conn, peer), name=f"weights-bulk-{self.port}", daemon=True
                )
                self._connections[conn] = thread
                self._peers[peer] += 1
        if why is not None:
            BULK_CLOSED.labels("refused").inc()
            _refuse(conn, f"the learner's bulk server is {why}")
            return
        thread.start()

    def _refusal(self, peer: str) -> str | None:
        """Why a new connection from `peer` is refused, or None (called with the lock held)."""
        if self._closed:
            return "shutting down"
        if len(self._connections) >= self.max_connections:
            return f"busy: {self.max_connections} connections are open"
        if self._peers[peer] >= self.max_connections_per_peer:
            return f"busy: {self.max_connections_per_peer} connections are open from {peer}"
        return None

    def _serve(self, conn: socket.socket, peer: str) -> None:
        """One connection: answer requests in order until the client closes it, a request is
        malformed or late, a reply is read too slowly, or the server closes."""
        try:
            while not self._closed:
                request = self._read_request(conn)
                if request is None:
                    return
                head, replica_id = request
                if replica_id is None or not self._answer(conn, replica_id, head):
                    _close_gracefully(conn)
                    return
        except OSError:
            return  # the client went away or stalled, or the server closed
        finally:
            with self._lock:
                self._connections.pop(conn, None)
                self._peers[peer] -= 1
                if not self._peers[peer]:
                    del self._peers[peer]
            conn.close()

    def _read_request(self, conn: socket.socket) -> tuple[bulk.Request, str | None] | None:
        """The next request and its replica id (None after a BAD_REQUEST reply); None when the
        client closed the connection or it stayed idle for idle_timeout_s."""
        conn.settimeout(self.idle_timeout_s)
        try:
            first = conn.recv(1)
        except TimeoutError:
            BULK_CLOSED.labels("idle").inc()
            return None
        if not first:
            return None
        deadline = time.monotonic() + self.header_timeout_s
        try:
            rest = bulk.recv_exact(conn, bulk.REQUEST.size - 1, deadline=deadline)
            assert rest is not None
            head = bulk.unpack_request(first + rest)
            return head, _read_replica_id(conn, head, deadline)
        except TimeoutError:
            BULK_CLOSED.labels("header_timeout").inc()
            return None

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
            with self._lock:
                self._sending[conn] = held
            if replica_id:  # noted before the send: the replica may confirm before it returns
                source.sent(replica_id, version, offset, offset + length)
            if not self._send(conn, held, offset, offset + length):
                return False
        finally:
            with self._lock:
                self._sending.pop(conn, None)
            source.release(held)
        BULK_REQUESTS.labels(BulkStatus.OK.label).inc()
        return True

    def _send(self, conn: socket.socket, held: HeldVersion, start: int, stop: int) -> bool:
        """The reply header and [start, stop) of `held`, in slices, all within the transfer
        deadline; False if a close stopped it. OSError when the deadline passed or the
        connection was cut (revoked)."""
        limit = transfer_deadline(stop - start, self.transfer_grace_s, self.min_bytes_per_second)
        deadline = time.monotonic() + limit
        _send_by(conn, bulk.pack_reply(BulkStatus.OK, stop - start), deadline)
        for begin in range(start, stop, SEND_SLICE_BYTES):
            if self._closed or self.source.closed or held.revoked:
                return False
            end = min(begin + SEND_SLICE_BYTES, stop)
            _send_by(conn, self.payload(held, begin, end), deadline)
            BULK_SENT_BYTES.inc(end - begin)
        return True


def _send_by(conn: socket.socket, data: memoryview | bytes, deadline: float) -> None:
    """sendall, all of it before `deadline` (time.monotonic()); TimeoutError otherwise."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the transfer deadline passed")
    conn.settimeout(left)  # sendall's timeout bounds the whole call (Python >= 3.5)
    try:
        conn.sendall(data)
    except TimeoutError:
        BULK_CLOSED.labels("slow_reader").inc()
        raise


def _read_replica_id(conn: socket.socket, request: bulk.Request, deadline: float) -> str | None:
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
    raw_id = bulk.recv_exact(conn, request.id_length, deadline=deadline)
    assert raw_id is not None
    try:
        return raw_id.decode()
    except UnicodeDecodeError:
        _reply_error(conn, BulkStatus.BAD_REQUEST, "the replica id is not UTF-8")
        return None


def _reply_error(conn: socket.socket, status: BulkStatus, message: str) -> None:
    BULK_REQUESTS.labels(status.label).inc()
    conn.sendall(bulk.pack_error(status, message))


def _refuse(conn: socket.socket, message: str) -> None:
    """Refuse a connection from the accepting thread: one non-blocking UNAVAILABLE reply (it
    fits the socket buffer), read what already came (closing with unread input would reset the
    connection before the client reads the reply), close."""
    BULK_REQUESTS.labels(BulkStatus.UNAVAILABLE.label).inc()
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(bulk.pack_error(BulkStatus.UNAVAILABLE, message))
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1 << 16)
    conn.close()


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
