"""Micro-batching by token budget (pure function)."""

import numpy as np

from pipeline.encode import plan_micro_batches


def test_rows_fill_the_token_budget():
    lengths = np.array([10, 10, 8, 5, 5, 5, 2])
    # budget 30: [10,10,8] pads to 10 -> 30 tokens; [5,5,5,2] pads to 5 -> 20
    assert plan_micro_batches(lengths, 30) == [(0, 3), (3, 7)]


def test_a_row_longer_than_the_budget_gets_its_own_batch():
    assert plan_micro_batches(np.array([100, 3, 3]), 10) == [(0, 1), (1, 3)]


def test_every_row_is_covered_once():
    lengths = np.sort(np.random.default_rng(0).integers(1, 300, 1000))[::-1]
    spans = plan_micro_batches(lengths, 4096)
    covered = [i for a, b in spans for i in range(a, b)]
    assert covered == list(range(1000))
    assert all((b - a) * lengths[a] <= 4096 or b - a == 1 for a, b in spans)
