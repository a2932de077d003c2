"""The search math on numpy arrays (pipeline.retrieval): the same answer as sentence-transformers'
util.semantic_search for the same vectors, whatever the block size; exactly equal scores in row order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers.util import semantic_search as st_search

from pipeline.retrieval import EMPTY_ROW, RunningTopK, semantic_search
from tests.conftest import assert_same_search, clustered_vectors, random_vectors


@pytest.mark.parametrize("make, n, k, block", [
    (random_vectors, 1000, 10, 128),     # 8 blocks, the last one short
    (clustered_vectors, 700, 25, 64),    # close neighbours: many candidates per block
    (random_vectors, 300, 10, 10_000),   # one block
    (random_vectors, 7, 10, 3),          # k beyond the rows: every row, best first
])
def test_equals_semantic_search(make, n, k, block):
    corpus = make(n, 24) * 3  # not unit length: cosine normalises both sides
    queries = make(40, 24, seed=5)
    ours = semantic_search(queries, corpus, top_k=k, block_size=block)
    theirs = st_search(torch.from_numpy(queries), torch.from_numpy(corpus), top_k=k)
    assert_same_search(ours, theirs)
    assert all(len(hits) == min(k, n) for hits in ours)
    assert all([h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True) for hits in ours)


def test_rows_that_keep_getting_better_and_exact_ties():
    """Rows sorted worst first (every block beats the last) and +1/-1 vectors scored as binary outputs
    are (scores tie by the dozen): the same answer, and equal scores in row order, whatever the block size."""
    rng = np.random.default_rng(3)
    query = rng.standard_normal((1, 16)).astype(np.float32)
    corpus = rng.standard_normal((500, 16)).astype(np.float32)
    corpus = corpus[np.argsort(corpus @ query[0] / np.linalg.norm(corpus, axis=1))]  # worst first
    assert_same_search(semantic_search(query, corpus, top_k=20, block_size=32),
                       st_search(torch.from_numpy(query), torch.from_numpy(corpus), top_k=20))
    signs = np.sign(rng.standard_normal((3000, 32))).astype(np.float32)
    queries = np.sign(rng.standard_normal((30, 32))).astype(np.float32)

    def binary(block_size):
        found = RunningTopK(queries, 15, divisor=32)
        for start in range(0, len(signs), block_size):
            found.add(signs[start : start + block_size])
        rows, scores = found.result()
        return [[{"corpus_id": int(r), "score": float(s)} for r, s in zip(*hit)] for hit in zip(rows, scores)]

    whole = binary(5000)
    for block in (1, 7, 256):
        assert binary(block) == whole
    assert_same_search(whole, st_search(torch.from_numpy(queries), torch.from_numpy(signs), top_k=15))
    hamming = (32 - queries @ signs.T) / 2  # 1 - 2 * Hamming / dim, exactly
    assert all(h["score"] == 1 - 2 * hamming[q, h["corpus_id"]] / 32 for q, hits in enumerate(whole) for h in hits)
    for hits in whole:  # equal scores: the earlier row first
        for a, b in zip(hits, hits[1:]):
            assert a["score"] > b["score"] or (a["score"] == b["score"] and a["corpus_id"] < b["corpus_id"])


def test_running_top_k_holds_queries_times_k_and_counts_rows():
    found = RunningTopK(random_vectors(3, 8), k=4)
    assert found.result()[0].shape == (3, 0)  # no rows yet
    found.add(random_vectors(2, 8, seed=1))
    found.add(random_vectors(5, 8, seed=2))
    rows, scores = found.result()
    assert found.seen == 7 and rows.shape == scores.shape == (3, 4) and scores.dtype == np.float32
    assert rows.min() >= 0 and rows.max() < 7
    assert found.scores.shape == (3, 4)  # what is held, whatever the rows seen
    nan = RunningTopK(random_vectors(2, 8), k=3)
    nan.add(np.full((5, 8), np.nan, np.float32))  # NaN never ranks: the slots stay empty (search refuses that)
    assert (nan.result()[0] == EMPTY_ROW).all()
