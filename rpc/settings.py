"""Settings: frozen pydantic models loaded from defaults < YAML file < environment < flags.

Environment variables use a per-service prefix and `__` for nesting, e.g.
PUREMESH_PRM__SERVER__PORT=50052 or PUREMESH_PRM__MAX_BATCH_TOKENS=8192 (Helm values become
such variables). Values are parsed as YAML scalars, so "4", "true" and "[a, b]" work.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)


class FrozenSettings(BaseModel):
    """Base for every settings model: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSecurity(FrozenSettings):
    """TLS and bearer tokens of a server (rpc/auth.py; README "Security"). Binding an address
    other than loopback needs both, or `insecure`."""

    tls_cert: str = Field("", description="PEM certificate (chain) of the server; with tls_key: TLS only")
    tls_key: str = Field("", description="PEM private key of tls_cert")
    tls_client_ca: str = Field(
        "", description="PEM CA bundle: clients must present a certificate it signed (mTLS)"
    )
    auth_tokens: str = Field(
        "",
        description="file of the accepted bearer tokens, one per line, # for comments; reloaded when "
        "it changes. Empty = no token required",
    )
    insecure: bool = Field(
        False, description="allow a non-loopback bind address without TLS and tokens (warned once)"
    )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @model_validator(mode="after")
    def _pairs(self) -> ServerSecurity:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        return self


class ClientSecurity(FrozenSettings):
    """How a client reaches a server with TLS and a bearer token (rpc/auth.py)."""

    tls: bool = Field(False, description="TLS with the system's CAs (implied by tls_ca or tls_cert)")
    tls_ca: str = Field("", description="PEM CA bundle the server's certificate must chain to")
    tls_cert: str = Field("", description="PEM client certificate, for servers that require mTLS")
    tls_key: str = Field("", description="PEM private key of tls_cert")
    tls_server_name: str = Field(
        "", description="the name the server's certificate must carry; empty = the target's host"
    )
    token_file: str = Field(
        "", description="file whose first line (# comments skipped) is the bearer token sent on every call"
    )

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.tls_ca or self.tls_cert)

    @model_validator(mode="after")
    def _pairs(self) -> ClientSecurity:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        return self


class ServerSettings(ServerSecurity):
    """One service host's server (rpc/server.py). Admission comes before work: gRPC takes at
    most max_concurrent_rpcs + health_reserve_rpcs calls at once and refuses request bodies over
    max_request_bytes before reading them; the hosted services' calls are counted before their
    request is parsed. Request bodies in flight therefore stay within request_memory_bytes,
    which must hold (max_concurrent_rpcs + health_reserve_rpcs) x max_request_bytes."""

    host: str = Field("127.0.0.1", description="address to bind the gRPC server to")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_host: str = Field(
        "",
        description="address to bind /metrics to; empty = host. In a cluster, an address the "
        "PodMonitor reaches (the chart sets 0.0.0.0)",
    )
    metrics_port: int | None = Field(
        0, ge=0, le=65535, description="Prometheus HTTP port; 0 picks a free one, null disables"
    )
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest message sent (replies)")
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="largest request body; larger ones are refused unread"
    )
    max_concurrent_rpcs: int = Field(256, ge=1, description="calls in flight before RESOURCE_EXHAUSTED")
    health_reserve_rpcs: int = Field(
        16, ge=1, description="calls gRPC takes beyond max_concurrent_rpcs, for health and reflection"
    )
    request_memory_bytes: int = Field(
        1280 * 1024 * 1024,
        ge=1024,
        description="memory budget for request bodies in flight: must hold "
        "(max_concurrent_rpcs + health_reserve_rpcs) x max_request_bytes",
    )
    max_queue_wait_seconds: float = Field(
        30.0, gt=0, description="longest a call waits in a queue when its deadline allows more"
    )
    drain_delay_seconds: float = Field(
        0.0, ge=0, description="after SIGTERM: NOT_SERVING this long before refusing calls"
    )
    drain_grace_seconds: float = Field(30.0, ge=0, description="after SIGTERM: time for in-flight calls")
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="a second, plaintext port serving grpc.health.v1 only (Kubernetes gRPC probes speak "
        "plaintext and send no metadata); null = none, 0 picks a free one",
    )

    @property
    def metrics_bind_host(self) -> str:
        """The address /metrics binds to: metrics_host, else host."""
        return self.metrics_host or self.host

    @property
    def grpc_concurrency(self) -> int:
        """Calls gRPC itself takes at once (the hosted services get max_concurrent_rpcs)."""
        return self.max_concurrent_rpcs + self.health_reserve_rpcs

    @model_validator(mode="after")
    def _within_budget(self) -> ServerSettings:
        needed = self.grpc_concurrency * self.max_request_bytes
        if needed > self.request_memory_bytes:
            raise ValueError(
                f"(max_concurrent_rpcs + health_reserve_rpcs) x max_request_bytes = {needed} bytes "
                f"exceeds request_memory_bytes ({self.request_memory_bytes}); lower one of them or "
                "raise the budget"
            )
        return self


class SettingsError(Exception):
    """Settings could not be loaded; the message names the file, variable or field."""


Model = TypeVar("Model", bound=BaseModel)


def _nest(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        node = target.get(key)
        if not isinstance(node, dict):
            node = target[key] = {}
        target = node
    target[path[-1]] = value


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    model: type[Model],
    path: str | Path | None = None,
    env_prefix: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    data: Mapping[str, Any] | None = None,
) -> Model:
    """Build `model` from its defaults, a YAML file, environment variables and overrides.

    `overrides` is nested like the model (e.g. {"server": {"port": 50051}}); None values are
    skipped, so unset command-line flags do not override anything. `data` stands in for the
    YAML file's content (e.g. Ray Serve application args); it cannot be given with `path`.
    """
    if data is not None and path is not None:
        raise ValueError("give a settings file or data, not both")
    data = copy.deepcopy(dict(data)) if data is not None else {}
    if path is not None:
        data = _read_yaml(Path(path))
    if env_prefix:
        _apply_environment(data, env_prefix, os.environ if environ is None else environ)
    if overrides:
        data = _merge(data, _drop_none(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise SettingsError(f"invalid setting {where}: {first['msg']}") from error


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SettingsError(f"cannot read settings file {path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise SettingsError(f"settings file {path} is not valid YAML: {error}") from error
    if loaded is not None and not isinstance(loaded, dict):
        raise SettingsError(f"settings file {path} must hold a mapping at the top level")
    return loaded or {}


def _apply_environment(data: dict[str, Any], prefix: str, environ: Mapping[str, str]) -> None:
    """Nest every PREFIX_A__B=value variable into `data` as data["a"]["b"] (a YAML scalar)."""
    for name, raw in sorted(environ.items()):
        if not name.startswith(prefix):
            continue
        keys = [k.lower() for k in name[len(prefix) :].split("__") if k]
        if not keys:
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        _nest(data, keys, value)


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            nested = _drop_none(value)
            if nested:
                out[key] = nested
        elif value is not None:
            out[key] = value
    return out


def log_settings(name: str, settings: BaseModel) -> None:
    """Log the resolved settings once at start, as one JSON line."""
    log.info("%s settings: %s", name, json.dumps(settings.model_dump(mode="json"), sort_keys=True))
