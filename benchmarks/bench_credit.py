"""Credit assignment speed: the vectorised PURE core against the per-response loop reference.

Batch: 1,024 responses in groups of 4, each with 1..32 steps and up to 2,048 tokens, under the
algorithm's defaults (trainer/algo/options.py: PRM+VR mode, min-form credit, KL penalty on).
Prints both times, the ratio and the cost per million tokens. Targets (issue 2): >= 50x faster
than the loop, < 100 ms per million tokens.

    .venv/bin/python benchmarks/bench_credit.py [--responses 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from puremesh.trainer.algo import (
    DEFAULT_BASELINE,
    DEFAULT_CREDIT,
    DEFAULT_KL_COEF,
    DEFAULT_REWARD_MODE,
    DEFAULT_TEMPERATURE,
    pure_advantages,
    step_end_mask_from_lengths,
)
from puremesh.trainer.algo.reference import reference_advantages


def make_batch(responses: int, group_size: int, max_steps: int, max_tokens: int, seed: int):
    rng = random.Random(seed)
    groups = []
    for _ in range(responses // group_size):
        group = []
        has_truth = rng.random() < 0.5
        for _ in range(group_size):
            steps = rng.randint(1, max_steps)
            total = rng.randint(steps, max_tokens)
            cuts = sorted(rng.sample(range(1, total), steps - 1)) if steps > 1 else []
            lengths = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
            group.append(
                {
                    "step_tokens": lengths,
                    "step_scores": [rng.uniform(-1, 1) for _ in range(steps)],
                    "solved": rng.random() < 0.5,
                    "has_ground_truth": has_truth,
                    "kl": [rng.gauss(0, 0.05) for _ in range(total)],
                }
            )
        groups.append(group)
    return groups


def to_tensors(groups):
    flat = [r for g in groups for r in g]
    token_mask, step_end_mask = step_end_mask_from_lengths([r["step_tokens"] for r in flat])
    scores = torch.zeros(len(flat), max(len(r["step_scores"]) for r in flat), dtype=torch.float32)
    kl = torch.zeros(token_mask.shape, dtype=torch.float32)
    for i, r in enumerate(flat):
        scores[i, : len(r["step_scores"])] = torch.tensor(r["step_scores"])
        kl[i, : len(r["kl"])] = torch.tensor(r["kl"])
    group_index = torch.tensor([g for g, group in enumerate(groups) for _ in group])
    return dict(
        step_scores=scores,
        step_end_mask=step_end_mask,
        token_mask=token_mask,
        group_index=group_index,
        solved=torch.tensor([r["solved"] for r in flat]),
        has_ground_truth=torch.tensor([r["has_ground_truth"] for r in flat]),
        kl=kl,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=1024)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = dict(
        credit=DEFAULT_CREDIT,
        temperature=DEFAULT_TEMPERATURE,
        reward_mode=DEFAULT_REWARD_MODE,
        baseline=DEFAULT_BASELINE,
        kl_coef=DEFAULT_KL_COEF,
    )

    groups = make_batch(args.responses, args.group_size, args.max_steps, args.max_tokens, args.seed)
    tensors = to_tensors(groups)
    tokens = int(tensors["token_mask"].sum())
    print(
        f"batch: {args.responses} responses, {tokens:,} tokens, padded to {tensors['token_mask'].shape[1]}, "
        f"torch threads {torch.get_num_threads()}"
    )

    pure_advantages(**tensors, **settings)  # warm-up
    vectorised = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        result = pure_advantages(**tensors, **settings)
        vectorised.append(time.perf_counter() - began)
    began = time.perf_counter()
    reference = reference_advantages(groups, **settings)
    loop_seconds = time.perf_counter() - began

    flat = [r for g in reference for r in g]
    worst = max(
        abs(a - b)
        for i, r in enumerate(flat)
        for a, b in zip(r["normalized"], result.normalized[i, : len(r["normalized"])].tolist(), strict=True)
    )
    fast = statistics.median(vectorised)
    per_million = fast / tokens * 1e6 * 1e3
    print(f"loop reference    : {loop_seconds * 1e3:10.1f} ms")
    print(f"vectorised (median of {args.repeats}): {fast * 1e3:8.1f} ms")
    print(f"ratio loop / vectorised: {loop_seconds / fast:8.1f}x   (target >= 50x)")
    print(f"vectorised per million tokens: {per_million:6.1f} ms   (target < 100 ms)")
    print(f"max |difference| of normalised advantages: {worst:.2e} (float32 vs float64 reference)")


if __name__ == "__main__":
    main()
