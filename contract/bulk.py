"""The bulk data plane's framing, written once for the learner's server and the replica's
receiver. The protocol itself is described in the file comment of
protos/puremesh/weights/v1/weights.proto ("Bulk data plane", "Authentication"); this module holds
its constants, the request and reply structs, the reply status codes, the authenticated
handshake of protocol 2 (challenge, hello, its HMAC), and the CRC-32 that checks every chunk.

`crc32` is ISA-L's (the same values as zlib.crc32, about five times faster), zlib's where the
isal wheel is missing: the one CRC-32 import of the tree.

Pure: the standard library (+ isal), plain values in and out (docs/LAYOUT.md); `recv_exact`
reads from a socket the caller owns.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import socket
import struct
import time
from collections.abc import Sequence
from typing import NamedTuple

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - a platform without the isal wheel
    from zlib import crc32

__all__ = [
    "HELLO",
    "MAGIC",
    "MAX_ID_BYTES",
    "MAX_MESSAGE_BYTES",
    "NONCE_BYTES",
    "PROTOCOL",
    "PROTOCOL_AUTH",
    "REPLY",
    "REQUEST",
    "BulkStatus",
    "Hello",
    "Reply",
    "Request",
    "chunk_ranges",
    "crc32",
    "hello_mac",
    "pack_challenge",
    "pack_error",
    "pack_hello",
    "pack_reply",
    "pack_request",
    "recv_exact",
    "unpack_hello",
    "unpack_reply",
    "unpack_request",
]

MAGIC = b"PMWB"
PROTOCOL = 1
REQUEST = struct.Struct("<4sHHQQQ")  # magic, protocol, id_length, version, offset, length
REPLY = struct.Struct("<4sHHQ")  # magic, status, reserved, length
MAX_ID_BYTES = 1024
# Protocol 2: protocol 1's requests and replies after an authenticated handshake (weights.proto).
PROTOCOL_AUTH = 2
NONCE_BYTES = 32
HELLO = struct.Struct("<4sHH32s")  # magic, protocol, id_length, mac (HMAC-SHA256)
MAC_CONTEXT = b"puremesh-bulk-v2"
MAX_MESSAGE_BYTES = 64 << 10  # the longest error message a receiver reads from a reply


class BulkStatus(enum.IntEnum):
    """The reply status codes (weights.proto, "Bulk data plane")."""

    OK = 0
    NOT_FOUND = 1  # the version is not retained
    OUT_OF_RANGE = 2  # offset + length is past the version's total_bytes
    BAD_REQUEST = 3  # wrong magic, protocol or replica id; the server then closes
    UNAVAILABLE = 4  # shutting down or too many connections; the server then closes
    CHALLENGE = 5  # protocol 2: the server's first message, a nonce to answer with a hello
    UNAUTHENTICATED = 6  # protocol 2: no valid hello; the server then closes

    @property
    def label(self) -> str:
        """The metric label: "ok", "not_found", ..."""
        return self.name.lower()


class Request(NamedTuple):
    """A request header (the replica id follows it on the wire, id_length bytes)."""

    magic: bytes
    protocol: int
    id_length: int
    version: int
    offset: int
    length: int

    @property
    def well_formed(self) -> bool:
        """A protocol 1 request (see `conforms`)."""
        return self.conforms(PROTOCOL)

    def conforms(self, protocol: int) -> bool:
        """The magic, `protocol` (the connection's) and an id of at most MAX_ID_BYTES."""
        return self.magic == MAGIC and self.protocol == protocol and self.id_length <= MAX_ID_BYTES


class Reply(NamedTuple):
    """A reply header: `length` bytes follow (the data, or an error message)."""

    magic: bytes
    status: int
    length: int


def pack_request(
    version: int, offset: int, length: int, replica_id: bytes, protocol: int = PROTOCOL
) -> bytes:
    """A whole request of the connection's `protocol`: the header and the replica id (at most
    MAX_ID_BYTES)."""
    if len(replica_id) > MAX_ID_BYTES:
        raise ValueError(f"a replica id of {len(replica_id)} bytes; at most {MAX_ID_BYTES}")
    return REQUEST.pack(MAGIC, protocol, len(replica_id), version, offset, length) + replica_id


def unpack_request(head: bytes) -> Request:
    return Request(*REQUEST.unpack(head))


def pack_reply(status: BulkStatus, length: int) -> bytes:
    """The reply header of a reply carrying `length` bytes."""
    return REPLY.pack(MAGIC, status, 0, length)


def pack_error(status: BulkStatus, message: str) -> bytes:
    """A whole error reply: the header and the UTF-8 message."""
    text = message.encode()
    return pack_reply(status, len(text)) + text


def unpack_reply(head: bytes) -> Reply:
    magic, status, _, length = REPLY.unpack(head)
    return Reply(magic, status, length)


class Hello(NamedTuple):
    """A replica's answer to the challenge (the replica id, id_length bytes, follows it)."""

    magic: bytes
    protocol: int
    id_length: int
    mac: bytes

    @property
    def well_formed(self) -> bool:
        return self.magic == MAGIC and self.protocol == PROTOCOL_AUTH and self.id_length <= MAX_ID_BYTES


def pack_challenge(nonce: bytes) -> bytes:
    """The server's challenge: a reply header (CHALLENGE, reserved = PROTOCOL_AUTH) and the nonce."""
    return REPLY.pack(MAGIC, BulkStatus.CHALLENGE, PROTOCOL_AUTH, len(nonce)) + nonce


def hello_mac(key: bytes, nonce: bytes, replica_id: bytes) -> bytes:
    """HMAC-SHA256 of the challenge's nonce and the replica id, keyed by SHA-256(token)."""
    return hmac.new(key, MAC_CONTEXT + nonce + replica_id, hashlib.sha256).digest()


def pack_hello(key: bytes, nonce: bytes, replica_id: bytes) -> bytes:
    """A whole hello: the header with the MAC, and the replica id (at most MAX_ID_BYTES)."""
    if len(replica_id) > MAX_ID_BYTES:
        raise ValueError(f"a replica id of {len(replica_id)} bytes; at most {MAX_ID_BYTES}")
    mac = hello_mac(key, nonce, replica_id)
    return HELLO.pack(MAGIC, PROTOCOL_AUTH, len(replica_id), mac) + replica_id


def unpack_hello(head: bytes) -> Hello:
    return Hello(*HELLO.unpack(head))


def chunk_ranges(indices: Sequence[int], chunk_bytes: int, total: int) -> list[tuple[int, int]]:
    """Byte ranges [start, stop) covering the chunks `indices`, adjacent ones merged."""
    ranges: list[tuple[int, int]] = []
    for index in sorted(indices):
        start, stop = index * chunk_bytes, min((index + 1) * chunk_bytes, total)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return ranges


def recv_exact(
    conn: socket.socket, size: int, eof_ok: bool = False, deadline: float | None = None
) -> bytes | None:
    """Exactly `size` bytes from `conn`; None on EOF before the first byte if `eof_ok`,
    ConnectionError on any other EOF. With a `deadline` (time.monotonic()), TimeoutError once it
    passes, however the bytes trickle in (the socket's timeout is set to what is left)."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{got} of {size} bytes arrived before the deadline")
            conn.settimeout(left)
        n = conn.recv_into(view[got:])
        if not n:
            if eof_ok and not got:
                return None
            raise ConnectionError("the connection closed in the middle of a message")
        got += n
    return bytes(buffer)
