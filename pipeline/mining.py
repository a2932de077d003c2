"""Paraphrase mining: all most-similar pairs of a set of vectors, by blocked matrix products.

The result is the one `sentence_transformers.util.paraphrase_mining_embeddings`
gives for the same vectors, `top_k` and `max_pairs`: cosine scores, no self
pairs, each unordered pair once, the best `max_pairs` by score, descending.

The N x N similarity matrix is cut into blocks of `block_size` rows and
computed in two phases:

1. Each diagonal block (I, I) gives every row its top-k over the block's
   columns. From those scores comes a floor (`score_floor`) that every pair of
   the answer reaches.
2. Each block pair I < J is computed once (the matrix is symmetric) and keeps
   only its entries scoring at least the floor: one comparison instead of a
   top-k selection over every score. Each kept entry is a candidate for its
   row and for its column.

Per row block, each row's top-k of its candidates gives candidate pairs
(`row_block_pairs`); their best `max_pairs`, each pair once, are the answer
(`best_pairs`; `pipeline.commands.mine` first cuts each row block's to its best
2 * max_pairs entries with `best_entries`, which needs no sort).

Memory per worker is two blocks of vectors and one block x block score
matrix: `block_size` trades memory (4 * block_size^2 bytes of scores) for the
number of tasks (n_blocks * (n_blocks + 1) / 2). A block pair yields at most
(A + B) * top_k candidates, as many as per-row and per-column top-k lists.

The functions here work on plain numpy arrays (no torch: a mining worker
starts in a fraction of a second); `pipeline.commands.mine` spreads them over Ray.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

Candidates = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(row, column, score): global indices, float32 cosine scores."""


def normalize(x) -> np.ndarray:
    """Float32 rows scaled to unit length, as `sentence_transformers.util.cos_sim` does (eps 1e-12).

    Takes a numpy array or anything numpy can read (a CPU torch tensor).
    """
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def same_group(ga: np.ndarray | None, gb: np.ndarray | None) -> np.ndarray | None:
    """(A, B) True where row a and row b belong to the same group (two chunks of one document),
    None without groups: such entries are never candidates."""
    if ga is None or gb is None:
        return None
    return ga[:, None] == gb[None, :]


def diagonal_candidates(a: np.ndarray, start: int, k: int, groups: np.ndarray | None = None) -> Candidates:
    """Phase 1: each row's top-k over the columns of its own block a @ a.T, self excluded (and,
    with `groups`, every row of its own group)."""
    scores = a @ a.T  # (A, A)
    np.fill_diagonal(scores, -np.inf)
    same = same_group(groups, groups)
    if same is not None:
        scores[same] = -np.inf
    kk = min(k, len(a))
    at = len(a) - kk  # each row's kk-th best, partitioning an eighth of the rows at a time (a copy each)
    kth = np.concatenate([np.partition(part, at, axis=1)[:, at] for part in np.array_split(scores, 8)])  # (A,)
    keep = scores >= kth[:, None]
    np.fill_diagonal(keep, False)
    if same is not None:  # a row with fewer than kk other groups' columns has kth -inf
        keep &= ~same
    if np.count_nonzero(keep) > len(a) * kk:  # ties at a row's kk-th best: keep kk of them
        keep &= ~_outside_topk(scores, keep, kk)
    return _entries(scores, keep, start, start)


def score_floor(diagonal_scores: Iterable[np.ndarray], max_pairs: int, threshold: float | None = None) -> float:
    """The (2 * max_pairs)-th best score of the diagonal blocks' candidates (-inf if fewer), at least `threshold`.

    Every pair of the answer scores at least this, so entries below it can be
    dropped. Why: row i's true top-k C_i is taken over a superset of the columns
    of its diagonal-block top-k P_i, so the j-th best of C_i is at least the
    j-th best of P_i, and the C_i hold at least 2 * max_pairs entries scoring
    >= floor. An unordered pair appears at most twice among them, so at least
    max_pairs candidate pairs score >= floor, and so does every pair of the
    best max_pairs. Whether an entry is in its row's top-k depends only on the
    entries scoring at least as much, all >= floor, so dropping those below
    changes no top-k list above it. Entries equal to the floor are kept.

    Streams the scores, holding at most 2 * max_pairs of them plus one block's.
    """
    need = 2 * max_pairs
    best = np.empty(0, np.float32)
    for scores in diagonal_scores:
        best = np.concatenate([best, scores])
        if len(best) > need:
            best = np.partition(best, len(best) - need)[-need:]
    floor = float(best.min()) if len(best) >= need else float("-inf")
    return floor if threshold is None else max(floor, threshold)


def off_diagonal_candidates(a: np.ndarray, b: np.ndarray, a_start: int, b_start: int, k: int, floor: float,
                            ga: np.ndarray | None = None, gb: np.ndarray | None = None) -> Candidates:
    """Phase 2: the entries of a @ b.T scoring >= floor (and, with groups, of rows of other groups);
    each is a candidate for its row and its column.

    If more than (A + B) * k pass, an entry is dropped only where both its row
    and its column have over k entries passing and it is in neither's top-k:
    the rows and columns still get their top-k, and at most (A + B) * k remain.
    """
    scores = a @ b.T  # (A, B)
    same = same_group(ga, gb)
    if same is not None:
        scores[same] = -np.inf
    keep = scores >= floor
    if same is not None:  # a floor of -inf (fewer pairs than asked) keeps -inf entries
        keep &= ~same
    if np.count_nonzero(keep) > (len(a) + len(b)) * k:
        keep &= ~(_outside_topk(scores, keep, k) & _outside_topk(scores.T, keep.T, k).T)
    return _entries(scores, keep, a_start, b_start)


def _entries(scores: np.ndarray, keep: np.ndarray, a_start: int, b_start: int) -> Candidates:
    """The kept entries of a block's scores, with global row and column indices."""
    at = np.flatnonzero(keep)
    rows, cols = np.divmod(at, scores.shape[1])
    return rows + a_start, cols + b_start, scores.reshape(-1)[at]


def _outside_topk(scores: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    """The kept entries of rows with over k kept entries that are not in their row's top-k."""
    full = np.flatnonzero(np.count_nonzero(keep, axis=1) > k)  # (F,)
    outside = np.zeros_like(keep)
    outside[full] = keep[full]
    outside[full[:, None], np.argpartition(-scores[full], k - 1, axis=1)[:, :k]] = False  # (F, k): each row's top-k
    return outside


def row_block_pairs(start: int, end: int, k: int, floor: float, diagonal: Candidates, off_diagonal: list[Candidates]) -> Candidates:
    """Candidate pairs (i < j, score) of the rows [start, end): each row's top-k of its candidates.

    `diagonal` is the block's phase-1 output; `off_diagonal` the phase-2 outputs
    of the block pairs it is part of, on either side. A pair appears once per
    row whose top-k holds it, so at most twice, as `best_pairs` needs.
    """
    rows, cols, s = diagonal
    keep = s >= floor
    parts = [(rows[keep], cols[keep], s[keep])]
    for rows, cols, s in off_diagonal:
        for own, other in ((rows, cols), (cols, rows)):
            mine = (own >= start) & (own < end)
            parts.append((own[mine], other[mine], s[mine]))
    rows, cols, s = _row_topk(*(np.concatenate(p) for p in zip(*parts)), start, k)
    return np.minimum(rows, cols), np.maximum(rows, cols), s


def _row_topk(rows: np.ndarray, cols: np.ndarray, s: np.ndarray, start: int, k: int) -> Candidates:
    """The k best entries of each row (rows numbered from `start`; ties in any order)."""
    order = np.argsort(((rows - start).astype(np.uint64) << np.uint64(32)) | _descending_key(s))  # by row, best first
    at = np.arange(len(order))
    new_row = np.r_[True, rows[order[1:]] != rows[order[:-1]]]
    first = np.maximum.accumulate(np.where(new_row, at, 0))  # each row's first position
    keep = order[at - first < k]
    return rows[keep], cols[keep], s[keep]


def _descending_key(s: np.ndarray) -> np.ndarray:
    """uint64 keys (below 2**32) that sort float32 scores best first: one integer sort does row and score."""
    bits = np.ascontiguousarray(s, np.float32).view(np.uint32)
    ascending = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(1 << 31))  # IEEE order as unsigned order
    return (~ascending).astype(np.uint64)


def best_entries(i: np.ndarray, j: np.ndarray, s: np.ndarray, n: int) -> Candidates:
    """The entries scoring at least the n-th best score (all of them if there are at most n), unsorted.

    Any subset of the candidates can be cut this way before `best_pairs`: an
    entry beaten by n others here is beaten by them in the whole set too.
    """
    if len(s) <= n:
        return i, j, s
    keep = s >= np.partition(s, len(s) - n)[len(s) - n]
    return i[keep], j[keep], s[keep]


def best_pairs(i: np.ndarray, j: np.ndarray, s: np.ndarray, max_pairs: int) -> Candidates:
    """Each unordered pair once, the `max_pairs` best by score (ties by i, then j), descending.

    The input holds each pair at most twice (once from each of its rows), so
    the answer lies among its 2 * max_pairs best entries: only those are sorted.
    """
    i, j, s = best_entries(i, j, s, 2 * max_pairs)
    if len(s) == 0:
        return i, j, s
    key = i.astype(np.int64) * (int(max(i.max(), j.max())) + 1) + j  # sorts as (i, j)
    order = np.argsort(-s)  # best first
    _, first = np.unique(key[order], return_index=True)  # each pair's best entry, by (i, j)
    keep = order[first]
    keep = keep[np.argsort(-s[keep], kind="stable")[:max_pairs]]  # best first, ties by (i, j)
    return i[keep], j[keep], s[keep]


def row_blocks(n: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + block_size)) for start in range(0, n, block_size)]


def block_products(device: str | None = None, dtype: str = "float16"):
    """(diagonal_candidates, off_diagonal_candidates) to use: these numpy float32 ones, or with a
    torch `device`, pipeline.mining_device's (products in `dtype`, candidates scored again in float32)."""
    if device is None:
        return diagonal_candidates, off_diagonal_candidates
    from functools import partial

    from pipeline import mining_device

    return (partial(mining_device.diagonal_candidates, device=device, dtype=dtype),
            partial(mining_device.off_diagonal_candidates, device=device, dtype=dtype))


def paraphrase_mining_embeddings(
    embeddings,
    top_k: int = 100,
    max_pairs: int = 500_000,
    block_size: int = 4096,
    threshold: float | None = None,
    device: str | None = None,
    dtype: str = "float16",
    groups=None,
) -> list[tuple[float, int, int]]:
    """In-process blocked mining: [(score, i, j), ...] best first, as sentence-transformers returns.

    With `groups` (one integer per row), two rows of the same group are never paired: each row's
    top-k is taken over the other groups' rows (chunks of one document, `embedpipe mine`'s default).

    With `device` ("cuda", or "cpu" to run the same code without a GPU), the block products run
    on torch in `dtype` and their candidates are scored again in float32 (pipeline.mining_device)."""
    diagonal_fn, off_diagonal_fn = block_products(device, dtype)
    x = normalize(embeddings)
    g = None if groups is None else np.asarray(groups, np.int64)
    part = (lambda a0, a1: None) if g is None else (lambda a0, a1: g[a0:a1])  # noqa: E731
    blocks = row_blocks(len(x), block_size)
    if not blocks:
        return []
    diagonal = [diagonal_fn(x[a0:a1], a0, top_k, part(a0, a1)) for a0, a1 in blocks]
    floor = score_floor((s for _, _, s in diagonal), max_pairs, threshold)
    off_diagonal: list[list[Candidates]] = [[] for _ in blocks]
    found = []
    for bi, (a0, a1) in enumerate(blocks):
        for bj in range(bi + 1, len(blocks)):
            b0, b1 = blocks[bj]
            pair = off_diagonal_fn(x[a0:a1], x[b0:b1], a0, b0, top_k, floor, part(a0, a1), part(b0, b1))
            off_diagonal[bi].append(pair)
            off_diagonal[bj].append(pair)
        found.append(row_block_pairs(a0, a1, top_k, floor, diagonal[bi], off_diagonal[bi]))
        off_diagonal[bi] = []  # all its block pairs are done
    i, j, s = best_pairs(*(np.concatenate(parts) for parts in zip(*found)), max_pairs)
    return [(float(score), int(a), int(b)) for score, a, b in zip(s, i, j)]
