"""Mining's block products on a torch device (a GPU), in float16/bfloat16, with the same answer.

`pipeline.mining` computes each block's scores with a float32 numpy product. Here the product
runs in a low precision (tensor cores), and exactness comes back in two steps:

1. Every entry that could matter is kept as a candidate: with inputs and result rounded to a
   format of unit roundoff u, a product of two unit vectors is off from its float32 product by at
   most about 3u plus the float32 sums' rounding (`product_error`; cuBLAS is made to add in
   float32). So a row's true top-k entries score at least its low-precision k-th best minus
   twice that, and an entry at or above the floor at least the floor minus it.
2. The candidates are scored again in float32 (a dot product each, on the device), placed in a
   matrix that is -inf everywhere else, and the selection of `pipeline.mining` runs on that
   matrix, on the device: what leaves the device is only the kept entries.

Entries outside the candidates are below every threshold the selection uses, so it keeps what it
would keep on the full float32 matrix: the pairs of `paraphrase_mining_embeddings` (float32 sums
in another order can move a score by ~1e-7; exact ties may be broken differently, as on CPU).
"""

from __future__ import annotations

import contextlib

import numpy as np

Candidates = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(row, column, score), as pipeline.mining's (which imports this module, so it is not imported from there)."""

UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def product_error(dtype: str, dim: int) -> float:
    """A bound on |L - F| for unit vectors a, b of `dim` values, where L is their product in
    `dtype` as computed here and F their float32 product as rescored here (what the selection
    compares): each input rounded to `dtype` (2u + u^2, by Cauchy-Schwarz), the result rounded to
    `dtype` (u), float32 accumulation in both (dim * 2^-24 each), and for float16 the values that
    underflow (sqrt(dim) * 2^-24); with 1% to spare."""
    u = UNIT_ROUNDOFF[dtype]
    underflow = dim**0.5 * 2.0**-24 if dtype == "float16" else 0.0
    return 1.01 * (3 * u + u * u + 2 * dim * 2.0**-24 + underflow)


def device_for(device: str):
    """The torch device to compute on ("cpu" runs the same code without a GPU, for tests)."""
    import torch

    from pipeline.errors import PipelineError

    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("mining on cuda: torch sees no CUDA device here")
    return torch.device(device)


@contextlib.contextmanager
def _float32_sums():
    """cuBLAS adds in float32, not in the inputs' precision or TF32 (product_error counts on it);
    the process's settings are restored after."""
    import torch

    matmul = torch.backends.cuda.matmul
    names = ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    saved = {name: getattr(matmul, name) for name in names}
    try:
        for name in names:
            setattr(matmul, name, False)
        yield
    finally:
        for name, value in saved.items():
            setattr(matmul, name, value)


def _tensor(x: np.ndarray, where):
    import torch

    x = np.ascontiguousarray(x, np.float32)
    return torch.from_numpy(x if x.flags.writeable else x.copy()).to(where)


def _low_product(a, b, dtype: str):
    """a @ b.T in `dtype`, as float32; NaN (from non-finite vectors) as -inf, never selected."""
    import torch

    low = getattr(torch, dtype)
    return torch.nan_to_num((a.to(low) @ b.to(low).T).float(), nan=float("-inf"))


GATHER_BYTES = 64 << 20  # float32 values gathered at once to score candidate pairs
# Past this share of a block's entries, one float32 product costs less than gathering them (a
# gather moves ~5 x dim x 4 bytes per pair; the product does 2 x dim flops per entry).
DENSE_SHARE = 128


def _rescored(a, b, candidates):
    """A (A, B) float32 matrix: a[i] . b[j] in float32 where `candidates`, -inf elsewhere (and for NaN)."""
    import torch

    n = int(candidates.sum())
    if n * DENSE_SHARE > candidates.numel():  # a low floor: the float32 product itself
        scores = (a @ b.T).masked_fill_(~candidates, float("-inf"))
        return torch.nan_to_num_(scores, nan=float("-inf"), neginf=float("-inf"))  # -inf stays -inf (not the lowest float)
    rows, cols = candidates.nonzero(as_tuple=True)
    values = torch.empty(n, dtype=torch.float32, device=a.device)
    chunk = max(1, GATHER_BYTES // (8 * a.shape[1]))
    for s in range(0, n, chunk):
        values[s : s + chunk] = (a[rows[s : s + chunk]] * b[cols[s : s + chunk]]).sum(1)
    scores = torch.full(candidates.shape, float("-inf"), dtype=torch.float32, device=a.device)
    scores[rows, cols] = torch.nan_to_num_(values, nan=float("-inf"))
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


def _same_group(ga, gb, where):
    """pipeline.mining.same_group on the device (None without groups)."""
    if ga is None or gb is None:
        return None
    import torch

    return torch.from_numpy(np.asarray(ga, np.int64)).to(where)[:, None] == torch.from_numpy(np.asarray(gb, np.int64)).to(where)[None, :]


def diagonal_candidates(a: np.ndarray, start: int, k: int, groups: np.ndarray | None = None, device: str = "cuda",
                        dtype: str = "float16") -> Candidates:
    """pipeline.mining.diagonal_candidates, the product in `dtype` on `device`."""
    import torch

    where = device_for(device)
    with torch.inference_mode(), _float32_sums():
        x = _tensor(a, where)
        kk = min(k, len(a))
        low = _low_product(x, x, dtype)
        low.fill_diagonal_(float("-inf"))
        same = _same_group(groups, groups, where)
        if same is not None:
            low.masked_fill_(same, float("-inf"))
        kth = torch.topk(low, kk, dim=1).values[:, -1]
        candidates = low >= (kth - 2 * product_error(dtype, a.shape[1]))[:, None]
        del low
        candidates.fill_diagonal_(False)
        if same is not None:
            candidates &= ~same
        scores = _rescored(x, x, candidates)
        kth = torch.topk(scores, kk, dim=1).values[:, -1]
        keep = (scores >= kth[:, None]) & torch.isfinite(scores)
        if int(keep.sum()) > len(a) * kk:  # ties at a row's kk-th best: keep kk of them
            keep &= ~_outside_topk(scores, keep, kk)
        return _entries(scores, keep, start, start)


def off_diagonal_candidates(
    a: np.ndarray, b: np.ndarray, a_start: int, b_start: int, k: int, floor: float,
    ga: np.ndarray | None = None, gb: np.ndarray | None = None, device: str = "cuda", dtype: str = "float16",
) -> Candidates:
    """pipeline.mining.off_diagonal_candidates, the product in `dtype` on `device`."""
    import torch

    where = device_for(device)
    with torch.inference_mode(), _float32_sums():
        x, y = _tensor(a, where), _tensor(b, where)
        low = _low_product(x, y, dtype)
        candidates = low >= floor - product_error(dtype, a.shape[1])
        del low
        same = _same_group(ga, gb, where)
        if same is not None:
            candidates &= ~same
        scores = _rescored(x, y, candidates)
        keep = (scores >= floor) & torch.isfinite(scores)
        if int(keep.sum()) > (len(a) + len(b)) * k:
            keep &= ~(_outside_topk(scores, keep, k) & _outside_topk(scores.T, keep.T, k).T)
        return _entries(scores, keep, a_start, b_start)
