"""Data-parallel shares and token-budget micro-batches (trainer/batching.py)."""

from __future__ import annotations

import torch

from puremesh.trainer.batching import micro_batches, plan, shares

LENGTHS = torch.tensor([9, 3, 7, 7, 2, 12, 5, 4, 8, 1])


def test_shares_split_every_row_once_and_balance_tokens() -> None:
    rows = torch.tensor([5, 0, 2, 8, 3, 6, 7, 1, 4, 9])
    parts = shares(LENGTHS, rows, 3)
    flat = sorted(r for part in parts for r in part.tolist())
    assert flat == sorted(rows.tolist())
    loads = [int(LENGTHS[part].sum()) for part in parts]
    assert max(loads) - min(loads) <= int(LENGTHS.max())
    # each share keeps the order the rows came in
    for part in parts:
        positions = [rows.tolist().index(r) for r in part.tolist()]
        assert positions == sorted(positions)
    assert [p.tolist() for p in shares(LENGTHS, rows, 1)] == [rows.tolist()]


def test_micro_batches_stay_within_the_budget() -> None:
    rows = torch.arange(10)
    for budget in (1, 12, 16, 30, 1000):
        passes = micro_batches(LENGTHS, rows, budget)
        assert sorted(r for p in passes for r in p.tolist()) == list(range(10))
        for p in passes:
            cost = len(p) * int(LENGTHS[p].max())
            assert cost <= budget or len(p) == 1  # a row longer than the budget runs alone
    assert len(micro_batches(LENGTHS, rows, 1000)) == 1
    assert len(micro_batches(LENGTHS, rows, 1)) == 10


def test_plan_gives_every_rank_the_same_number_of_passes() -> None:
    rows = torch.tensor([0, 1, 2])
    per_rank = plan(LENGTHS, rows, 4, 10)
    assert len(per_rank) == 4 and len({len(p) for p in per_rank}) == 1
    assert sum(len(p) for passes in per_rank for p in passes) == 3
    assert any(len(p) == 0 for passes in per_rank for p in passes)  # padding passes
