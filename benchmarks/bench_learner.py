"""The sharded learner on CPU (gloo): 1 rank against 2, and two micro-batch budgets, in one run.

Each configuration launches its ranks with torch.distributed's elastic launcher (the engine of
torchrun) and runs the learner's own code (trainer/controller.py): a random Qwen2 policy of
about `--hidden` x `--layers`, `--steps` PPO updates on one random rollout batch of `--rows`
responses of `--tokens` to 3 x `--tokens` tokens, then the publish path (every rank gathers the
full weights to rank 0, which publishes them into a WeightStore). Printed per configuration
and rank:

  step s        median seconds of one update (old + reference passes, PPO minibatches)
  shard MB      the rank's own parameters + gradients + Adam state (exact, from its shards)
  peak RSS MB   the process's peak resident memory (ru_maxrss; includes torch itself)
  publish s     gather_weights + WeightStore.publish, on rank 0

and the ratios: step time 2 ranks / 1 rank, shard MB per rank 2 / 1 (about 0.5 if sharding
works), peak RSS per rank against the budget, publish time sharded / unsharded. On a 2-core
machine 2 ranks take one core each while 1 rank uses both, so step time cannot halve here.
OpenMP workers sleep while they wait, as under `puremesh up` and `train` (cli/main.py).

    .venv/bin/python benchmarks/bench_learner.py [--hidden 512] [--layers 8] [--rows 16]
                                                 [--tokens 20] [--steps 2] [--budgets 256,4096]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `puremesh up` and `train` (cli/main.py)

import _common  # noqa: F401  (offline environment)
import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.distributed.tensor import DTensor
from transformers import Qwen2Config, Qwen2ForCausalLM

from puremesh.tinyworld.tokenizer import build_tokenizer
from puremesh.trainer.controller import Controller, follow
from puremesh.trainer.policy import pack
from puremesh.trainer.ranks import start_ranks
from puremesh.trainer.settings import LearnerSettings
from puremesh.trainer.update import Experience
from puremesh.weightsync.store import WeightStore

MB = 1e6


def build_policy(out: Path, hidden: int, layers: int) -> Path:
    tokenizer = build_tokenizer(out / "tokenizer")
    heads = max(1, hidden // 64)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    policy = out / "policy"
    Qwen2ForCausalLM(config).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    return policy


def rollout_batch(rows: int, tokens: int, vocab: int, seed: int = 0) -> Experience:
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(rows // 2):
        prompt = torch.randint(
            5, vocab, (int(torch.randint(10, 30, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(2):
            prompts.append(prompt)
            length = int(torch.randint(tokens, 3 * tokens, (1,), generator=g))
            responses.append(torch.randint(5, vocab, (length,), generator=g).tolist())
    sequences = pack(prompts, responses, 0)
    ends = torch.zeros(sequences.response_mask.shape, dtype=torch.bool)
    for row, response in enumerate(responses):
        ends[row, [len(response) // 2, len(response) - 1]] = True
    return Experience(
        sequences, torch.arange(rows) // 2, torch.rand(rows, 2, generator=g) * 2 - 1, ends,
        torch.rand(rows, generator=g) > 0.5, torch.ones(rows, dtype=torch.bool), torch.zeros(rows),
        torch.zeros(sequences.response_mask.shape),
    )  # fmt: skip


def shard_megabytes(trainable) -> float:
    """This rank's parameters, gradients and Adam moments, in MB (from its local shards)."""
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in trainable.model.parameters())
    return local * 4 * 4 / MB  # fp32 master weights + gradients + two Adam moments


def worker(settings_json: str, steps: int, rows: int, tokens: int, vocab: int) -> dict:
    """One rank: `steps` updates, then one publish; returns its measurements."""
    settings = LearnerSettings.model_validate_json(settings_json)
    ranks = start_ranks(settings.distributed, settings.device)
    try:
        if not ranks.is_controller:
            follow(settings, ranks)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
            return {"rank": ranks.rank, "peak_rss_mb": peak}
        controller = Controller(settings, ranks)
        controller.load(None)
        batch = rollout_batch(rows, tokens, vocab)
        seconds = []
        for step in range(1, steps + 1):
            began = time.perf_counter()
            controller.update(batch, step, step, [0, step])
            seconds.append(time.perf_counter() - began)
        store = WeightStore(retain=1)
        began = time.perf_counter()
        store.publish(1, controller.gather())
        publish = time.perf_counter() - began
        store.close()
        shard = shard_megabytes(controller.require())
        controller.stop()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        return {"rank": 0, "step_s": statistics.median(seconds), "publish_s": publish, "peak_rss_mb": peak,
                "shard_mb": shard}  # fmt: skip
    finally:
        ranks.close()


def launch(nproc: int, *args) -> dict[int, dict]:
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"bench-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2,
        start_method="spawn",
    )  # fmt: skip
    return elastic_launch(config, worker)(*args)


def run(policy: Path, out: Path, ranks: int, budget: int, args) -> dict[int, dict]:
    settings = LearnerSettings.model_validate(
        {
            "policy_path": str(policy), "train_path": "unused", "out_dir": str(out),
            "algo": {"kl_coef": 0.001}, "optim": {"lr": 1e-6, "minibatches": 2},
            "memory": {"micro_batch_tokens": budget},
        }
    )  # fmt: skip
    vocab = 300
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    return launch(ranks, settings.model_dump_json(), args.steps, args.rows, args.tokens, vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=20, help="shortest response; the longest is 3x")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--budgets", default="256,4096")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        policy = build_policy(Path(scratch), args.hidden, args.layers)
        params = sum(t.numel() for t in Qwen2ForCausalLM.from_pretrained(policy).parameters()) / 1e6
        cores = os.cpu_count()
        shape = f"{args.rows} responses of {args.tokens}-{3 * args.tokens} tokens"
        print(f"policy: {params:.1f} M parameters; {shape}; {cores} cores")
        results = {}
        for budget in budgets:
            for ranks in (1, 2):
                results[(ranks, budget)] = run(
                    policy, Path(scratch) / f"run-{ranks}-{budget}", ranks, budget, args
                )
    header = ("ranks", "budget", "step s", "shard MB", "peak RSS MB per rank", "publish s")
    print("{:>5} {:>7} {:>7} {:>9} {:>22} {:>9}".format(*header))
    for (ranks, budget), seen in results.items():
        rss = " / ".join(f"{seen[r]['peak_rss_mb']:.0f}" for r in sorted(seen))
        zero = seen[0]
        row = (ranks, budget, zero["step_s"], zero["shard_mb"], rss, zero["publish_s"])
        print("{:>5} {:>7} {:7.2f} {:9.1f} {:>22} {:9.2f}".format(*row))
    for budget in budgets:
        one, two = results[(1, budget)][0], results[(2, budget)][0]
        print(
            f"budget {budget}: 2 ranks / 1 rank: step {two['step_s'] / one['step_s']:.2f}x, "
            f"shard per rank {two['shard_mb'] / one['shard_mb']:.2f}x, peak RSS per rank "
            f"{max(s['peak_rss_mb'] for s in results[(2, budget)].values()) / one['peak_rss_mb']:.2f}x, "
            f"publish {two['publish_s'] / one['publish_s']:.2f}x"
        )
    low, high = min(budgets), max(budgets)
    for ranks in (1, 2):
        ratio = results[(ranks, high)][0]["peak_rss_mb"] / results[(ranks, low)][0]["peak_rss_mb"]
        print(f"{ranks} rank(s): peak RSS at budget {high} / at {low}: {ratio:.2f}x")
    json.dump({f"{r}x{b}": v for (r, b), v in results.items()}, sys.stderr)


if __name__ == "__main__":
    main()
