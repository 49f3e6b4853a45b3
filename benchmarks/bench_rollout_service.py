"""Rollout service tokens per second, against the same engine called directly in-process.

direct   Engine.generate for P prompts at once (asyncio tasks), n samples each;
service  `puremesh serve rollout` with the same engine in a subprocess, P concurrent Generate
         calls over gRPC, streamed samples.
Target (issue 3): service >= 0.9x direct.

    .venv/bin/python benchmarks/bench_rollout_service.py [--engine vllm|hf] [--prompts 16] [-n 4]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from _common import Served, build_models, ratio_line

from puremesh.contract.sampling import SamplingSpec
from puremesh.services.rollout.app import build_engine
from puremesh.services.rollout.client import RolloutClient
from puremesh.services.rollout.settings import RolloutSettings

PROMPT = "Question {i}: Tom has {i} apples and buys 4 more. How many apples does he have?\n\n"


async def direct(engine_name: str, policy: Path, prompts: int, n: int, max_new_tokens: int) -> float:

    engine = build_engine(RolloutSettings(engine=engine_name, model_path=str(policy), dtype="float32"))
    await engine.start()
    spec = SamplingSpec(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=0)

    async def one(i: int) -> int:
        return sum(
            [len(s.token_ids) async for s in engine.generate(engine.tokenize(PROMPT.format(i=i)), spec)]
        )

    await one(0)
    began = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(prompts))))
    rate = tokens / (time.perf_counter() - began)
    await engine.close()
    return rate


async def service(target: str, prompts: int, n: int, max_new_tokens: int) -> float:

    sampling = SamplingSpec(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=0)
    async with RolloutClient(target) as client:

        async def one(i: int) -> int:
            return sum([len(s.token_ids) async for s in client.generate(PROMPT.format(i=i), sampling)])

        await one(0)
        began = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(prompts))))
        return tokens / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        policy, _ = build_models(Path(scratch), args.hidden, args.layers, 4)
        direct_rate = asyncio.run(direct(args.engine, policy, args.prompts, args.n, args.max_new_tokens))
        env = {
            "PUREMESH_ROLLOUT__MODEL_PATH": str(policy),
            "PUREMESH_ROLLOUT__ENGINE": args.engine,
            "PUREMESH_ROLLOUT__DTYPE": "float32",
        }
        with Served("rollout", env) as server:
            service_rate = asyncio.run(service(server.target, args.prompts, args.n, args.max_new_tokens))

    print(
        f"engine {args.engine}: {args.prompts} prompts x {args.n} samples, "
        f"up to {args.max_new_tokens} new tokens"
    )
    print(f"engine called directly : {direct_rate:9.1f} tokens/s")
    print(f"through the service    : {service_rate:9.1f} tokens/s")
    print(ratio_line("service / direct", service_rate, direct_rate, ">= 0.9x"))


if __name__ == "__main__":
    main()
