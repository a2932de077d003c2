"""Blocked mining on plain arrays equals sentence-transformers' paraphrase_mining_embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers.util import paraphrase_mining_embeddings as st_mining

from pipeline.mining import paraphrase_mining_embeddings


def random_vectors(n, d=24, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def clustered_vectors(n, d=24, clusters=15, noise=0.05, seed=1):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + noise * rng.standard_normal((n, d))).astype(np.float32)


def assert_same_pairs(ours, ref):
    ref_map = {(min(i, j), max(i, j)): s for s, i, j in ref}
    our_map = {(i, j): s for s, i, j in ours}
    assert set(our_map) == set(ref_map)
    assert max(abs(our_map[p] - ref_map[p]) for p in ref_map) <= 1e-5 if ref_map else True
    scores = [s for s, _, _ in ours]
    assert scores == sorted(scores, reverse=True)
    assert all(i < j for _, i, j in ours)


@pytest.mark.parametrize("make", [random_vectors, clustered_vectors], ids=["random", "clustered"])
@pytest.mark.parametrize(
    "n, top_k, max_pairs, block_size",
    [(300, 5, 10_000, 64), (300, 10, 200, 97), (257, 3, 50, 1000), (120, 200, 100_000, 50), (50, 1, 7, 13)],
)
def test_matches_sentence_transformers(make, n, top_k, max_pairs, block_size):
    x = make(n)
    ref = st_mining(torch.from_numpy(x), top_k=top_k, max_pairs=max_pairs)
    ours = paraphrase_mining_embeddings(x, top_k=top_k, max_pairs=max_pairs, block_size=block_size)
    assert_same_pairs(ours, ref)


def test_block_size_does_not_change_the_answer():
    x = clustered_vectors(500)
    answers = [paraphrase_mining_embeddings(x, top_k=8, max_pairs=1000, block_size=b) for b in (7, 64, 499, 5000)]
    first = {(i, j): s for s, i, j in answers[0]}
    for answer in answers[1:]:
        got = {(i, j): s for s, i, j in answer}
        assert set(got) == set(first)  # same pairs; scores differ only by matmul rounding
        assert max(abs(got[p] - first[p]) for p in got) <= 1e-6


def test_threshold_keeps_pairs_at_or_above():
    x = clustered_vectors(200)
    full = paraphrase_mining_embeddings(x, top_k=10, max_pairs=10_000, block_size=64)
    cut = paraphrase_mining_embeddings(x, top_k=10, max_pairs=10_000, block_size=64, threshold=0.9)
    assert cut == [p for p in full if p[0] >= 0.9] and 0 < len(cut) < len(full)


def test_tiny_hand_checked_case():
    # unit vectors at 0, 10 and 90 degrees: cos(0,10) = 0.985, cos(10,90) = 0.174, cos(0,90) = 0
    angles = np.radians([0, 10, 90])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    pairs = paraphrase_mining_embeddings(x, top_k=1, max_pairs=10, block_size=2)
    assert [(i, j) for _, i, j in pairs] == [(0, 1), (1, 2)]
    assert pairs[0][0] == pytest.approx(np.cos(np.radians(10)), abs=1e-6)
