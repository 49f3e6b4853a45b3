"""The bulk port's authentication, both ends: TLS around the connection (when the learner has
a certificate) and the handshake of protocol 2 (when it has tokens), before any byte of
weights. The protocol is described once in weights.proto's file comment ("Authentication"),
its framing in contract/bulk.py.

The server challenges every connection with a fresh random nonce; the replica answers with an
HMAC of that nonce and its replica id, keyed by its token's SHA-256 (rpc/auth.py `hmac_key`). A
recorded answer is worthless on another connection, and the token itself never crosses the
wire. The server checks the MAC against every accepted token's key (TokenFile.keys, reloaded
when the file changes), in time independent of which one matched.
"""

from __future__ import annotations

import hmac
import secrets
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import NoReturn

from puremesh.contract import bulk
from puremesh.contract.bulk import BulkStatus

# The bytes a replica id may take (longer ids are cut, as in protocol 1's requests).
MAX_ID_BYTES = bulk.MAX_ID_BYTES


class HandshakeError(Exception):
    """The handshake failed. `unauthenticated`: the server refused the replica's credentials
    (else the peer broke the protocol)."""

    def __init__(self, message: str, unauthenticated: bool = False) -> None:
        super().__init__(message)
        self.unauthenticated = unauthenticated


# ------------------------------------------------------------------------------- server


def serve_handshake(conn: socket.socket, keys: Callable[[], Sequence[bytes]], deadline: float) -> str:
    """The server's side on an accepted connection (TLS already set up, if any): challenge,
    read the hello by `deadline` (time.monotonic()), check it. Returns the authenticated
    replica id. HandshakeError after an UNAUTHENTICATED reply (the caller closes);
    TimeoutError or OSError when the replica is too slow or gone."""
    nonce = secrets.token_bytes(bulk.NONCE_BYTES)
    conn.sendall(bulk.pack_challenge(nonce))
    head = bulk.recv_exact(conn, bulk.HELLO.size, deadline=deadline)
    assert head is not None
    hello = bulk.unpack_hello(head)
    if not hello.well_formed:
        _refuse(conn, f"expected a protocol {bulk.PROTOCOL_AUTH} hello (this bulk port authenticates)")
    raw_id = bulk.recv_exact(conn, hello.id_length, deadline=deadline)
    assert raw_id is not None
    matched = False
    for key in keys():  # every key, whatever matched before
        matched |= hmac.compare_digest(bulk.hello_mac(key, nonce, raw_id), hello.mac)
    if not matched:
        _refuse(conn, "the hello's MAC matches no accepted token")
    try:
        replica_id = raw_id.decode()
    except UnicodeDecodeError:
        _refuse(conn, "the replica id is not UTF-8")
    conn.sendall(bulk.pack_reply(BulkStatus.OK, 0))
    return replica_id


def _refuse(conn: socket.socket, message: str) -> NoReturn:
    conn.sendall(bulk.pack_error(BulkStatus.UNAUTHENTICATED, message))
    raise HandshakeError(message, unauthenticated=True)


def tls_handshake(conn: ssl.SSLSocket, timeout: float) -> None:
    """The server's TLS handshake of an accepted connection, within `timeout` s (ssl.SSLError,
    TimeoutError or OSError when it fails)."""
    conn.settimeout(timeout)
    conn.do_handshake()


# ------------------------------------------------------------------------------- client


def client_handshake(sock: socket.socket, key: bytes, replica_id: bytes) -> None:
    """The replica's side, right after connecting (and TLS): answer the challenge with the MAC
    of `key` (rpc/auth.py hmac_key of its token). HandshakeError when the server refuses or
    breaks the protocol; OSError when the connection breaks."""
    challenge = bulk.unpack_reply(_recv(sock, bulk.REPLY.size))
    if challenge.magic != bulk.MAGIC:
        raise HandshakeError(f"not a bulk weight server (magic {challenge.magic!r})")
    if challenge.status != BulkStatus.CHALLENGE or challenge.length != bulk.NONCE_BYTES:
        raise HandshakeError(
            f"expected a challenge of {bulk.NONCE_BYTES} bytes, got status {challenge.status} "
            f"of {challenge.length} bytes"
        )
    nonce = _recv(sock, bulk.NONCE_BYTES)
    sock.sendall(bulk.pack_hello(key, nonce, replica_id[:MAX_ID_BYTES]))
    verdict = bulk.unpack_reply(_recv(sock, bulk.REPLY.size))
    if verdict.status == BulkStatus.OK and verdict.length == 0:
        return
    message = _recv(sock, min(verdict.length, bulk.MAX_MESSAGE_BYTES)).decode(errors="replace")
    raise HandshakeError(message, unauthenticated=verdict.status == BulkStatus.UNAUTHENTICATED)


def _recv(sock: socket.socket, size: int) -> bytes:
    data = bulk.recv_exact(sock, size)
    assert data is not None
    return data
