"""Blocked mining on plain arrays equals sentence-transformers' paraphrase_mining_embeddings."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from sentence_transformers.util import paraphrase_mining_embeddings as st_mining

from pipeline.mining import (
    best_entries,
    best_pairs,
    diagonal_candidates,
    normalize,
    off_diagonal_candidates,
    paraphrase_mining_embeddings,
    row_blocks,
    score_floor,
)
from tests.conftest import clustered_vectors, duplicate_groups, random_vectors


def diagonal_floor(x, top_k, max_pairs, block_size):
    """The floor phase 1 gives for these vectors."""
    x = normalize(x)
    found = [diagonal_candidates(x[a:b], a, top_k) for a, b in row_blocks(len(x), block_size)]
    return score_floor((s for _, _, s in found), max_pairs)


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


def test_score_floor_hand_checked():
    blocks = [np.array([0.875, 0.75, 0.5], np.float32), np.array([0.625, 0.25], np.float32)]
    # best first: 0.875 0.75 0.625 0.5 0.25
    assert score_floor(blocks, max_pairs=1) == 0.75  # the 2nd best
    assert score_floor(blocks, max_pairs=2) == 0.5  # the 4th best
    assert score_floor(blocks, max_pairs=3) == -np.inf  # fewer than 6 scores
    assert score_floor(blocks, max_pairs=2, threshold=0.6) == 0.6
    assert score_floor(blocks, max_pairs=2, threshold=0.3) == 0.5
    assert score_floor(blocks, max_pairs=3, threshold=0.3) == 0.3


@pytest.mark.parametrize(
    "make, top_k, max_pairs, block_size",
    [
        (random_vectors, 10, 200, 64),  # the floor drops most off-diagonal scores
        (partial(clustered_vectors, clusters=2), 3, 500, 64),  # rows and columns with over top_k scores above it
    ],
)
def test_active_floor_matches_sentence_transformers(make, top_k, max_pairs, block_size):
    x = make(600)
    assert diagonal_floor(x, top_k, max_pairs, block_size) > -np.inf
    ref = st_mining(torch.from_numpy(x), top_k=top_k, max_pairs=max_pairs)
    assert_same_pairs(paraphrase_mining_embeddings(x, top_k=top_k, max_pairs=max_pairs, block_size=block_size), ref)


def test_fewer_candidates_than_twice_max_pairs():
    x = random_vectors(200)
    assert diagonal_floor(x, 3, 400, 50) == -np.inf  # 200 rows x 3 candidates < 2 * 400
    ours = paraphrase_mining_embeddings(x, top_k=3, max_pairs=400, block_size=50)
    assert_same_pairs(ours, st_mining(torch.from_numpy(x), top_k=3, max_pairs=400))


def test_exact_duplicates_at_the_floor_are_kept():
    x, spread = duplicate_groups()
    assert diagonal_floor(x, 2, 18, 6) == 1.0
    assert paraphrase_mining_embeddings(x, top_k=2, max_pairs=18, block_size=6) == [(1.0, i, j) for i, j in spread]
    assert [s for s, _, _ in st_mining(torch.from_numpy(x), top_k=2, max_pairs=18)] == [1.0] * 18  # ST breaks ties its own way


def test_threshold_above_and_below_the_floor():
    x = clustered_vectors(600, noise=0.2)
    floor = diagonal_floor(x, 5, 300, 64)
    ref = st_mining(torch.from_numpy(x), top_k=5, max_pairs=300)
    below, above = floor - 0.01, ref[150][0]
    assert floor < above
    for threshold, kept in ((below, 300), (above, 151)):
        ours = paraphrase_mining_embeddings(x, top_k=5, max_pairs=300, block_size=64, threshold=threshold)
        assert_same_pairs(ours, [r for r in ref if r[0] >= threshold])
        assert len(ours) == kept


def test_block_candidates_stay_bounded_when_every_score_ties():
    x = normalize(np.ones((12, 4), np.float32))  # every score is exactly 1
    rows, cols, s = diagonal_candidates(x[:6], 0, 2)
    assert np.bincount(rows).tolist() == [2] * 6 and (rows != cols).all() and (s == 1).all()
    rows, cols, s = off_diagonal_candidates(x[:6], x[6:], 0, 6, 2, floor=float("-inf"))
    assert len(s) <= (6 + 6) * 2  # of the 36 scores
    assert np.bincount(rows).min() >= 2 and np.bincount(cols - 6).min() >= 2  # each row and column keeps its top-2


def test_each_part_cut_to_its_best_entries_gives_the_same_best_pairs():
    """The reduce tasks cut their candidates with best_entries(2 * max_pairs) before the driver's
    best_pairs: the same answer, ties at the cut and a pair's two copies in different parts included."""
    rng = np.random.default_rng(3)
    n, max_pairs = 60, 40
    i, j = np.triu_indices(n, 1)
    scores = np.round(rng.random(len(i)), 2).astype(np.float32)  # two decimals: many ties
    twice = rng.random(len(i)) < 0.5  # half the pairs come from both of their rows
    a, b = np.r_[i, i[twice]], np.r_[j, j[twice]]
    s = np.r_[scores, scores[twice] - np.float32(1e-7) * rng.integers(0, 2, twice.sum())]  # a copy may score a hair less
    parts = np.array_split(rng.permutation(len(s)), 4)
    assert all(len(p) > 2 * max_pairs for p in parts)  # every part is really cut
    cut = [best_entries(a[p], b[p], s[p], 2 * max_pairs) for p in parts]
    assert all(len(c[2]) < len(p) for c, p in zip(cut, parts))
    whole = best_pairs(a, b, s, max_pairs)
    pieced = best_pairs(*(np.concatenate(x) for x in zip(*cut)), max_pairs)
    for got, want in zip(pieced, whole):
        np.testing.assert_array_equal(got, want)


def masked_reference(x, groups, top_k, max_pairs):
    """Brute force, as paraphrase_mining_embeddings defines mining, on a score matrix where two rows
    of one group (and a row with itself) never pair: each row's top-k, each pair once, best max_pairs."""
    x = normalize(x)
    scores = x @ x.T
    groups = np.asarray(groups)
    scores[groups[:, None] == groups[None, :]] = -np.inf
    found = {}
    for i in range(len(x)):
        for j in np.argsort(-scores[i], kind="stable")[:top_k]:
            if np.isfinite(scores[i, j]):
                found[(min(i, j), max(i, j))] = float(scores[i, j])
    best = sorted(found.items(), key=lambda kv: -kv[1])[:max_pairs]
    return [(s, i, j) for (i, j), s in best]


def chunk_groups(n, seed=0):
    """Documents of 1 to 9 consecutive chunks, as embed --chunk-tokens writes them."""
    sizes = np.random.default_rng(seed).integers(1, 10, n)
    return np.repeat(np.arange(n), sizes)[:n]


@pytest.mark.parametrize("device", [None, "cpu"], ids=["numpy", "torch-bfloat16"])
@pytest.mark.parametrize(
    "n, top_k, max_pairs, block_size", [(300, 5, 10_000, 64), (300, 10, 200, 97), (120, 200, 100_000, 50), (60, 1, 7, 13)]
)
def test_chunks_of_one_document_are_never_paired(device, n, top_k, max_pairs, block_size):
    x = clustered_vectors(n)
    x[1::2] = x[::2][: len(x[1::2])] + 0.01 * x[1::2]  # each odd row a near copy of the row before it...
    groups = chunk_groups(n)  # ...often in the same document, as overlapping neighbours are
    ours = paraphrase_mining_embeddings(x, top_k=top_k, max_pairs=max_pairs, block_size=block_size, groups=groups,
                                        device=device, dtype="bfloat16")
    assert_same_pairs(ours, masked_reference(x, groups, top_k, max_pairs))
    assert all(groups[i] != groups[j] for _, i, j in ours) and ours


def test_one_document_per_row_is_plain_mining():
    x = clustered_vectors(200)
    plain = paraphrase_mining_embeddings(x, top_k=5, max_pairs=300, block_size=64)
    assert_same_pairs(paraphrase_mining_embeddings(x, top_k=5, max_pairs=300, block_size=64, groups=np.arange(200)), plain)
