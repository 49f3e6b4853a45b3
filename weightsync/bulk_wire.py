"""The bulk server's socket work (bulk_server.py): its reply and cut-connection metrics, error
replies, the refusal of a connection from the accepting thread, the listening socket, sends
bounded by a deadline, the replica id after a request header, and the graceful close after a
final reply. The protocol: weights.proto's file comment; its framing: contract/bulk.py.
"""

from __future__ import annotations

import contextlib
import socket
import time

from prometheus_client import Counter

from puremesh.contract import bulk
from puremesh.contract.bulk import BulkStatus

ACCEPT_POLL_S = 0.5

BULK_REQUESTS = Counter(
    "puremesh_learner_weight_bulk_requests_total",
    "Requests answered by the bulk data plane, by reply status",
    ["status"],  # BulkStatus labels: ok | not_found | out_of_range | bad_request | unavailable
    # | unauthenticated
)
BULK_CLOSED = Counter(
    "puremesh_learner_weight_bulk_cut_connections_total",
    "Bulk connections the learner cut, by reason",
    ["reason"],  # refused | header_timeout | idle | slow_reader | revoked | tls | unauthenticated
)


def send_by(conn: socket.socket, data: memoryview | bytes, deadline: float) -> None:
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


def read_replica_id(
    conn: socket.socket, request: bulk.Request, deadline: float, protocol: int, identity: str | None
) -> str | None:
    """The replica id after a request header; None (after a BAD_REQUEST reply) when the
    header or the id is malformed, or not the id the connection authenticated."""
    if not request.conforms(protocol):
        reply_error(
            conn,
            BulkStatus.BAD_REQUEST,
            f"expected magic {bulk.MAGIC!r} protocol {protocol} and a replica id of at most "
            f"{bulk.MAX_ID_BYTES} bytes, got {request.magic!r} protocol {request.protocol} id of "
            f"{request.id_length} bytes",
        )
        return None
    raw_id = bulk.recv_exact(conn, request.id_length, deadline=deadline)
    assert raw_id is not None
    try:
        replica_id = raw_id.decode()
    except UnicodeDecodeError:
        reply_error(conn, BulkStatus.BAD_REQUEST, "the replica id is not UTF-8")
        return None
    if identity is not None and replica_id != identity:
        reply_error(
            conn, BulkStatus.BAD_REQUEST, "the replica id is not the one this connection authenticated"
        )
        return None
    return replica_id


def reply_error(conn: socket.socket, status: BulkStatus, message: str) -> None:
    BULK_REQUESTS.labels(status.label).inc()
    conn.sendall(bulk.pack_error(status, message))


def refuse(conn: socket.socket, message: str) -> None:
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


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4, IPv6 or a name; "0.0.0.0" / "::" = all)."""
    host = host.strip("[]")
    family, _, _, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    dualstack = family == socket.AF_INET6 and host in ("", "::") and socket.has_dualstack_ipv6()
    listener = socket.create_server(address[:2], family=family, backlog=128, dualstack_ipv6=dualstack)
    listener.settimeout(ACCEPT_POLL_S)
    return listener


def close_gracefully(conn: socket.socket, linger_s: float = 1.0) -> None:
    """End our side after a final reply and read what the client still sends (up to `linger_s`
    s): closing with unread input would reset the connection, and a reset can destroy the reply
    before the client reads it."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(linger_s)
        deadline = time.monotonic() + linger_s
        while time.monotonic() < deadline and conn.recv(65536):
            pass
