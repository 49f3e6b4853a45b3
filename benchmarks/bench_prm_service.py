"""PRM service throughput with concurrent clients, against direct model calls.

Four measurements over the same items (one prompt and one multi-step response each):
  direct     PrmScorer.score_responses in-process, batched by the same token budget;
  per call   the same, one call's items (--per-call) per forward pass: the ceiling of what
             batching can gain in the model itself on this hardware;
  service    `puremesh serve prm` in a subprocess, N concurrent clients, each call one prompt
             group (--per-call items, 4 by default; 1 measures the per-call overhead alone);
  unbatched  the same service with batching off.
Targets (issue 3): service >= 0.8x direct, service >= 3x unbatched.

    .venv/bin/python benchmarks/bench_prm_service.py [--clients 64] [--items 512] [--hidden 128]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

from _common import Served, build_models, ratio_line

from puremesh.services.prm.client import PrmClient
from puremesh.services.prm.scorer import PrmScorer
from puremesh.tinyworld.corpus import arithmetic_solution


async def drive(target: str, items: list[tuple[list[int], list[int]]], clients: int, per_call: int) -> float:
    """Items per second through the service, `clients` calls of `per_call` items in flight."""
    queue: asyncio.Queue = asyncio.Queue()
    for start in range(0, len(items), per_call):
        queue.put_nowait(items[start : start + per_call])

    async with PrmClient(target, timeout=300) as client:
        await client.score(items[:4])  # connect and warm up

        async def worker() -> None:
            while not queue.empty():
                results = await client.score(queue.get_nowait())
                assert all(result.error is None for result in results)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return len(items) / (time.perf_counter() - began)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--items", type=int, default=1024)
    parser.add_argument(
        "--per-call", type=int, default=4, help="items per ScoreSteps call (the learner sends one group)"
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    return parser.parse_args()


def items_per_second(scorer: PrmScorer, items: list, per_pass: int) -> float:
    """Items/s of the bare scorer fed `per_pass` items per call."""
    began = time.perf_counter()
    for start in range(0, len(items), per_pass):
        scorer.score_responses(items[start : start + per_pass])
    return len(items) / (time.perf_counter() - began)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        _, prm_dir = build_models(Path(scratch), args.hidden, args.layers, args.heads)
        scorer = PrmScorer(prm_dir, max_tokens_per_forward=args.max_batch_tokens)
        rng = random.Random(0)
        items = [
            (
                scorer.tokenize(f"Question {i}: compute step by step."),
                scorer.tokenize(arithmetic_solution(rng)),
            )
            for i in range(args.items)
        ]
        tokens = sum(len(p) + len(r) for p, r in items)
        print(
            f"{len(items)} items, {tokens:,} tokens; PRM hidden {args.hidden}, {args.layers} layers; "
            f"{args.clients} concurrent clients"
        )
        scorer.score_responses(items[:8])
        # The same batches the service can form at best: every client's items in one pass.
        direct = items_per_second(scorer, items, args.clients * args.per_call)
        # The same model fed one call's items per forward pass: what batching can save at most in
        # the forward passes themselves (on a CPU the passes are compute-bound early).
        direct_per_call = items_per_second(scorer, items, args.per_call)
        del scorer
        env = {
            "PUREMESH_PRM__MODEL_PATH": str(prm_dir),
            "PUREMESH_PRM__MAX_BATCH_TOKENS": str(args.max_batch_tokens),
        }
        with Served("prm", env) as server:
            batched = asyncio.run(drive(server.target, items, args.clients, args.per_call))
        with Served("prm", {**env, "PUREMESH_PRM__BATCHING": "false"}) as server:
            unbatched = asyncio.run(drive(server.target, items, args.clients, args.per_call))
    report(direct, direct_per_call, batched, unbatched)


def report(direct: float, direct_per_call: float, batched: float, unbatched: float) -> None:
    print(f"direct batched model calls : {direct:8.1f} items/s")
    print(f"direct, one call per pass  : {direct_per_call:8.1f} items/s")
    print(f"service, batching on       : {batched:8.1f} items/s")
    print(f"service, batching off      : {unbatched:8.1f} items/s")
    print(ratio_line("service / direct", batched, direct, ">= 0.8x"))
    print(ratio_line("batching on / off", batched, unbatched, ">= 3x"))
    print(
        f"direct batched / one call per pass: {direct / direct_per_call:6.2f}x   "
        "(the most batching can gain in the forward passes on this machine)"
    )


if __name__ == "__main__":
    main()
