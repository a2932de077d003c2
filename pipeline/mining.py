"""Paraphrase mining: all most-similar pairs of a set of vectors, by blocked matrix products.

The result is the one `sentence_transformers.util.paraphrase_mining_embeddings`
gives for the same vectors, `top_k` and `max_pairs`: cosine scores, no self
pairs, each unordered pair once, the best `max_pairs` by score, descending.

The N x N similarity matrix is cut into blocks of `block_size` rows. It is
symmetric, so each block pair (I <= J) is computed once and yields top-k
candidates for the rows of I (over its rows) and for the rows of J (over its
columns). Per-row candidates are merged into each row's top-k; the union of
those lists, deduplicated, is ranked for the final `max_pairs`.

Memory per worker is two blocks of vectors and one block x block score
matrix: `block_size` trades memory (4 * block_size^2 bytes of scores) for the
number of tasks (n_blocks * (n_blocks + 1) / 2).

The functions here work on plain arrays; `pipeline.mine` spreads them over Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TopK:
    """Per-row best candidates: values and global column indices, shape (rows, <=k)."""

    values: torch.Tensor
    indices: torch.Tensor


def normalize(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length, as `sentence_transformers.util.cos_sim` does (eps 1e-12)."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()
    return torch.nn.functional.normalize(t, p=2, dim=1)


def block_pair_topk(a: torch.Tensor, b: torch.Tensor, a_start: int, b_start: int, k: int) -> tuple[TopK, TopK | None]:
    """Top-k of the rows and of the columns of the block a @ b.T (normalised inputs).

    On a diagonal block (a_start == b_start) self pairs are excluded and only
    the rows are returned: by symmetry they already cover the columns.
    """
    scores = a @ b.T  # (A, B)
    same = a_start == b_start
    if same:
        scores.fill_diagonal_(float("-inf"))
    rows = _topk(scores, k, b_start)
    cols = None if same else _topk(scores.T.contiguous(), k, a_start)  # contiguous: ~1.4x faster topk
    return rows, cols


def _topk(scores: torch.Tensor, k: int, column_start: int) -> TopK:
    kk = min(k, scores.shape[1])
    values, indices = torch.topk(scores, kk, dim=1)
    return TopK(values, indices + column_start)


def merge_topk(parts: list[TopK], k: int) -> TopK:
    """Row-wise top-k of several candidate lists for the same rows."""
    values = torch.cat([p.values for p in parts], dim=1)
    indices = torch.cat([p.indices for p in parts], dim=1)
    kk = min(k, values.shape[1])
    best, pos = torch.topk(values, kk, dim=1)
    return TopK(best, torch.gather(indices, 1, pos))


def candidate_pairs(top: TopK, row_start: int, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, score) with i < j from per-row top-k lists; self and -inf entries dropped."""
    n, kk = top.values.shape
    rows = np.repeat(np.arange(row_start, row_start + n), kk)
    cols = top.indices.reshape(-1).numpy()
    scores = top.values.reshape(-1).numpy()
    keep = np.isfinite(scores) & (rows != cols)
    if threshold is not None:
        keep &= scores >= threshold
    rows, cols, scores = rows[keep], cols[keep], scores[keep]
    return np.minimum(rows, cols), np.maximum(rows, cols), scores.astype(np.float32)


def best_pairs(i: np.ndarray, j: np.ndarray, s: np.ndarray, max_pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each unordered pair once, the `max_pairs` best by score (ties by i, then j), descending."""
    if len(s) == 0:
        return i, j, s
    order = np.lexsort((j, i, -s.astype(np.float64)))
    i, j, s = i[order], j[order], s[order]
    key = i.astype(np.int64) * (int(max(i.max(), j.max())) + 1) + j
    _, first = np.unique(key, return_index=True)
    first.sort()  # keep score order
    first = first[:max_pairs]
    return i[first], j[first], s[first]


def row_blocks(n: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + block_size)) for start in range(0, n, block_size)]


def paraphrase_mining_embeddings(
    embeddings: np.ndarray | torch.Tensor,
    top_k: int = 100,
    max_pairs: int = 500_000,
    block_size: int = 4096,
    threshold: float | None = None,
) -> list[tuple[float, int, int]]:
    """In-process blocked mining: [(score, i, j), ...] best first, as sentence-transformers returns."""
    x = normalize(embeddings)
    blocks = row_blocks(len(x), block_size)
    tops: dict[int, list[TopK]] = {start: [] for start, _ in blocks}
    for bi, (a0, a1) in enumerate(blocks):
        for b0, b1 in blocks[bi:]:
            rows, cols = block_pair_topk(x[a0:a1], x[b0:b1], a0, b0, top_k)
            tops[a0].append(rows)
            if cols is not None:
                tops[b0].append(cols)
    found = [candidate_pairs(merge_topk(tops[a0], top_k), a0, threshold) for a0, _ in blocks if tops[a0]]
    if not found:
        return []
    i, j, s = (np.concatenate(parts) for parts in zip(*found))
    i, j, s = best_pairs(i, j, s, max_pairs)
    return [(float(score), int(a), int(b)) for score, a, b in zip(s, i, j)]
