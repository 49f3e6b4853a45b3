"""`puremesh up --ray` keeps Ray Serve's gRPC proxy on loopback.

Ray Serve binds its gRPC proxy on every interface (`[::]:port`, ray/serve/_private/grpc_util.py)
and has no option for the host, unlike its HTTP proxy. On a laptop nothing else should reach
it, so `puremesh up --ray` names `bind_proxy_to_loopback` as the local Ray instance's
worker_process_setup_hook: every Ray worker process (the proxy's among them) runs it at start,
and the proxy then listens on 127.0.0.1:port only. A cluster (the chart) keeps Ray's own binding:
there the ingress must be reachable, and the NetworkPolicies and tokens guard it.
"""

from __future__ import annotations

LOOPBACK = "127.0.0.1"
HOOK = f"{__name__}.bind_proxy_to_loopback"


def _add_loopback_address(server, address: str) -> None:
    """Ray's add_grpc_address, on loopback: `address` is "[::]:PORT"."""
    server.add_insecure_port(f"{LOOPBACK}:{address.rsplit(':', 1)[1]}")


def bind_proxy_to_loopback() -> None:
    """The worker_process_setup_hook (module docstring)."""
    from ray.serve._private import default_impl

    default_impl.add_grpc_address = _add_loopback_address
