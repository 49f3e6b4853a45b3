"""Who computes which rows, and in how many passes: data-parallel shares and micro-batches.

Every rank holds the whole batch (rank 0 sends it) and runs the same planning, so every rank
knows every rank's plan without talking to them:

- `shares`: a set of rows split over the ranks, longest first to the rank with the fewest
  tokens so far, so ranks carry about equal work; each row goes to exactly one rank.
- `micro_batches`: one rank's rows cut into passes of at most `budget` tokens (rows x the
  longest packed sequence among them). A row longer than the budget runs alone.
- `plan`: both, with every rank's list padded by empty passes to the longest list, because FSDP2's
  collectives need every rank to run the same number of forward and backward passes (an
  empty pass runs one row with weight 0).

Plain tensors and ints; no torch.distributed here.
"""

from __future__ import annotations

import torch


def shares(lengths: torch.Tensor, rows: torch.Tensor, world: int) -> list[torch.Tensor]:
    """`rows` (indices into `lengths`, [B] tokens per row) split into `world` disjoint shares
    of about equal tokens; each share keeps its rows in their order in `rows`."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    load = [0] * world
    owner: dict[int, int] = {}
    for row in sorted(rows.tolist(), key=lambda r: (-int(lengths[r]), r)):
        rank = min(range(world), key=lambda k: (load[k], k))
        owner[row] = rank
        load[rank] += int(lengths[row])
    ordered = rows.tolist()
    return [torch.tensor([r for r in ordered if owner[r] == k], dtype=torch.long) for k in range(world)]


def micro_batches(lengths: torch.Tensor, rows: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """`rows` cut into consecutive passes (sorted by length, so padding stays small) of at most
    `budget` tokens each, counted as rows x the longest sequence of the pass."""
    if budget < 1:
        raise ValueError(f"the micro-batch token budget must be >= 1, got {budget}")
    ordered = sorted(rows.tolist(), key=lambda r: (int(lengths[r]), r))
    passes: list[list[int]] = []
    current: list[int] = []
    for row in ordered:
        longest = int(lengths[row])  # ascending: the newest row is the longest
        if current and (len(current) + 1) * longest > budget:
            passes.append(current)
            current = []
        current.append(row)
    if current:
        passes.append(current)
    return [torch.tensor(p, dtype=torch.long) for p in passes]


def plan(lengths: torch.Tensor, rows: torch.Tensor, world: int, budget: int) -> list[list[torch.Tensor]]:
    """For each rank, its passes over its share of `rows`; all lists equally long (padded with
    empty index tensors)."""
    per_rank = [micro_batches(lengths, share, budget) for share in shares(lengths, rows, world)]
    count = max(1, max(len(passes) for passes in per_rank))
    empty = torch.empty(0, dtype=torch.long)
    return [passes + [empty] * (count - len(passes)) for passes in per_rank]
