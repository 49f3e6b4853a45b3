"""The limits of the learner's weight plane (weights.proto's header), as one settings model:
`learner.weights.limits` (trainer/settings.py). Each default is the constant of the module
that applies it; the composition root (cli/learner.py) hands them to the store, the servicer
and the bulk server. None of them is set by a client."""

from __future__ import annotations

from pydantic import Field

from puremesh.rpc.settings import FrozenSettings

from .bulk_server import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_PEER,
)
from .nccl_sender import DEFAULT_MAX_GROUPS
from .nccl_sender import DEFAULT_MIN_BYTES_PER_SECOND as DEFAULT_NCCL_MIN_BYTES_PER_SECOND
from .nccl_sender import DEFAULT_SETUP_TIMEOUT_S as DEFAULT_NCCL_SETUP_TIMEOUT_S
from .replicas import DEFAULT_MAX_RECORDS, DEFAULT_TTL_S
from .servicer import (
    DEFAULT_MAX_FETCHES,
    DEFAULT_MAX_WATCHERS,
    DEFAULT_MIN_BYTES_PER_SECOND,
    DEFAULT_TRANSFER_GRACE_S,
)
from .store import DEFAULT_REVOKE_WAIT_S


class WeightPlaneLimits(FrozenSettings):
    """What bounds the learner's memory, threads and time on the weight plane."""

    max_buffers: int = Field(
        0, ge=0, description="model-size weight buffers at most; 0 = retain_versions + 1"
    )
    revoke_wait_seconds: float = Field(
        DEFAULT_REVOKE_WAIT_S, gt=0, description="how long a publish waits for readers of a revoked version"
    )
    transfer_grace_seconds: float = Field(
        DEFAULT_TRANSFER_GRACE_S,
        gt=0,
        description="every transfer (a FetchWeights stream, a bulk reply) must go out within this "
        "plus its bytes at min_transfer_bytes_per_second",
    )
    min_transfer_bytes_per_second: float = Field(
        DEFAULT_MIN_BYTES_PER_SECOND, gt=0, description="slowest accepted reader of weights"
    )
    max_watchers: int = Field(DEFAULT_MAX_WATCHERS, ge=1, description="open WatchVersions streams")
    max_fetches: int = Field(DEFAULT_MAX_FETCHES, ge=1, description="concurrent FetchWeights calls")
    max_bulk_connections: int = Field(DEFAULT_MAX_CONNECTIONS, ge=1, description="bulk connections")
    max_bulk_connections_per_peer: int = Field(
        DEFAULT_MAX_CONNECTIONS_PER_PEER, ge=1, description="bulk connections from one address"
    )
    bulk_header_timeout_seconds: float = Field(
        DEFAULT_HEADER_TIMEOUT_S, gt=0, description="a bulk request header must arrive within this"
    )
    bulk_idle_timeout_seconds: float = Field(
        DEFAULT_IDLE_TIMEOUT_S, gt=0, description="a bulk connection idle this long is closed"
    )
    replica_ttl_seconds: float = Field(
        DEFAULT_TTL_S, gt=0, description="a replica record not watching for this long expires"
    )
    max_replica_records: int = Field(DEFAULT_MAX_RECORDS, ge=1, description="replica records kept")
    max_nccl_groups: int = Field(DEFAULT_MAX_GROUPS, ge=1, description="NCCL groups with replicas at most")
    nccl_setup_timeout_seconds: float = Field(
        DEFAULT_NCCL_SETUP_TIMEOUT_S,
        gt=0,
        description="both ranks of a replica's NCCL group must join within this, else it is destroyed; also "
        "the grace of every NCCL send",
    )
    nccl_min_bytes_per_second: float = Field(
        DEFAULT_NCCL_MIN_BYTES_PER_SECOND,
        gt=0,
        description="every NCCL send must finish within nccl_setup_timeout_seconds plus its bytes at this "
        "rate, else its group is destroyed (DEADLINE_EXCEEDED)",
    )
