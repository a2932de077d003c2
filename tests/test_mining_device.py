"""Mining's block products in float16/bfloat16 on a torch device (pipeline.mining_device), their
candidates scored again in float32: the same pairs as sentence-transformers. Run here on CPU torch,
the same code a GPU worker runs; tests/test_gpu.py runs it on CUDA."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from sentence_transformers.util import paraphrase_mining_embeddings as st_mining

from pipeline.mining import diagonal_candidates, normalize, off_diagonal_candidates, paraphrase_mining_embeddings
from pipeline.mining_device import product_error
from pipeline import mining_device
from tests.conftest import clustered_vectors, duplicate_groups, random_vectors
from tests.test_mining import assert_same_pairs


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "make, n, top_k, max_pairs, block_size",
    [
        (random_vectors, 300, 5, 10_000, 64),  # floor -inf: every entry a candidate (the dense float32 path)
        (random_vectors, 600, 10, 200, 64),  # an active floor drops most off-diagonal scores
        (partial(clustered_vectors, clusters=2), 600, 3, 500, 64),  # rows with over top_k scores above it
        (clustered_vectors, 257, 3, 50, 1000),  # one block
        (random_vectors, 120, 200, 100_000, 50),  # top_k over a block's rows: the -inf of its own row stays out
    ],
    ids=["dense", "floor", "crowded", "one-block", "top-k-over-block"],
)
def test_low_precision_products_give_the_pairs_of_sentence_transformers(dtype, make, n, top_k, max_pairs, block_size):
    x = make(n, d=64)
    ref = st_mining(torch.from_numpy(x), top_k=top_k, max_pairs=max_pairs)
    ours = paraphrase_mining_embeddings(x, top_k=top_k, max_pairs=max_pairs, block_size=block_size, device="cpu",
                                        dtype=dtype)
    assert_same_pairs(ours, ref)
    numpy_path = paraphrase_mining_embeddings(x, top_k=top_k, max_pairs=max_pairs, block_size=block_size)
    got, want = {(i, j): v for v, i, j in ours}, {(i, j): v for v, i, j in numpy_path}
    assert set(got) == set(want) and max(abs(got[p] - want[p]) for p in want) <= 1e-6  # float32 noise only


def test_each_block_keeps_what_the_float32_block_keeps():
    """Block by block: the same entries as the numpy float32 functions, scores within float32 noise,
    although bfloat16 alone moves scores by far more than the gaps between them."""
    x = normalize(clustered_vectors(400, d=48, noise=0.02))
    a, b = x[:200], x[200:]
    low = (torch.from_numpy(a).bfloat16() @ torch.from_numpy(b).bfloat16().T).float().numpy()
    assert np.abs(low - a @ b.T).max() > 1e-3  # bfloat16 really is that coarse ...
    assert np.abs(low - a @ b.T).max() <= product_error("bfloat16", 48)  # ... and within the bound
    for want, got in (
        (diagonal_candidates(a, 0, 7), mining_device.diagonal_candidates(a, 0, 7, device="cpu", dtype="bfloat16")),
        (off_diagonal_candidates(a, b, 0, 200, 7, 0.5),
         mining_device.off_diagonal_candidates(a, b, 0, 200, 7, 0.5, device="cpu", dtype="bfloat16")),
    ):
        want_map = dict(zip(zip(want[0].tolist(), want[1].tolist()), want[2].tolist()))
        got_map = dict(zip(zip(got[0].tolist(), got[1].tolist()), got[2].tolist()))
        assert set(got_map) == set(want_map) and len(want_map) > 0
        assert max(abs(got_map[p] - want_map[p]) for p in want_map) <= 1e-6


def test_exact_duplicates_survive_low_precision():
    x, spread = duplicate_groups()
    assert paraphrase_mining_embeddings(x, top_k=2, max_pairs=18, block_size=6, device="cpu") == \
        [(pytest.approx(1.0, abs=1e-6), i, j) for i, j in spread]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")
def test_asking_for_cuda_without_it_is_an_error_not_a_silent_cpu_run():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="sees no CUDA device"):
        paraphrase_mining_embeddings(random_vectors(10), top_k=2, max_pairs=5, device="cuda")


def test_the_bound_covers_what_bfloat16_and_float16_really_do():
    x = normalize(random_vectors(300, d=384))
    exact = x.astype(np.float64) @ x.T.astype(np.float64)
    for dtype in ("float16", "bfloat16"):
        low = getattr(torch, dtype)
        t = torch.from_numpy(x)
        got = (t.to(low) @ t.to(low).T).float().numpy()
        assert np.abs(got - exact).max() <= product_error(dtype, 384) / 2  # with room for the float32 side
