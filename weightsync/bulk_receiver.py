"""The replica's receiver of the learner's bulk data plane (the protocol: weights.proto's file
comment; its framing: contract/bulk.py).

`BulkReceiver` downloads one version's bytes over a plain TCP connection, on a worker thread:
blocking `recv_into` straight into the preallocated buffer (no framing, no copy), and, as each
CRC-32 chunk has fully arrived, a check of that chunk on a second thread (checking overlaps with
receiving). Chunks that fail their CRC-32 are asked for again by byte range on the same
connection, up to `max_attempts` passes. The checker also folds the chunks of the first pass,
in order, into the whole version's SHA-256 (`sha256()`, recomputed from the buffer only when a
chunk had to be asked for again), which the bulk transport compares with the announced one.
Any failure raises `BulkError` with a reason, and the bulk transport (tcp_bulk.py) falls back
to FetchWeights. Before any request the connection is wrapped in TLS (`tls`, when the learner
announces bulk_tls) and authenticated with protocol 2's handshake (`key`, when it announces
bulk_protocol 2; bulk_auth.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

from puremesh.contract import bulk
from puremesh.contract.bulk import BulkStatus, crc32
from puremesh.contract.weights import chunk_count, chunk_range

from .bulk_auth import HandshakeError, client_handshake

RECV_BYTES = 4 << 20  # the most bytes asked of one recv_into
# BulkError.reason per reply status; any other is "protocol"
STATUS_REASONS = {BulkStatus.NOT_FOUND: "not_found", BulkStatus.UNAVAILABLE: "unavailable"}


class BulkError(Exception):
    """The bulk path failed; fall back to FetchWeights.

    reason (a bounded metric label): connect (refused, unreachable, timed out), describe
    (DescribeVersion failed), not_found (version no longer retained), unavailable (the learner
    refused: shutting down or busy), protocol (a reply or layout that breaks the contract),
    io (the connection broke or stalled), checksum (chunks still failing after the allowed
    passes), sha256 (every chunk matched its CRC-32, the whole version not its SHA-256), tls
    (the TLS handshake failed: e.g. a certificate this replica does not trust), or unauthenticated
    (the learner refused this replica's token).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BulkReceiver:
    """One download of `version` from the bulk server at `address` into `buffer` (writable, the
    version's total_bytes long), each chunk checked against its CRC-32.

    `run()` does it all on the calling (worker) thread and returns once every chunk matches.
    The layout (`set_layout`: the chunk size and the CRC-32s, from DescribeVersion) may come
    while `run()` already receives: the bytes do not wait for it, only the checks do. `abort()`,
    from any thread, makes a running `run()` fail at once. `checker` runs the CRC-32 checks
    (one thread is enough: ISA-L checks about 20 GB/s, zlib about 4).
    """

    def __init__(
        self,
        address: tuple[str, int],
        replica_id: str,
        version: int,
        buffer: memoryview,
        checker: ThreadPoolExecutor,
        *,
        max_attempts: int,
        connect_timeout_s: float,
        io_timeout_s: float,
        tls: ssl.SSLContext | None = None,
        server_name: str = "",
        key: bytes | None = None,
    ) -> None:
        self.address = address
        self.tls, self.server_name, self.key = tls, server_name or address[0], key
        self.version = version
        self.total = len(buffer)
        self._id = replica_id.encode()[: bulk.MAX_ID_BYTES]
        self._view = buffer
        self._checker = checker
        self.max_attempts = max(1, max_attempts)
        self.connect_timeout_s = connect_timeout_s
        self.io_timeout_s = io_timeout_s
        self.received_bytes = 0  # refetches included
        self.retried_chunks = 0
        self.chunk_bytes = 0
        self._crc32: list[int] = []
        self._layout = threading.Event()
        self._hash = hashlib.sha256()
        self._hashed = 0  # chunks [0, _hashed) are folded into _hash, in order
        self._hash_intact = True  # False once a chunk failed: the hash is recomputed at the end
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._aborted = False

    def set_layout(self, chunk_bytes: int, chunk_crc32: Sequence[int]) -> None:
        """The chunk size and every chunk's CRC-32; BulkError if they do not fit the buffer."""
        count = chunk_count(self.total, chunk_bytes) if chunk_bytes > 0 else -1
        if len(chunk_crc32) != count:
            raise BulkError(
                "protocol",
                f"{len(chunk_crc32)} chunk CRC-32s for {self.total} bytes in chunks of {chunk_bytes}",
            )
        self.chunk_bytes = chunk_bytes
        self._crc32 = list(chunk_crc32)
        self._layout.set()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sock = self._sock
        self._layout.set()  # a run() waiting for the layout stops waiting
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        sock = self._connect()
        try:
            bad = self._receive([(0, self.total)])
            attempt = 1
            while bad:
                if attempt >= self.max_attempts:
                    raise BulkError(
                        "checksum",
                        f"version {self.version}: chunks {bad[:8]} still fail their CRC-32 after "
                        f"{attempt} passes",
                    )
                self.retried_chunks += len(bad)
                bad = self._receive(bulk.chunk_ranges(bad, self.chunk_bytes, self.total))
                attempt += 1
        except OSError as error:
            if self._aborted:
                raise BulkError("io", "aborted") from error
            raise BulkError("io", f"bulk transfer from {self._where()} broke: {error!r}") from error
        finally:
            with self._lock:
                self._sock = None
            sock.close()

    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection(self.address, timeout=self.connect_timeout_s)
        except OSError as error:
            raise BulkError("connect", f"cannot connect to the bulk port {self._where()}: {error}") from error
        try:
            sock = self._secure(sock)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.io_timeout_s)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sock = sock
            aborted = self._aborted
        if aborted:
            sock.close()
            raise BulkError("io", "aborted")
        return sock

    def _secure(self, sock: socket.socket) -> socket.socket:
        """TLS (within the connect timeout), then the handshake, when the learner asks for them."""
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_name)
            if self.key is not None:
                client_handshake(sock, self.key, self._id)
        except ssl.SSLError as error:
            raise BulkError("tls", f"TLS with the bulk port {self._where()} failed: {error}") from error
        except HandshakeError as error:
            reason = "unauthenticated" if error.unauthenticated else "protocol"
            raise BulkError(reason, f"bulk port {self._where()}: {error}") from error
        except (OSError, ConnectionError) as error:
            raise BulkError("io", f"bulk port {self._where()} broke the handshake: {error!r}") from error
        return sock

    def _receive(self, ranges: list[tuple[int, int]]) -> list[int]:
        """Ask for `ranges` (each starting on a chunk boundary), one request at a time; check
        each chunk as soon as it has arrived (and the layout is known). Returns the chunks
        whose CRC-32 fails."""
        checks: list[tuple[int, Future[bool]]] = []
        try:
            for start, stop in ranges:
                self._receive_range(checks, start, stop)
            bad = [index for index, check in checks if not check.result()]
        finally:
            wait([check for _, check in checks])  # nothing reads the buffer after we return
        return bad

    def _receive_range(self, checks: list[tuple[int, Future[bool]]], start: int, stop: int) -> None:
        """One request and its reply, straight into the buffer; the checks go to `checks`."""
        assert self._sock is not None
        sock, view = self._sock, self._view
        protocol = bulk.PROTOCOL_AUTH if self.key is not None else bulk.PROTOCOL
        sock.sendall(bulk.pack_request(self.version, start, stop - start, self._id, protocol))
        self._read_reply_header(sock, stop - start)
        pos = start
        index = -1  # the next chunk of this range to check; -1 until the layout is known
        while pos < stop:
            n = sock.recv_into(view[pos:stop], min(stop - pos, RECV_BYTES))
            if not n:
                raise BulkError("io", f"{self._where()} closed the connection in the middle of a reply")
            pos += n
            self.received_bytes += n
            if index < 0 and self._layout.is_set():
                index = start // self.chunk_bytes
            if index >= 0:
                index = self._check_arrived(checks, index, stop, pos)
        if index < 0:  # every byte came before DescribeVersion answered
            if not self._layout.wait(self.io_timeout_s) or self._aborted:
                raise BulkError("io", "aborted before the layout came")
            index = start // self.chunk_bytes
        self._check_arrived(checks, index, stop, stop)

    def _check_arrived(self, checks: list[tuple[int, Future[bool]]], index: int, stop: int, pos: int) -> int:
        """Submit the checks of chunks index, index + 1, ... of a range ending at `stop` that
        lie below `pos` (all received); returns the next chunk to check."""
        size, total = self.chunk_bytes, self.total
        # (a version of 0 bytes has one empty chunk)
        while (index * size < stop or index == stop == 0) and min((index + 1) * size, total) <= pos:
            checks.append((index, self._checker.submit(self._check, index)))
            index += 1
        return index

    def _check(self, index: int) -> bool:
        """The checker thread (one, so chunks come in submission order)."""
        start, stop = chunk_range(index, self.chunk_bytes, self.total)
        ok = crc32(self._view[start:stop]) == self._crc32[index]
        if self._hash_intact and index == self._hashed:
            if ok:
                self._hash.update(self._view[start:stop])
                self._hashed += 1
            else:
                self._hash_intact = False
        return ok

    def sha256(self) -> str:
        """The hex SHA-256 of the whole buffer, once `run()` returned (on a worker thread: it may
        hash the whole buffer again)."""
        if self._hash_intact and self._hashed == chunk_count(self.total, self.chunk_bytes):
            return self._hash.hexdigest()
        return hashlib.sha256(self._view).hexdigest()

    def _read_reply_header(self, sock: socket.socket, expected: int) -> None:
        reply = bulk.unpack_reply(_recv_exact(sock, bulk.REPLY.size))
        if reply.magic != bulk.MAGIC:
            raise BulkError(
                "protocol", f"{self._where()} is not a bulk weight server (reply magic {reply.magic!r})"
            )
        if reply.status == BulkStatus.OK:
            if reply.length != expected:
                raise BulkError("protocol", f"asked for {expected} bytes, the reply announces {reply.length}")
            return
        message = _recv_exact(sock, min(reply.length, bulk.MAX_MESSAGE_BYTES)).decode(errors="replace")
        reason = STATUS_REASONS.get(reply.status, "protocol")
        raise BulkError(reason, f"bulk server {self._where()}: {message}")


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    try:
        data = bulk.recv_exact(sock, size)
    except ConnectionError as error:
        raise BulkError("io", "the bulk server closed the connection in the middle of a reply") from error
    assert data is not None
    return data


def target_host(target: str) -> str | None:
    """The host part of a gRPC target ("host:port", "dns:///host:port", "ipv4:a.b.c.d:port",
    "[::1]:port", "host"); None for targets without one (e.g. "unix:path")."""
    scheme, colon, after = target.partition(":")
    rest = target
    if scheme in ("dns", "ipv4", "ipv6") and colon:
        rest = after
        if rest.startswith("//"):  # dns://authority/host:port
            rest = rest[2:].partition("/")[2]
        rest = rest.split(",")[0]  # ipv4:a:port,b:port: the first
    elif scheme in ("unix", "unix-abstract", "vsock") or "://" in target:
        return None
    if rest.startswith("["):
        end = rest.find("]")
        host = rest[1:end] if end > 0 else ""
    elif rest.count(":") <= 1:
        host = rest.partition(":")[0]
    else:  # a bare IPv6 address, no port
        host = rest
    return host or None
