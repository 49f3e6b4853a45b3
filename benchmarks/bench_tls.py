"""The price of TLS and tokens (issue 13), as ratios against plaintext measured in one run.

prm   `puremesh serve prm` (a tiny random PRM) twice, plaintext and with TLS plus a token file,
      each driven by N concurrent clients (64 by default) for S seconds, one learner-sized call
      (4 responses) after another, alternating plaintext / secure `--repeats` times; the ratio is
      the secure throughput over the plaintext one (target >= 0.9x).
bulk  the learner's weight side in this process (built as cli/learner.py builds it) publishing
      one version of `--mb` MB, and a subscriber process (as a replica is) downloading it with
      WeightFetcher over the bulk port `--rounds` times, in three set-ups: plaintext, tokens
      only (the handshake, bytes in the clear: weights.bulk_tls false) and TLS plus tokens; the
      ratios are each one's median MB/s over plaintext's.

The certificates and tokens are the README's openssl block (tests/pki.py), made in a temporary
folder.

    .venv/bin/python benchmarks/bench_tls.py [--clients 64] [--seconds 20] [--repeats 2]
                                             [--mb 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import Served, build_models
from bench_load import RESPONSE
from bench_weights import state_dict

from puremesh.cli.learner import close_weights, learner_server, weight_servicer, weight_store
from puremesh.prm.v1 import prm_pb2, prm_pb2_grpc
from puremesh.rpc.client import open_channel
from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import ClientSecurity
from puremesh.trainer.settings import LearnerSettings
from puremesh.weightsync.fetcher import WeightFetcher
from puremesh.weightsync.servicer import weight_service
from puremesh.weightsync.tcp_bulk import BULK_FALLBACKS
from puremesh.weightsync.transport import FetchOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pki import Pki, make_pki

MB = 1e6


# ------------------------------------------------------------------------------------ prm


async def prm_throughput(target: str, clients: int, seconds: float, security: ClientSecurity | None) -> float:
    """Calls per second of `clients` back-to-back callers (bench_load.py's learner-sized call)."""
    calls = 0
    async with open_channel(target, security=security) as channel:
        token = Path(security.token_file).read_text().strip() if security else None
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        stub = prm_pb2_grpc.PrmServiceStub(channel)
        item = prm_pb2.ScoreItem(prompt_text="What is (3 + 4) * 2 - 5?", response_text=RESPONSE)
        request = prm_pb2.ScoreStepsRequest(items=[item] * 4)
        await stub.ScoreSteps(request, timeout=30, metadata=metadata)  # connected, warmed up
        end = time.monotonic() + seconds

        async def client() -> None:
            nonlocal calls
            while time.monotonic() < end:
                await stub.ScoreSteps(request, timeout=30, metadata=metadata)
                calls += 1

        began = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        return calls / (time.monotonic() - began)


def bench_prm(pki: Pki, prm_dir: Path, args) -> None:
    env = {"PUREMESH_PRM__MODEL_PATH": str(prm_dir)}
    server = pki.server_security("prm", mtls=False)
    secure_env = {**env, **{f"PUREMESH_PRM__SERVER__{k.upper()}": v for k, v in server.items()}}
    security = ClientSecurity(tls_ca=pki.ca, token_file=pki.token_file("prm"))
    with Served("prm", env) as plain, Served("prm", secure_env) as secure:
        rates: dict[str, list[float]] = {"plaintext": [], "TLS + token": []}
        for _ in range(args.repeats):
            rates["plaintext"].append(
                asyncio.run(prm_throughput(plain.target, args.clients, args.seconds, None))
            )
            rates["TLS + token"].append(
                asyncio.run(prm_throughput(secure.target, args.clients, args.seconds, security))
            )
    base = statistics.mean(rates["plaintext"])
    for name, values in rates.items():
        print(f"prm {args.clients} clients  {name:12s} {statistics.mean(values):7.1f} calls/s  {values}")
    ratio = statistics.mean(rates["TLS + token"]) / base
    print(f"prm throughput, TLS + token / plaintext: {ratio:.2f}x   (target >= 0.9x)", flush=True)


# ----------------------------------------------------------------------------------- bulk


def subscriber(target: str, security: dict | None, rounds: int, results) -> None:
    results.put(asyncio.run(_subscribe(target, security, rounds)))


async def _subscribe(target: str, security: dict | None, rounds: int) -> list[float]:
    client = ClientSecurity(**security) if security else None
    async with WeightFetcher(target, "bench-tls", FetchOptions(), client) as fetcher:
        announcement = await fetcher.current(0)
        assert announcement is not None
        seconds = []
        for _ in range(rounds + 1):  # the first one warms the buffer up
            began = time.perf_counter()
            fetched = await fetcher.download(announcement)
            seconds.append(time.perf_counter() - began)
            fetcher.recycle(fetched)
    fallbacks = sum(metric.get() for metric in BULK_FALLBACKS._metrics.values())
    if fallbacks:
        raise RuntimeError(f"{fallbacks:.0f} downloads fell back to FetchWeights")
    return seconds[1:]


async def bulk_rate(tensors, weights: dict, security: dict | None, rounds: int, total: int) -> float:
    settings = LearnerSettings(policy_path="-", train_path="-", weights=weights)
    store, bulk = weight_store(settings.weights)
    host = ServiceHost([weight_service(weight_servicer(store, settings.weights))], learner_server(settings))
    await host.start()
    store.publish(1, tensors)
    results = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(
        target=subscriber, args=(host.target, security, rounds, results)
    )
    process.start()
    try:
        seconds = await asyncio.to_thread(results.get, True, 600)
    finally:
        process.join(30)
        close_weights(store, bulk)
        await host.drain(grace=0)
    return total / statistics.median(seconds) / MB


def bench_bulk(pki: Pki, args) -> None:
    tensors = state_dict(args.mb, "float32")
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    client = {"tls_ca": pki.ca, "token_file": pki.token_file("weights")}
    tls = pki.server_security("weights", mtls=False)
    setups = {
        "plaintext": ({}, None),
        "tokens, bytes in the clear": ({**tls, "bulk_tls": False}, client),
        "TLS + tokens": (tls, client),
    }
    rates = {
        name: asyncio.run(bulk_rate(tensors, w, c, args.rounds, total)) for name, (w, c) in setups.items()
    }
    for name, rate in rates.items():
        ratio = rate / rates["plaintext"]
        print(f"bulk fetch of {total / MB:.0f} MB per subscriber  {name:26s} {rate:7.0f} MB/s  {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mb", type=float, default=256.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parts", default="prm,bulk")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp))
        if "prm" in args.parts:
            _, prm_dir = build_models(Path(tmp) / "models", hidden=64, layers=2, heads=4)
            bench_prm(pki, prm_dir, args)
        if "bulk" in args.parts:
            bench_bulk(pki, args)


if __name__ == "__main__":
    main()
