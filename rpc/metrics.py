"""Prometheus metrics shared by every service (ARCHITECTURE.md rule 6).

Metrics live in the process-wide registry and carry a `service` label, so that several
services can share one process (tests, the embedded mesh) and one scrape endpoint.
Labels are bounded: service, method, code, and small fixed enums; never a request id.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_REQUESTS = Counter(
    "puremesh_rpc_requests_total", "RPCs handled, by final status code", ["service", "method", "code"]
)
RPC_ERRORS = Counter(
    "puremesh_rpc_errors_total", "RPCs that ended with a status other than OK", ["service", "method", "code"]
)
RPC_DURATION = Histogram(
    "puremesh_rpc_duration_seconds",
    "Server-side RPC latency",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
RPC_UNAUTHENTICATED = Counter(
    "puremesh_rpc_auth_failures_total",
    "Calls refused with UNAUTHENTICATED before any work, by reason",
    ["reason"],  # missing | invalid (the token itself is never recorded)
)
RPC_IN_FLIGHT = Gauge("puremesh_rpc_in_flight_requests", "RPCs being handled now", ["service", "method"])
SERVICE_READY = Gauge("puremesh_service_ready", "1 when the service is SERVING, else 0", ["service"])
BATCH_SIZE = Histogram(
    "puremesh_service_batch_size_items",
    "Items per batch of work (PRM forward pass, verify call, generate call)",
    ["service"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
QUEUE_DEPTH = Gauge(
    "puremesh_service_queue_depth_items", "Items waiting for a worker or a batch", ["service"]
)


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server."""

    port: int
    _server: object
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout=5)


def start_metrics_endpoint(host: str, port: int) -> MetricsEndpoint:
    """Serve the process registry on http://host:port/metrics (port 0 picks a free one)."""
    server, thread = start_http_server(port, addr=host)
    return MetricsEndpoint(server.server_port, server, thread)
