"""One prepared check of puremesh's GPU paths (issue 15): run it on a CUDA machine, get one table.

It builds its own random Qwen2 policy and PRM (nothing is downloaded) and measures:
  learner bf16      median seconds of one PPO update of the learner's own code (trainer/
                    controller.py) in bf16 on one GPU, and sharded over 2 ranks where 2 GPUs exist;
  weights           a vLLM CUDA replica (`puremesh serve rollout`, CUDA graphs: enforce_eager
                    false) following the learner's WeightService (cli/learner.py's wiring, NCCL on)
                    for two versions: seconds per GB from publish to the replica's confirmation,
                    and which path carried the bytes. NCCL needs one device per rank: with two
                    GPUs the learner sends from cuda:0 to the replica on cuda:1; with one GPU the
                    replica receives over the bulk port (reported as such);
  greedy match      after each version, the replica's greedy tokens equal transformers' with the
                    same weights (float32 on both sides);
  rollout tokens/s  the rollout service against vLLM called directly (VllmEngine in process);
  prm batching      `puremesh serve prm` on the GPU in bf16: batching on / off (target >= 3x).

    .venv/bin/python benchmarks/gpu_check.py [--size tiny|large] [--only learner,weights,rollout,prm]

Without CUDA it prints one line and exits 2. Each check that fails prints its row as FAILED
and the script exits 1. The tiny size runs in a few minutes on one GPU; --size large (about
0.9 B parameters) gives figures that mean something on a big GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _common  # offline environment first
import torch

CHECKS = ("learner", "weights", "rollout", "prm")
PROMPT = "Question {i}: Tom has {i} apples and buys 4 more. How many apples does he have?\n\n"
GREEDY_TOKENS = 24
REPLICA_ID = "gpu-check-replica"
BAD = ("FAILED", "DIFFERENT")  # figures that make the script exit 1


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    prompts: int  # concurrent Generate calls of the tokens/s row, 4 samples each
    new_tokens: int
    prm_items: int
    steps: int = 3
    rows: int = 16
    tokens: int = 32  # learner responses of tokens .. 3 x tokens


SIZES = {
    "tiny": Size(hidden=256, layers=4, heads=4, prompts=32, new_tokens=128, prm_items=1024),
    "large": Size(hidden=2048, layers=24, heads=16, prompts=128, new_tokens=256, prm_items=4096),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model size (default tiny)")
    parser.add_argument(
        "--only", default=",".join(CHECKS), help=f"comma-separated checks to run, of {','.join(CHECKS)}"
    )
    args = parser.parse_args(argv)
    chosen = [name for name in args.only.split(",") if name]
    unknown = sorted(set(chosen) - set(CHECKS))
    if unknown or not chosen:
        parser.error(f"--only: unknown checks {unknown} (choose from {','.join(CHECKS)})")
    args.checks = chosen
    return args


def cuda_problem() -> str | None:
    """Why the GPU paths cannot be checked here, in one line; None = they can."""
    if not torch.cuda.is_available():
        return "no CUDA device here (torch.cuda.is_available() is false); nothing was run"
    from puremesh.services.rollout.vllm_device import vllm_platform

    if vllm_platform() != "cuda":
        return f"the installed vLLM build runs on {vllm_platform()!r}, not cuda; install vLLM's CUDA build"
    return None


# ------------------------------------------------------------------------------ learner


def learner_rows(policy: Path, scratch: Path, size: Size) -> list[tuple[str, str, str]]:
    import bench_learner
    from transformers import AutoConfig

    from puremesh.trainer.settings import LearnerSettings

    vocab = AutoConfig.from_pretrained(policy).vocab_size
    rows = []
    for ranks in (1, 2) if torch.cuda.device_count() >= 2 else (1,):
        settings = LearnerSettings.model_validate(
            {"policy_path": str(policy), "train_path": "unused", "out_dir": str(scratch / f"learner-{ranks}"),
             "device": "cuda", "dtype": "bfloat16", "algo": {"kl_coef": 0.001},
             "optim": {"lr": 1e-6, "minibatches": 2}}
        )  # fmt: skip
        seen = bench_learner.launch(
            ranks, settings.model_dump_json(), size.steps, size.rows, size.tokens, vocab
        )
        zero = seen[0]
        figure = f"{zero['step_s']:.3f} s/step, publish {zero['publish_s']:.2f} s"
        rows.append((f"learner bf16, {ranks} rank(s)", figure, f"{size.steps} updates of {size.rows} rows"))
    if torch.cuda.device_count() < 2:
        rows.append(("learner bf16, 2 ranks", "not run", "needs 2 GPUs"))
    return rows


# ------------------------------------------------------------------------------ weights


async def start_learner():
    """The learner's weight side as cli/learner.py wires it, NCCL on, sending from cuda:0."""
    from puremesh.cli.learner import weight_servicer, weight_store
    from puremesh.rpc.server import ServiceHost
    from puremesh.rpc.settings import ServerSettings
    from puremesh.trainer.settings import WeightServerSettings
    from puremesh.weightsync.servicer import weight_service

    weights = WeightServerSettings(nccl=True, nccl_device="cuda:0")
    store, bulk = weight_store(weights)
    servicer = weight_servicer(store, weights)
    host = ServiceHost([weight_service(servicer)], ServerSettings(port=0, metrics_port=None))
    await host.start()
    return store, bulk, servicer, host


def perturbed(policy: Path, version: int) -> list[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy, local_files_only=True, dtype=torch.float32)
    generator = torch.Generator().manual_seed(version)
    return [
        (n, p.detach() + 0.05 * torch.randn(p.shape, generator=generator))
        for n, p in model.named_parameters()
    ]


def transformers_greedy(
    policy: Path, weights: list[tuple[str, torch.Tensor]], prompt_ids: list[int]
) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(policy, local_files_only=True, dtype=torch.float32)
    model.load_state_dict(dict(weights), strict=False)
    model = model.to("cuda:0").eval()
    prompt = torch.tensor([prompt_ids], device="cuda:0")
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=GREEDY_TOKENS,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    return out[0, prompt.shape[1] :].tolist()


async def replica_greedy(target: str, prompt_ids: list[int]) -> list[int]:
    """The replica's greedy tokens for `prompt_ids`."""
    from puremesh.contract.sampling import SamplingSpec
    from puremesh.services.rollout.client import RolloutClient

    spec = SamplingSpec(n=1, temperature=0.0, max_new_tokens=GREEDY_TOKENS)
    async with RolloutClient(target) as client:
        [sample] = [s async for s in client.generate(prompt_ids, spec)]
    return list(sample.token_ids)


def prompt_ids(policy: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy, local_files_only=True)(PROMPT.format(i=0))["input_ids"]


def replica_env(policy: Path, learner_target: str) -> dict[str, str]:
    """The replica on its own GPU where there are two (NCCL), else beside the learner (bulk)."""
    two = torch.cuda.device_count() >= 2
    device = "cuda:1" if two else "cuda:0"
    return {
        "PUREMESH_ROLLOUT__ENGINE": "vllm", "PUREMESH_ROLLOUT__MODEL_PATH": str(policy),
        "PUREMESH_ROLLOUT__DEVICE": device, "PUREMESH_ROLLOUT__DTYPE": "float32",
        "PUREMESH_ROLLOUT__ENFORCE_EAGER": "false", "PUREMESH_ROLLOUT__GPU_MEMORY_UTILIZATION": "0.3",
        "PUREMESH_ROLLOUT__WEIGHTS_TARGET": learner_target, "PUREMESH_ROLLOUT__REPLICA_ID": REPLICA_ID,
        "PUREMESH_ROLLOUT__WEIGHTS_NCCL": "true" if two else "false",
    }  # fmt: skip


async def weights_rows(policy: Path) -> list[tuple[str, str, str]]:
    from puremesh.weightsync import nccl_sender

    store, bulk, _, host = await start_learner()
    rows = []
    try:
        with _common.Served("rollout", replica_env(policy, host.target)) as replica:
            for version in (1, 2):
                weights = perturbed(policy, version)
                sent_before = nccl_sender.NCCL_SENT_BYTES._value.get()
                began = time.perf_counter()
                info = await asyncio.to_thread(store.publish, version, weights)
                await store.wait_for_replicas(version, [REPLICA_ID], timeout=300)
                seconds = time.perf_counter() - began
                path = (
                    "NCCL"
                    if nccl_sender.NCCL_SENT_BYTES._value.get() > sent_before
                    else "bulk port (fallback)"
                )
                per_gb = seconds / (info.total_bytes / 1e9)
                rows.append((f"weights v{version} -> vLLM replica", f"{per_gb:.2f} s/GB", f"via {path}"))
                prompt = prompt_ids(policy)
                got = await replica_greedy(replica.target, prompt)
                want = await asyncio.to_thread(transformers_greedy, policy, weights, prompt)
                verdict = (
                    "same" if got == want else f"DIFFERENT: vllm {got[:8]}... transformers {want[:8]}..."
                )
                rows.append((f"greedy v{version} vs transformers", verdict, "CUDA graphs, in-place reload"))
    finally:
        store.close()
        if bulk is not None:
            bulk.close()
        await host.drain(grace=1)
    if torch.cuda.device_count() < 2:
        rows.append(("weights over NCCL", "not run", "needs 2 GPUs (one device per NCCL rank)"))
    return rows


# ------------------------------------------------------------------------------ rollout, prm


async def vllm_direct(policy: Path, size: Size) -> float:
    from puremesh.contract.sampling import SamplingSpec
    from puremesh.services.rollout.app import build_engine
    from puremesh.services.rollout.settings import RolloutSettings

    settings = RolloutSettings(
        engine="vllm", model_path=str(policy), device="cuda", dtype="float32", enforce_eager=False,
        gpu_memory_utilization=0.3,
    )  # fmt: skip
    torch.cuda.empty_cache()  # vLLM reserves a share of what is free
    engine = build_engine(settings)
    await engine.start()
    spec = SamplingSpec(n=4, temperature=1.0, max_new_tokens=size.new_tokens, seed=0)

    async def one(i: int) -> int:
        return sum(
            [len(s.token_ids) async for s in engine.generate(engine.tokenize(PROMPT.format(i=i)), spec)]
        )

    try:
        await one(0)
        began = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(size.prompts))))
        return tokens / (time.perf_counter() - began)
    finally:
        await engine.close()


def rollout_rows(policy: Path, size: Size) -> list[tuple[str, str, str]]:
    import bench_rollout_service

    env = {
        "PUREMESH_ROLLOUT__ENGINE": "vllm", "PUREMESH_ROLLOUT__MODEL_PATH": str(policy),
        "PUREMESH_ROLLOUT__DEVICE": "cuda:0", "PUREMESH_ROLLOUT__DTYPE": "float32",
        "PUREMESH_ROLLOUT__ENFORCE_EAGER": "false", "PUREMESH_ROLLOUT__GPU_MEMORY_UTILIZATION": "0.3",
    }  # fmt: skip
    with _common.Served("rollout", env) as server:
        service = asyncio.run(bench_rollout_service.service(server.target, size.prompts, 4, size.new_tokens))
    direct = asyncio.run(vllm_direct(policy, size))
    note = f"{size.prompts} prompts x 4 samples (target >= 0.9x)"
    return [
        ("rollout service tokens/s", f"{service:.0f}", "puremesh serve rollout, vllm on cuda:0"),
        ("vLLM direct tokens/s", f"{direct:.0f}", "VllmEngine in process"),
        ("rollout service / direct", f"{service / direct:.2f}x", note),
    ]


def prm_rows(prm: Path, size: Size) -> list[tuple[str, str, str]]:
    import random

    import bench_prm_service

    from puremesh.services.prm.scorer import PrmScorer
    from puremesh.tinyworld.corpus import arithmetic_solution

    scorer = PrmScorer(prm)  # on the CPU: only its tokenizer is used
    rng = random.Random(0)
    items = [
        (scorer.tokenize(f"Question {i}: compute step by step."), scorer.tokenize(arithmetic_solution(rng)))
        for i in range(size.prm_items)
    ]
    del scorer
    env = {
        "PUREMESH_PRM__MODEL_PATH": str(prm),
        "PUREMESH_PRM__DEVICE": "cuda:0",
        "PUREMESH_PRM__DTYPE": "bfloat16",
    }
    rates = {}
    for batching in ("true", "false"):
        with _common.Served("prm", {**env, "PUREMESH_PRM__BATCHING": batching}) as server:
            rates[batching] = asyncio.run(bench_prm_service.drive(server.target, items, 64, 4))
    return [
        ("prm bf16 items/s, batching on", f"{rates['true']:.0f}", "64 clients, 4 items per call"),
        ("prm bf16 items/s, batching off", f"{rates['false']:.0f}", ""),
        ("prm batching on / off", f"{rates['true'] / rates['false']:.2f}x", "target >= 3x"),
    ]


# ------------------------------------------------------------------------------ main


Row = tuple[str, str, str]  # (check, figure, note)


def run_check(name: str, check: Callable[[], list[Row]]) -> list[Row]:
    """The check's rows; one FAILED row if it raised (the other checks still run)."""
    began = time.perf_counter()
    try:
        rows = check()
    except Exception as error:
        return [(name, "FAILED", f"{type(error).__name__}: {error}".splitlines()[0][:160])]
    print(f"gpu_check: {name} done in {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[tuple[str, str, str]], size: str) -> None:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"puremesh gpu_check, size {size}, {len(gpus)} GPU(s): {', '.join(gpus)}")
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for check, figure, note in rows:
        print(f"  {check:<{widths[0]}}  {figure:<{widths[1]}}  {note}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = cuda_problem()
    if problem is not None:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    size = SIZES[args.size]
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        policy, prm = _common.build_models(scratch / "models", size.hidden, size.layers, size.heads)
        checks = {
            "learner": lambda: learner_rows(policy, scratch, size),
            "weights": lambda: asyncio.run(weights_rows(policy)),
            "rollout": lambda: rollout_rows(policy, size),
            "prm": lambda: prm_rows(prm, size),
        }
        rows: list[tuple[str, str, str]] = []
        for name in args.checks:
            rows += run_check(name, checks[name])
    print_table(rows, args.size)
    return 1 if any(figure.startswith(BAD) for _, figure, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
