"""Exact search: every query's top-k rows by cosine, over the rows a block at a time.

The answer is the one `sentence_transformers.util.semantic_search` gives for the same vectors and
`top_k`: cosine scores (both sides scaled to unit length, then a float32 dot product), each
query's best `top_k` rows, best first. semantic_search leaves the order of exactly equal scores
to torch.topk; here it is fixed: the earlier row first.

`RunningTopK` holds, per query, the best `k` (score, row) seen so far, sorted. Each block of rows
is scored against the queries in one product, and only the entries that can still enter a
query's top-k are looked at again:

- once a query holds k rows, an entry must beat its k-th score (a tie loses: the rows held come
  earlier);
- where that leaves many entries (the first block, or an order of rows that keeps improving), an
  entry must also reach its query's k-th best score within the block.

The survivors and the rows held are sorted together, per query, by (score descending, row), and
the first k kept.

Binary and ubinary vectors (read back as +1/-1) are scored with `divisor=dim`: their dot product is
a sum of integers, exact in float32, divided once, so every pair at the same Hamming distance gets
the same score, 1 - 2 * Hamming / dim, whatever the block's shape (the cosine of the normalised
vectors, as `mine` computes it, equals it within float32 rounding). Memory: the block's scores (queries x rows) and queries x k (score, row) pairs;
`pipeline.commands.search` reads the rows a block at a time, so the vectors never all are in memory.
The functions here work on plain numpy arrays (no torch).
"""

from __future__ import annotations

import numpy as np

from pipeline.mining import normalize

EMPTY_ROW = np.iinfo(np.int64).max  # a slot not yet filled: score -inf, after every real row
QUERY_CHUNK = 1024  # queries scored against a block at once: the score matrix is QUERY_CHUNK x block rows


class RunningTopK:
    """The best k (score, row) of each of n queries so far, over blocks of rows added in row order.

    Scores are cosines (queries and rows normalised), or with `divisor` the plain dot products divided
    by it (+1/-1 vectors: `divisor` = their dimension)."""

    def __init__(self, queries: np.ndarray, k: int, divisor: float | None = None):
        self.divisor = divisor
        self.queries = self._prepared(queries)
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)  # each query's best first
        self.rows = np.full((len(queries), k), EMPTY_ROW, np.int64)
        self.seen = 0  # rows added so far

    def add(self, block: np.ndarray, start: int | None = None) -> None:
        """Score the rows `block` (float, any length) as rows start, start + 1, ... (default: right
        after the rows added before; every row of a block comes after those)."""
        start = self.seen if start is None else start
        block = self._prepared(block)
        for q0 in range(0, len(self.queries), QUERY_CHUNK):
            q1 = min(q0 + QUERY_CHUNK, len(self.queries))
            scores = self.queries[q0:q1] @ block.T  # (q, rows)
            if self.divisor is not None:
                scores /= np.float32(self.divisor)
            self._merge(q0, q1, scores, start)
        self.seen = max(self.seen, start + len(block))

    def _prepared(self, vectors) -> np.ndarray:
        return normalize(vectors) if self.divisor is None else np.asarray(vectors, np.float32)

    def _merge(self, q0: int, q1: int, scores: np.ndarray, start: int) -> None:
        k, held_scores, held_rows = self.k, self.scores[q0:q1], self.rows[q0:q1]
        keep = scores > held_scores[:, -1:]  # only what beats the k-th held score can enter
        if np.count_nonzero(keep) > 2 * k * len(scores) and scores.shape[1] > k:
            at = scores.shape[1] - k  # each query's k-th best of the block
            kth = np.partition(scores, at, axis=1)[:, at : at + 1]
            keep &= scores >= kth  # ties at the block's k-th kept: the row order decides below
        at = np.flatnonzero(keep)  # a tenth of np.nonzero's time on a 2-D mask
        query, column = np.divmod(at, scores.shape[1])
        q = len(scores)
        query = np.concatenate([np.repeat(np.arange(q), k), query])
        score = np.concatenate([held_scores.reshape(-1), scores.reshape(-1)[at]])
        row = np.concatenate([held_rows.reshape(-1), column.astype(np.int64) + start])
        order = np.lexsort((row, -score, query))  # per query: best first, ties by row
        first = np.concatenate([[0], np.cumsum(np.bincount(query, minlength=q))[:-1]])  # each query's first position
        best = order[first[:, None] + np.arange(k)]  # (q, k): every query has at least its k held entries
        self.scores[q0:q1] = score[best]
        self.rows[q0:q1] = row[best]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores), each (queries, min(k, rows seen)), best first."""
        kept = min(self.k, self.seen)
        return self.rows[:, :kept].copy(), self.scores[:, :kept].copy()


def semantic_search(queries, corpus, top_k: int = 10, block_size: int = 16_384) -> list[list[dict]]:
    """In memory, as `util.semantic_search(queries, corpus, top_k=top_k)` returns it: per query a list
    of {'corpus_id', 'score'}, best first (equal scores: the earlier row first)."""
    corpus, queries = (np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x) for x in (corpus, queries))
    found = RunningTopK(np.atleast_2d(queries), top_k)
    for start in range(0, len(corpus), block_size):
        found.add(corpus[start : start + block_size], start)
    rows, scores = found.result()
    return [[{"corpus_id": int(r), "score": float(s)} for r, s in zip(rs, ss)] for rs, ss in zip(rows, scores)]
