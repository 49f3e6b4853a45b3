"""Verify service answers per second, against math-verify in a local process pool of the same size.

baseline  multiprocessing.Pool(workers).map(grade, items) in this process (no timeouts);
service   `puremesh serve verify` with the same number of workers, items sent in batches by a
          few concurrent clients, each item under the service's hard timeout.
Target (issue 3): service >= 0.8x baseline.

    .venv/bin/python benchmarks/bench_verify_service.py [--items 2000] [--workers 2] [--batch 32]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import time

from _common import Served, ratio_line

from puremesh.services.verify.client import VerifyClient
from puremesh.services.verify.grading import grade


def make_items(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        a, b = rng.randint(1, 50), rng.randint(2, 12)
        truth, kind = rng.choice(
            [
                (str(a * b), "int"),
                (f"\\frac{{{a}}}{{{b}}}", "frac"),
                (f"{a}x+{b}", "expr"),
                (str(a / 4), "dec"),
            ]
        )
        if rng.random() < 0.5:
            answer = {
                "int": str(a * b),
                "frac": f"{a}/{b}",
                "expr": f"{b}+{a}x",
                "dec": f"\\frac{{{a}}}{{4}}",
            }[kind]
        else:
            answer = str(a * b + 1)
        items.append((f"Step 1: work it out.\n\nSo the answer is \\boxed{{{answer}}}", truth))
    return items


def _grade(item: tuple[str, str]):
    return grade(*item)


async def drive(target: str, items: list[tuple[str, str]], batch: int, clients: int) -> float:

    chunks = [items[i : i + batch] for i in range(0, len(items), batch)]
    async with VerifyClient(target, timeout=600) as client:
        await client.verify(items[:8])

        async def worker() -> None:
            while chunks:
                outcomes = await client.verify(chunks.pop())
                assert all(o.error is None for o in outcomes)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return len(items) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    items = make_items(args.items)

    with multiprocessing.get_context("forkserver").Pool(args.workers) as pool:
        pool.map(_grade, items[: args.workers * 4])  # warm up sympy in every worker
        began = time.perf_counter()
        pool.map(_grade, items, chunksize=8)
        baseline = len(items) / (time.perf_counter() - began)

    with Served("verify", {"PUREMESH_VERIFY__WORKERS": str(args.workers)}) as server:
        service = asyncio.run(drive(server.target, items, args.batch, args.clients))

    print(f"{len(items)} items, {args.workers} workers")
    print(f"local process pool (math-verify): {baseline:8.1f} answers/s")
    print(f"verify service                  : {service:8.1f} answers/s")
    print(ratio_line("service / local pool", service, baseline, ">= 0.8x"))


if __name__ == "__main__":
    main()
