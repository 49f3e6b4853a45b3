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

Authentication (weights.proto, "Authentication"; bulk_auth.py): with `tls` every connection is
TLS, its handshake done by the connection's thread within header_timeout_s; with `keys` (the
accepted tokens) every connection must pass protocol 2's handshake before any byte of weights
goes out, and its requests must carry the replica id it authenticated (the one whose transfers
count, replicas.py). A failed handshake gets UNAUTHENTICATED and the connection is closed.

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
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from prometheus_client import Counter

from puremesh.contract import bulk
from puremesh.contract.bulk import BulkStatus

from .bulk_auth import HandshakeError, serve_handshake, tls_handshake
from .bulk_wire import (
    ACCEPT_POLL_S,
    BULK_CLOSED,
    BULK_REQUESTS,
    close_gracefully,
    listen,
    read_replica_id,
    refuse,
    reply_error,
    send_by,
)
from .servicer import DEFAULT_MIN_BYTES_PER_SECOND, DEFAULT_TRANSFER_GRACE_S, transfer_deadline

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_CONNECTIONS_PER_PEER = 4
DEFAULT_HEADER_TIMEOUT_S = 5.0
DEFAULT_IDLE_TIMEOUT_S = 60.0
# Bytes per sendall: bounds how long close() waits for a send in flight to notice.
SEND_SLICE_BYTES = 4 << 20

BULK_SENT_BYTES = Counter(
    "puremesh_learner_weight_bulk_sent_bytes_total", "Tensor bytes sent over the bulk data plane"
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
    its buffer; tests override it to tamper with what goes out. `tls` gives the TLS context of
    each new connection (rpc/auth.py server_ssl_context: it follows certificate renewals);
    `keys` gives the accepted tokens' keys (rpc/auth.py TokenFile.keys), which makes every
    connection authenticate (protocol 2).
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
        tls: Callable[[], ssl.SSLContext] | None = None,
        keys: Callable[[], Sequence[bytes]] | None = None,
    ) -> None:
        self.source = source
        self.tls, self.keys = tls, keys
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.header_timeout_s, self.idle_timeout_s = header_timeout_s, idle_timeout_s
        self.transfer_grace_s, self.min_bytes_per_second = transfer_grace_s, min_bytes_per_second
        self._listener = listen(host, port)
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
    def protocol(self) -> int:
        """The protocol announced to replicas: 2 (authenticated) with keys, else 1."""
        return bulk.PROTOCOL_AUTH if self.keys is not None else bulk.PROTOCOL

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
        if self.tls is not None:  # the handshake runs on the connection's thread
            try:
                conn = self.tls().wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            except OSError:
                conn.close()
                return
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
            refuse(conn, f"the learner's bulk server is {why}")
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
            identity = self._authenticate(conn)
            if identity is None:
                return
            while not self._closed:
                request = self._read_request(conn, *identity)
                if request is None:
                    return
                head, replica_id = request
                if replica_id is None or not self._answer(conn, replica_id, head):
                    close_gracefully(conn)
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

    def _authenticate(self, conn: socket.socket) -> tuple[int, str | None] | None:
        """TLS and the handshake (module docstring): (the connection's protocol, the replica id
        it authenticated or None without keys); None when the connection must close."""
        try:
            if isinstance(conn, ssl.SSLSocket):
                tls_handshake(conn, self.header_timeout_s)
            if self.keys is None:
                return bulk.PROTOCOL, None
            deadline = time.monotonic() + self.header_timeout_s
            return bulk.PROTOCOL_AUTH, serve_handshake(conn, self.keys, deadline)
        except HandshakeError:
            BULK_REQUESTS.labels("unauthenticated").inc()
            BULK_CLOSED.labels("unauthenticated").inc()
            close_gracefully(conn)
        except ssl.SSLError:
            BULK_CLOSED.labels("tls").inc()
        except TimeoutError:
            BULK_CLOSED.labels("header_timeout").inc()
        return None

    def _read_request(
        self, conn: socket.socket, protocol: int, identity: str | None
    ) -> tuple[bulk.Request, str | None] | None:
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
            return head, read_replica_id(conn, head, deadline, protocol, identity)
        except TimeoutError:
            BULK_CLOSED.labels("header_timeout").inc()
            return None

    def _answer(self, conn: socket.socket, replica_id: str, request: bulk.Request) -> bool:
        """Answer one well-formed request; False when the connection must close."""
        source, version, offset, length = self.source, request.version, request.offset, request.length
        if self._closed or source.closed:
            reply_error(conn, BulkStatus.UNAVAILABLE, "the learner is shutting down")
            return False
        try:
            held = source.acquire(version)  # its bytes stay intact until release
        except LookupError as error:  # VersionNotFound
            reply_error(conn, BulkStatus.NOT_FOUND, str(error))
            return True
        try:
            total = len(held.data)
            if offset > total or length > total - offset:
                message = (
                    f"bytes [{offset}, {offset + length}) out of range: version {version} has {total} bytes"
                )
                reply_error(conn, BulkStatus.OUT_OF_RANGE, message)
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
        send_by(conn, bulk.pack_reply(BulkStatus.OK, stop - start), deadline)
        for begin in range(start, stop, SEND_SLICE_BYTES):
            if self._closed or self.source.closed or held.revoked:
                return False
            end = min(begin + SEND_SLICE_BYTES, stop)
            send_by(conn, self.payload(held, begin, end), deadline)
            BULK_SENT_BYTES.inc(end - begin)
        return True
