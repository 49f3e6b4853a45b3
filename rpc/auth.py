"""Authentication and encryption of every puremesh endpoint (README "Security" has the threat
model and what each endpoint requires).

Server side:
    TokenFile       the accepted bearer tokens: one per line, `#` comments, reloaded when the
                    file changes (rotation needs no restart); `accepts` compares in constant time
                    (each presented token is hashed, and its digest compared with every
                    accepted one's, whatever matched before)
    Authenticator   checks `authorization: Bearer <token>` metadata; the refusal names what is
                    wrong, never the token
    server_credentials / server_ssl_context   TLS (and mTLS) for gRPC / for the bulk port;
                    the certificate files are read again when they change (cert-manager renews
                    them in place), for every new connection
    check_exposure  refuses a non-loopback bind without TLS and tokens unless `insecure`

Client side:
    TokenSource     the token of a client's token file (first line), read again when it changes
    channel_credentials / client_ssl_context   TLS (and a client certificate) for gRPC / bulk

A token travels as gRPC metadata (rpc/client.py `call_metadata`), so it passes a Ray Serve
proxy to the deployments, which check it with the same host logic (rpc/server.py).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from .errors import Unauthenticated
from .settings import ClientSecurity, ServerSecurity

log = logging.getLogger(__name__)

# How often a token or certificate file is checked for changes (one stat per interval).
RELOAD_INTERVAL_S = 1.0
# Shorter tokens are refused: they could be guessed. `openssl rand -hex 32` makes 64 characters.
MIN_TOKEN_CHARS = 16
AUTHORIZATION = "authorization"
BEARER = "Bearer "


class SecurityError(Exception):
    """A security setting cannot be applied: a missing or unreadable file, no usable token, an
    exposed plaintext bind. The message names the setting or file, never a token."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SecurityError(f"cannot read {what} {path}: {error.strerror}") from error


def _token_lines(text: str) -> list[str]:
    """The tokens of a token file: stripped lines, blank lines and `#` comments skipped."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class _Watched:
    """A file read again when its (inode, size, mtime) changes, checked at most every
    RELOAD_INTERVAL_S; `load(data)` turns its bytes into the value."""

    def __init__(self, path: str, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.what, self.clock = path, what, clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = float("-inf")

    def _stat(self) -> tuple[int, int, int]:
        try:
            info = os.stat(self.path)
        except OSError as error:
            raise SecurityError(f"cannot read {self.what} {self.path}: {error.strerror}") from error
        return info.st_ino, info.st_size, info.st_mtime_ns

    def changed(self) -> bool:
        """Whether the file changed since the last `changed()` that said so (first call: True).
        A file that went missing counts as unchanged (logged): the last good content stays."""
        now = self.clock()
        with self._lock:
            if now - self._checked < RELOAD_INTERVAL_S and self._stamp is not None:
                return False
            self._checked = now
            try:
                stamp = self._stat()
            except SecurityError:
                if self._stamp is None:
                    raise
                log.warning("%s %s is unreadable; keeping its last content", self.what, self.path)
                return False
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            return True


class TokenFile:
    """The accepted tokens of a server (module docstring). Empty or too-short tokens make the
    first load fail (SecurityError); a later reload that finds none refuses every call."""

    def __init__(self, path: str) -> None:
        self._file = _Watched(path, "token file")
        self._digests: tuple[bytes, ...] = ()
        self._refresh(first=True)

    @property
    def path(self) -> str:
        return self._file.path

    def _refresh(self, first: bool = False) -> None:
        if not self._file.changed():
            return
        try:
            tokens = _token_lines(_read(self.path, "token file").decode("utf-8", errors="replace"))
        except SecurityError:
            if first:
                raise
            log.warning("token file %s is unreadable; keeping the tokens it held", self.path)
            return
        usable = [t for t in tokens if len(t) >= MIN_TOKEN_CHARS]
        if len(usable) < len(tokens):
            log.warning(
                "token file %s: %d token(s) shorter than %d characters ignored",
                self.path, len(tokens) - len(usable), MIN_TOKEN_CHARS,
            )  # fmt: skip
        if first and not usable:
            raise SecurityError(
                f"token file {self.path} holds no token of at least {MIN_TOKEN_CHARS} characters"
            )
        if not first:
            log.info("token file %s reloaded: %d token(s)", self.path, len(usable))
        self._digests = tuple(_digest(t) for t in usable)

    def accepts(self, token: str) -> bool:
        """Whether `token` is one of the file's, in time independent of which one and of how
        much of it matches."""
        self._refresh()
        presented = _digest(token)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(digest, presented)
        return found

    def keys(self) -> tuple[bytes, ...]:
        """Every accepted token's SHA-256 digest: the HMAC keys of the bulk port's handshake
        (contract/bulk.py), derived the same way on the replica (`hmac_key`)."""
        self._refresh()
        return self._digests


def hmac_key(token: str) -> bytes:
    """The key a token proves itself with on the bulk port (TokenFile.keys on the server)."""
    return _digest(token)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() == AUTHORIZATION:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            return text[len(BEARER) :].strip() if text.startswith(BEARER) else ""
    return None


class Authenticator:
    """The token check of one server (rpc/server.py calls `refusal` before any work)."""

    def __init__(self, tokens: TokenFile | None) -> None:
        self.tokens = tokens

    @classmethod
    def from_settings(cls, security: ServerSecurity) -> Authenticator:
        return cls(TokenFile(security.auth_tokens) if security.auth_tokens else None)

    @property
    def required(self) -> bool:
        return self.tokens is not None

    def refusal(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Unauthenticated | None:
        """Why a call with `metadata` is refused (missing or wrong token), or None."""
        if self.tokens is None:
            return None
        token = bearer_token(metadata)
        if not token:
            return Unauthenticated("missing bearer token (metadata `authorization: Bearer <token>`)")
        if not self.tokens.accepts(token):
            return Unauthenticated("invalid bearer token")
        return None


# ---------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class _Pem:
    key: bytes
    chain: bytes
    client_ca: bytes | None


def _server_pem(security: ServerSecurity) -> _Pem:
    key = _read(security.tls_key, "TLS key (tls_key)")
    chain = _read(security.tls_cert, "TLS certificate (tls_cert)")
    ca = _read(security.tls_client_ca, "client CA (tls_client_ca)") if security.tls_client_ca else None
    return _Pem(key, chain, ca)


def server_credentials(security: ServerSecurity) -> grpc.ServerCredentials | None:
    """TLS credentials of a gRPC server (client certificates required when tls_client_ca is
    set), or None without TLS. The files are read again when the certificate changes."""
    if not security.tls:
        return None
    pem = _server_pem(security)
    watched = _Watched(security.tls_cert, "TLS certificate (tls_cert)")
    watched.changed()

    def configuration(pem: _Pem) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(pem.key, pem.chain)], pem.client_ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:  # called by gRPC before every TLS handshake: one stat per RELOAD_INTERVAL_S
            return configuration(_server_pem(security)) if watched.changed() else None
        except Exception:
            log.exception("TLS certificate %s could not be reloaded; keeping the old one", security.tls_cert)
            return None

    return grpc.dynamic_ssl_server_credentials(
        configuration(pem), fetch, require_client_authentication=pem.client_ca is not None
    )


def _ssl_context(security: ServerSecurity) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(security.tls_cert, security.tls_key)
        if security.tls_client_ca:
            context.load_verify_locations(security.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise SecurityError(f"cannot load the TLS certificate {security.tls_cert}: {error}") from error
    return context


class ServerSSLContexts:
    """The bulk port's TLS context (the WeightService's certificate and client CA): calling it
    gives the current one, rebuilt when the certificate file changes (as server_credentials)."""

    def __init__(self, security: ServerSecurity) -> None:
        self.security = security
        self._watched = _Watched(security.tls_cert, "TLS certificate (tls_cert)")
        self._watched.changed()
        self._context = _ssl_context(security)

    def __call__(self) -> ssl.SSLContext:
        try:
            if self._watched.changed():
                self._context = _ssl_context(self.security)
        except SecurityError:
            log.exception("TLS certificate %s could not be reloaded; keeping it", self.security.tls_cert)
        return self._context


def server_ssl_context(security: ServerSecurity) -> ServerSSLContexts | None:
    """The bulk port's TLS contexts (ServerSSLContexts), or None without TLS."""
    return ServerSSLContexts(security) if security.tls else None


def channel_credentials(security: ClientSecurity | None) -> grpc.ChannelCredentials | None:
    """TLS credentials of a gRPC channel, or None for plaintext."""
    if security is None or not security.uses_tls:
        return None
    ca = _read(security.tls_ca, "CA bundle (tls_ca)") if security.tls_ca else None
    key = _read(security.tls_key, "client TLS key (tls_key)") if security.tls_key else None
    chain = _read(security.tls_cert, "client certificate (tls_cert)") if security.tls_cert else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)


def channel_options(security: ClientSecurity | None) -> list[tuple[str, str]]:
    """gRPC channel options for `security`: the expected server name, when set."""
    if security is None or not security.tls_server_name:
        return []
    return [("grpc.ssl_target_name_override", security.tls_server_name)]


def client_ssl_context(security: ClientSecurity | None) -> ssl.SSLContext | None:
    """The bulk receiver's TLS context, or None for plaintext."""
    if security is None or not security.uses_tls:
        return None
    try:
        context = ssl.create_default_context(cafile=security.tls_ca or None)
        if security.tls_cert:
            context.load_cert_chain(security.tls_cert, security.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise SecurityError(f"cannot load the client TLS files: {error}") from error
    return context


class TokenSource:
    """A client's token (module docstring); SecurityError when its file holds none."""

    def __init__(self, path: str) -> None:
        self._file = _Watched(path, "token file")
        self._token = ""
        self.token()

    def token(self) -> str:
        if self._file.changed():
            tokens = _token_lines(_read(self._file.path, "token file").decode("utf-8", errors="replace"))
            if not tokens:
                raise SecurityError(f"token file {self._file.path} holds no token")
            self._token = tokens[0]
        return self._token


def token_source(security: ClientSecurity | None) -> TokenSource | None:
    return TokenSource(security.token_file) if security is not None and security.token_file else None


# ------------------------------------------------------------------------------ exposure

_warned: set[str] = set()


def is_loopback(host: str) -> bool:
    """Whether `host` names only loopback addresses ("" and 0.0.0.0 / :: mean every address)."""
    name = host.strip("[]")
    if not name or name in ("0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        found = {str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(address).is_loopback for address in found)


def check_exposure(host: str, security: ServerSecurity, what: str) -> None:
    """Refuse to serve `what` on a non-loopback `host` without TLS and tokens (SecurityError),
    unless `security.insecure`; then warn, once per process and endpoint kind."""
    if is_loopback(host) or (security.tls and security.auth_tokens):
        return
    missing = " and ".join(
        name for name, ok in (("TLS", security.tls), ("tokens", bool(security.auth_tokens))) if not ok
    )
    if not security.insecure:
        raise SecurityError(
            f"refusing to serve {what} on {host or 'every address'} without {missing}: set tls_cert/"
            "tls_key and auth_tokens (--tls-cert --tls-key --auth-tokens), or pass --insecure "
            "(insecure: true) to accept the exposure"
        )
    if what not in _warned:
        _warned.add(what)
        log.warning("%s on %s without %s (insecure): anyone who reaches it may call it", what, host, missing)
