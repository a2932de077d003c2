"""Mining's block products on a torch device (a GPU), in float16/bfloat16, with the same answer.

`pipeline.mining` computes each block's scores with a float32 numpy product. Here the product
runs in a low precision (tensor cores), and exactness comes back in two steps:

1. Every entry that could matter is kept as a candidate: with inputs rounded to a format of unit
   roundoff u, a product of two unit vectors is off by at most (2u + u^2) plus float32
   accumulation (PRODUCT_ERROR). So a row's true top-k entries score at least its low-precision
   k-th best minus twice that, and an entry at or above the floor at least the floor minus it.
2. The candidates are scored again in float32 (a dot product each, on the device), placed in a
   matrix that is -inf everywhere else, and the selection of `pipeline.mining` runs on that
   matrix, on the device: what leaves the device is only the kept entries.

Entries outside the candidates are below every threshold the selection uses, so it keeps what it
would keep on the full float32 matrix: the pairs of `paraphrase_mining_embeddings` (float32 sums
in another order can move a score by ~1e-7; exact ties may be broken differently, as on CPU).
"""

from __future__ import annotations

import numpy as np

from pipeline.mining import Candidates

UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def product_error(dtype: str, dim: int) -> float:
    """A bound on |low(a) . low(b) - a . b| for unit vectors a, b of `dim` values: the rounding of
    each input to `dtype` (2u + u^2, by Cauchy-Schwarz) and float32 accumulation (dim * 2^-24)."""
    u = UNIT_ROUNDOFF[dtype]
    return 2 * u + u * u + dim * 2.0**-24


def device_for(device: str):
    """The torch device a mining task computes on: CUDA where asked and visible, else CPU."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _low_product(a, b, dtype: str):
    import torch

    low = getattr(torch, dtype)
    return (a.to(low) @ b.to(low).T).float()


RESCORE_CHUNK = 1 << 16  # candidate pairs scored at once: 2 x 65,536 x dim float32 gathered values
DENSE_SHARE = 8  # past 1/8 of the block's entries, one float32 product costs less than gathering them


def _rescored(a, b, candidates):
    """A (A, B) float32 matrix: a[i] . b[j] in float32 where `candidates`, -inf elsewhere."""
    import torch

    n = int(candidates.sum())
    if n * DENSE_SHARE > candidates.numel():  # most entries (a low floor): the float32 product itself
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 sums, not TF32's 10-bit mantissas
        return (a @ b.T).masked_fill_(~candidates, float("-inf"))
    rows, cols = candidates.nonzero(as_tuple=True)
    values = torch.empty(n, dtype=torch.float32, device=a.device)
    for s in range(0, n, RESCORE_CHUNK):
        values[s : s + RESCORE_CHUNK] = (a[rows[s : s + RESCORE_CHUNK]] * b[cols[s : s + RESCORE_CHUNK]]).sum(1)
    scores = torch.full(candidates.shape, float("-inf"), dtype=torch.float32, device=a.device)
    scores[rows, cols] = values
    return scores


def _outside_topk(scores, keep, k: int):
    """pipeline.mining._outside_topk on the device."""
    import torch

    full = (keep.sum(1) > k).nonzero(as_tuple=True)[0]
    outside = torch.zeros_like(keep)
    if len(full):
        outside[full] = keep[full]
        top = torch.topk(scores[full], k, dim=1).indices
        outside[full.unsqueeze(1), top] = False
    return outside


def _entries(scores, keep, a_start: int, b_start: int) -> Candidates:
    rows, cols = keep.nonzero(as_tuple=True)
    values = scores[rows, cols]
    return (rows.cpu().numpy().astype(np.int64) + a_start, cols.cpu().numpy().astype(np.int64) + b_start,
            values.cpu().numpy().astype(np.float32))


def diagonal_candidates(a: np.ndarray, start: int, k: int, device: str = "cuda", dtype: str = "float16") -> Candidates:
    """pipeline.mining.diagonal_candidates, the product in `dtype` on `device`."""
    import torch

    where = device_for(device)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(where)
        kk = min(k, len(a))
        low = _low_product(x, x, dtype)
        low.fill_diagonal_(float("-inf"))
        kth = torch.topk(low, kk, dim=1).values[:, -1]
        candidates = low >= (kth - 2 * product_error(dtype, a.shape[1]))[:, None]
        candidates.fill_diagonal_(False)
        scores = _rescored(x, x, candidates)
        kth = torch.topk(scores, kk, dim=1).values[:, -1]
        keep = scores >= kth[:, None]
        keep.fill_diagonal_(False)
        if int(keep.sum()) > len(a) * kk:  # ties at a row's kk-th best: keep kk of them
            keep &= ~_outside_topk(scores, keep, kk)
        return _entries(scores, keep, start, start)


def off_diagonal_candidates(
    a: np.ndarray, b: np.ndarray, a_start: int, b_start: int, k: int, floor: float, device: str = "cuda",
    dtype: str = "float16",
) -> Candidates:
    """pipeline.mining.off_diagonal_candidates, the product in `dtype` on `device`."""
    import torch

    where = device_for(device)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(where)
        y = torch.from_numpy(np.ascontiguousarray(b, np.float32)).to(where)
        low = _low_product(x, y, dtype)
        candidates = low >= floor - product_error(dtype, a.shape[1])
        scores = _rescored(x, y, candidates)
        keep = scores >= floor
        if int(keep.sum()) > (len(a) + len(b)) * k:
            keep &= ~(_outside_topk(scores, keep, k) & _outside_topk(scores.T, keep.T, k).T)
        return _entries(scores, keep, a_start, b_start)
