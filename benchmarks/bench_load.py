"""Load on the PRM and verify services: N concurrent clients for a fixed time, health checked
throughout (issue 12, point 7).

For each service, `puremesh serve SERVICE` runs as a subprocess (a tiny random PRM; verify with
its grading processes) and N clients call it back to back for `--seconds` (a learner-sized
call: one group of 4 responses), while a prober asks grpc.health every 0.25 s. Printed per
service: calls, throughput, p50 / p99 / max latency, errors by code, and the slowest health
answer (every one must be SERVING).

    .venv/bin/python benchmarks/bench_load.py [--clients 32] [--seconds 60] [--services prm,verify]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from _common import Served, build_models
from grpc_health.v1 import health_pb2, health_pb2_grpc

from puremesh.prm.v1 import prm_pb2, prm_pb2_grpc
from puremesh.verify.v1 import verify_pb2, verify_pb2_grpc

RESPONSE = "3 + 4 = 7\n\n7 * 2 = 14\n\n14 - 5 = 9\n\nSo the answer is \\boxed{9}"
HEALTH_EVERY_S = 0.25


def prm_call(channel: grpc.aio.Channel):
    stub = prm_pb2_grpc.PrmServiceStub(channel)
    items = [
        prm_pb2.ScoreItem(prompt_text="What is (3 + 4) * 2 - 5?", response_text=RESPONSE) for _ in range(4)
    ]
    request = prm_pb2.ScoreStepsRequest(items=items)
    return lambda: stub.ScoreSteps(request, timeout=30)


def verify_call(channel: grpc.aio.Channel):
    stub = verify_pb2_grpc.VerifyServiceStub(channel)
    truths = ["9", "10", "\\frac{18}{2}", "9.0"]
    request = verify_pb2.VerifyRequest(
        items=[verify_pb2.VerifyItem(response=RESPONSE, ground_truth=t) for t in truths]
    )
    return lambda: stub.Verify(request, timeout=30)


async def health(channel: grpc.aio.Channel, stop: asyncio.Event) -> list[float]:
    stub = health_pb2_grpc.HealthStub(channel)
    latencies = []
    while not stop.is_set():
        began = time.perf_counter()
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
        latencies.append(time.perf_counter() - began)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"health {reply.status} under load")
        await asyncio.sleep(HEALTH_EVERY_S)
    return latencies


async def drive(target: str, make_call, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel, grpc.aio.insecure_channel(target) as probe:
        call = make_call(channel)
        end = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < end:
                began = time.perf_counter()
                try:
                    await call()
                    latencies.append(time.perf_counter() - began)
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] += 1

        prober = asyncio.create_task(health(probe, stop))
        began = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.monotonic() - began
        stop.set()
        checks = await prober
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "calls": len(latencies),
        "per_s": len(latencies) / elapsed,
        "p50": quantiles[49],
        "p99": quantiles[98],
        "max": max(latencies, default=float("nan")),
        "errors": dict(errors),
        "health_checks": len(checks),
        "health_max": max(checks, default=float("nan")),
    }


def report(service: str, clients: int, seconds: float, r: dict) -> str:
    return (
        f"{service:6s} {clients} clients x {seconds:.0f} s: {r['calls']} calls, {r['per_s']:.1f}/s, "
        f"latency p50 {r['p50'] * 1e3:.0f} ms p99 {r['p99'] * 1e3:.0f} ms max {r['max'] * 1e3:.0f} ms, "
        f"errors {r['errors'] or 0}; health {r['health_checks']} checks, all SERVING, slowest "
        f"{r['health_max'] * 1e3:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--services", default="prm,verify")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _, prm_dir = build_models(Path(tmp), hidden=64, layers=2, heads=4)
        envs = {
            "prm": ("prm", {"PUREMESH_PRM__MODEL_PATH": str(prm_dir)}, prm_call),
            "verify": ("verify", {"PUREMESH_VERIFY__WORKERS": "2"}, verify_call),
        }
        for name in args.services.split(","):
            service, env, make_call = envs[name]
            with Served(service, env) as served:
                result = asyncio.run(drive(served.target, make_call, args.clients, args.seconds))
            print(report(name, args.clients, args.seconds, result), flush=True)


if __name__ == "__main__":
    main()
