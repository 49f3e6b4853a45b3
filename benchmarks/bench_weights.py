"""Weight sync throughput: the learner's WeightService fanning one version out to 1, 2 and 4
replicas, against a raw loopback TCP copy of the same bytes.

weights  the learner (weightsync's WeightStore, WeightServicer in a ServiceHost, BulkServer) in
         this process; each subscriber is a separate process (as replicas are) that watches
         WatchVersions and, on each announcement, downloads the version with the replica side's
         WeightFetcher and rebuilds the tensors (no engine), along one path:
           bulk  the default: DescribeVersion, then the bytes over the bulk TCP port straight
                 into the buffer, every chunk's CRC-32 checked on a second thread as it arrives;
           grpc  the FetchWeights chunk stream (bulk=False): every chunk received through gRPC,
                 copied, the whole version's SHA-256 checked.
raw      a socket server thread in this process sends the same buffer to each client process,
         which reads it into a preallocated buffer (recv_into): no checksums, no framing.

Printed per fan-out and path: per-subscriber MB/s (median over rounds, each subscriber timed
from its announcement to its rebuilt tensors), the ratio to raw per-client MB/s at the same
fan-out (target >= 0.5x for the default path, bulk), and the learner's publish-side time:
publish() (snapshot and checksums) and publish-to-every-replica-done. Serving to N replicas
grows less than linearly when the N-replica time is below N times the 1-replica time.

    .venv/bin/python benchmarks/bench_weights.py [--mb 64] [--fanouts 1,2,4] [--rounds 3]
                                                 [--paths bulk,grpc]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import statistics
import threading
import time

import _common  # noqa: F401  (offline environment)

from puremesh.rpc.server import ServiceHost
from puremesh.rpc.settings import ServerSettings
from puremesh.weightsync.bulk_server import BulkServer
from puremesh.weightsync.fetcher import WeightFetcher
from puremesh.weightsync.servicer import WeightServicer, weight_service
from puremesh.weightsync.store import DEFAULT_CHUNK_BYTES, WeightStore
from puremesh.weightsync.tcp_bulk import BULK_FALLBACKS
from puremesh.weightsync.transport import Announcement, FetchOptions

MB = 1e6


def state_dict(megabytes: float, dtype: str):
    """A random state dict of about `megabytes`, shaped like a transformer's (a few large
    matrices, many small vectors)."""
    import torch

    torch.manual_seed(0)
    element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    total = int(megabytes * 1e6) // element
    tensors = []
    layer = 0
    while total > 0:
        rows = min(1024, max(1, total // 1024))
        tensors.append((f"layers.{layer}.weight", torch.randn(rows, 1024).to(getattr(torch, dtype))))
        tensors.append((f"layers.{layer}.norm", torch.ones(1024, dtype=getattr(torch, dtype))))
        total -= rows * 1024 + 1024
        layer += 1
    return tensors


# ---------------------------------------------------------------------------- subscribers


def subscriber_process(index: int, target: str, rounds: int, bulk: bool, ready, results) -> None:
    asyncio.run(_subscriber(index, target, rounds, bulk, ready, results))


async def _subscriber(index: int, target: str, rounds: int, bulk: bool, ready, results) -> None:

    async with WeightFetcher(target, f"bench-{index}", FetchOptions(bulk=bulk)) as fetcher:
        stream = fetcher.watch(0)
        await stream.initial_metadata()
        ready.put(index)
        for _ in range(rounds):
            announced = Announcement.from_proto(await stream.read())
            began, cpu = time.perf_counter(), time.process_time()
            fetched = await fetcher.download(announced)
            tensors = fetched.tensors()
            elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
            await fetcher.confirm(fetched)  # as WeightSubscriber does: the learner counts it now
            results.put((announced.total_bytes, elapsed, cpu))
            del tensors
            fetcher.recycle(fetched)  # as WeightSubscriber does once the engine copied the tensors
        stream.cancel()
    fallbacks = sum(sample.value for metric in BULK_FALLBACKS.collect() for sample in metric.samples)
    if fallbacks:
        raise RuntimeError(f"subscriber {index}: {fallbacks:.0f} bulk downloads fell back to FetchWeights")


async def run_weights(tensors, fanout: int, rounds: int, chunk_bytes: int, bulk: bool) -> dict:

    publisher = WeightStore(retain=2, chunk_bytes=chunk_bytes)
    bulk_server = BulkServer(publisher, "127.0.0.1")
    publisher.offer_bulk(bulk_server.port)
    host = ServiceHost([weight_service(WeightServicer(publisher))], ServerSettings(metrics_port=None))
    await host.start()
    context = mp.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    workers = [
        context.Process(target=subscriber_process, args=(i, host.target, rounds, bulk, ready, results))
        for i in range(fanout)
    ]
    for worker in workers:
        worker.start()
    for _ in workers:
        await asyncio.to_thread(ready.get, True, 300)
    await publisher.wait_for_replicas(0, fanout, timeout=60)
    publish_s, total_s, per_subscriber, serve_cpu, fetch_cpu = [], [], [], [], []
    for version in range(1, rounds + 1):
        began = time.perf_counter()
        info = await asyncio.to_thread(publisher.publish, version, tensors)
        published, cpu = time.perf_counter(), time.process_time()
        await publisher.wait_for_replicas(version, fanout, timeout=600)
        done, cpu = time.perf_counter(), time.process_time() - cpu
        publish_s.append(published - began)
        total_s.append(done - began)
        serve_cpu.append(cpu * 1e3 / (info.total_bytes * fanout / MB))
        for _ in range(fanout):
            size, elapsed, cpu = await asyncio.to_thread(results.get, True, 60)
            per_subscriber.append(size / elapsed / MB)
            fetch_cpu.append(cpu * 1e3 / (size / MB))
    for worker in workers:
        worker.join(60)
        if worker.exitcode:
            raise RuntimeError(f"a subscriber exited with {worker.exitcode}")
    publisher.close()
    bulk_server.close()
    await host.drain(grace=1)
    return {
        "bytes": info.total_bytes,
        "chunks": info.total_chunks,
        "rate": statistics.median(per_subscriber),
        "publish": statistics.median(publish_s),
        "total": statistics.median(total_s),
        "serve_cpu": statistics.median(serve_cpu),
        "fetch_cpu": statistics.median(fetch_cpu),
    }


# ---------------------------------------------------------------------------- raw TCP


def raw_client_process(port: int, size: int, rounds: int, ready, go, results) -> None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    ready.put(True)
    for _ in range(rounds):
        go.get()
        with socket.create_connection(("127.0.0.1", port)) as conn:
            began, cpu = time.perf_counter(), time.process_time()
            got = 0
            while got < size:
                n = conn.recv_into(view[got:], min(size - got, 1 << 22))
                if not n:
                    raise RuntimeError("raw server closed early")
                got += n
            elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
            results.put((size / elapsed / MB, cpu * 1e3 / (size / MB)))


def run_raw(data: memoryview, fanout: int, rounds: int) -> tuple[float, float]:
    """(median per-client MB/s, median client CPU ms per MB)."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_send, args=(conn, data), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    context = mp.get_context("spawn")
    ready, go, results = context.Queue(), context.Queue(), context.Queue()
    workers = [
        context.Process(target=raw_client_process, args=(port, len(data), rounds, ready, go, results))
        for _ in range(fanout)
    ]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(True, 120)
    rates = []
    for _ in range(rounds):
        for _ in workers:
            go.put(True)
        rates += [results.get(True, 120) for _ in workers]
    for worker in workers:
        worker.join(60)
    server.close()
    return statistics.median(r for r, _ in rates), statistics.median(c for _, c in rates)


def _send(conn: socket.socket, data: memoryview) -> None:
    with conn:
        conn.sendall(data)


def main() -> None:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=64, help="size of the state dict in MB")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--fanouts", default="1,2,4", help="comma-separated numbers of subscribers")
    parser.add_argument("--rounds", type=int, default=3, help="versions published per fan-out")
    parser.add_argument(
        "--chunk-kb", type=int, default=DEFAULT_CHUNK_BYTES >> 10, help="publisher chunk size"
    )
    parser.add_argument(
        "--paths", default="bulk,grpc", help="subscriber paths to measure: bulk (the default), grpc"
    )
    args = parser.parse_args()
    paths = [path for path in args.paths.split(",") if path]
    if not paths or set(paths) - {"bulk", "grpc"}:
        parser.error("--paths takes bulk and/or grpc")

    import torch

    tensors = state_dict(args.mb, args.dtype)
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in tensors])
    data = memoryview(flat.numpy())
    fanouts = [int(x) for x in args.fanouts.split(",")]
    print(
        f"state dict: {len(tensors)} tensors, {len(data) / MB:.1f} MB {args.dtype}; "
        f"chunk {args.chunk_kb} KiB; {args.rounds} rounds per fan-out"
    )
    print(
        f"{'':>12} {'per-client MB/s':^23} {'':>6} {'learner seconds':^30} {'':>6} "
        f"{'CPU ms per MB':^24}\n"
        f"{'fan-out':>7} {'path':>4} {'raw':>8} {'subscriber':>14} {'ratio':>6} {'publish()':>10} "
        f"{'publish->all done':>19} {'growth':>6} {'raw':>6} {'subscr.':>8} {'learner':>8}"
    )
    base_total: dict[str, float] = {}
    for fanout in fanouts:
        raw, raw_cpu = run_raw(data, fanout, args.rounds)
        for path in paths:
            measured = asyncio.run(
                run_weights(tensors, fanout, args.rounds, args.chunk_kb << 10, path == "bulk")
            )
            base_total.setdefault(path, measured["total"] / fanouts[0])
            growth, rate = measured["total"] / base_total[path], measured["rate"]
            print(
                f"{fanout:>7} {path:>4} {raw:>8.0f} {rate:>14.0f} {rate / raw:>5.2f}x "
                f"{measured['publish']:>10.3f} {measured['total']:>19.3f} {growth:>5.2f}x "
                f"{raw_cpu:>6.2f} {measured['fetch_cpu']:>8.2f} {measured['serve_cpu']:>8.2f}",
                flush=True,
            )
    print(
        "ratio: subscriber / raw per-client MB/s at the same fan-out (target >= 0.5x on the default "
        "path, bulk);\ngrowth: publish->all done relative to one replica on the same path (less than "
        "linear: growth < fan-out)\nCPU ms per MB: process CPU time, all threads, per MB received by a "
        "raw client or a subscriber, and per MB sent by the learner (serving only, publish() excluded)"
    )


if __name__ == "__main__":
    main()
