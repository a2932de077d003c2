"""Distributed mining on the local Ray cluster, pair for pair equal to sentence-transformers."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sentence_transformers.util import paraphrase_mining_embeddings as st_mining

from pipeline.errors import InputError, UsageError
from pipeline.commands.mine import MineConfig, run_mine
from tests.conftest import SAMPLE, clustered_vectors, duplicate_groups, random_vectors


def write_vectors(directory, vectors, ids, files=3):
    """An embeddings directory like `embed` writes: several files, fixed_size_list vectors."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(ids), files + 1).astype(int)
    for f in range(files):
        a, b = bounds[f], bounds[f + 1]
        flat = pa.array(vectors[a:b].reshape(-1))
        table = pa.table({"id": ids[a:b], "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
        pq.write_table(table, directory / f"part{f}.parquet")
    return directory


def mined(out):
    table = pq.read_table(out / "pairs.parquet")
    return table


def assert_matches_st(table, vectors, ids, top_k, max_pairs, threshold=None):
    ref = st_mining(torch.from_numpy(vectors), top_k=top_k, max_pairs=max_pairs)
    if threshold is not None:
        ref = [r for r in ref if r[0] >= threshold]
    ref_map = {frozenset((ids[i], ids[j])): s for s, i, j in ref}
    got = {frozenset((a, b)): s for a, b, s in zip(table["id_a"].to_pylist(), table["id_b"].to_pylist(), table["score"].to_pylist())}
    assert len(got) == table.num_rows == len(ref_map)  # each unordered pair once, as many as ST
    if not ref_map:
        return
    # Identical sets, except that pairs tied (within float rounding) at the max_pairs cut-off may swap.
    cutoff = min(ref_map.values())
    for p in set(got) ^ set(ref_map):
        assert abs(got.get(p, ref_map.get(p)) - cutoff) <= 1e-5, (p, cutoff)
    common = set(got) & set(ref_map)
    assert len(common) >= len(ref_map) - 2
    assert max(abs(got[p] - ref_map[p]) for p in common) <= 1e-5
    scores = table["score"].to_pylist()
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "make, n, top_k, max_pairs, block_size",
    [
        (random_vectors, 600, 10, 100_000, 128),  # 5 blocks, the last one short
        (clustered_vectors, 600, 5, 300, 100),  # many near-duplicates, max_pairs binds
        (clustered_vectors, 600, 8, 150, 100),  # each reduce cuts its 800 candidates to the best 300
        (clustered_vectors, 90, 20, 10_000, 1000),  # N smaller than one block
    ],
)
def test_distributed_mining_matches_st(ray_cluster, tmp_path, make, n, top_k, max_pairs, block_size):
    vectors = make(n)
    ids = [f"doc-{k:04d}/x" for k in range(n)]  # string ids, not row numbers
    src = write_vectors(tmp_path / "emb", vectors, ids)
    out = tmp_path / "pairs"
    result = run_mine(MineConfig(str(src), str(out), top_k=top_k, max_pairs=max_pairs, block_size=block_size, quiet=True))
    table = mined(out)
    assert table.schema == pa.schema([("id_a", pa.string()), ("id_b", pa.string()), ("score", pa.float32())])
    assert_matches_st(table, vectors, ids, top_k, max_pairs)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["pairs"] == result.pairs == table.num_rows and manifest["documents"] == n
    assert manifest["products"]["device"] == "cpu" and manifest["products"]["ran_on"] == [["cpu", "float32"]]


def test_device_cuda_on_a_cluster_without_gpus_is_refused(ray_cluster, tmp_path):
    src = write_vectors(tmp_path / "emb", random_vectors(20), [str(k) for k in range(20)])
    with pytest.raises(UsageError, match="--device cuda: the Ray cluster has no GPUs"):
        run_mine(MineConfig(str(src), str(tmp_path / "pairs"), device="cuda", quiet=True))
    with pytest.raises(UsageError, match="--device"):
        MineConfig(str(src), str(tmp_path / "pairs"), device="tpu")


def test_exact_duplicates_at_the_floor_are_kept(ray_cluster, tmp_path):
    vectors, spread = duplicate_groups()  # the best pairs score exactly the floor, from off-diagonal blocks
    ids = [f"d{k}" for k in range(len(vectors))]
    src = write_vectors(tmp_path / "emb", vectors, ids)
    out = tmp_path / "pairs"
    run_mine(MineConfig(str(src), str(out), top_k=2, max_pairs=18, block_size=6, quiet=True))
    table = mined(out)
    assert list(zip(table["id_a"].to_pylist(), table["id_b"].to_pylist())) == [(ids[i], ids[j]) for i, j in spread]
    assert table["score"].to_pylist() == [1.0] * 18


def test_many_small_blocks_and_threshold(ray_cluster, tmp_path, capsys):
    from pipeline.commands.info import show_info

    vectors = clustered_vectors(400, noise=0.2)
    ids = [f"id{k}" for k in range(400)]
    src = write_vectors(tmp_path / "emb", vectors, ids, files=4)
    out = tmp_path / "pairs"
    run_mine(MineConfig(str(src), str(out), top_k=6, max_pairs=5000, block_size=37, threshold=0.95, quiet=True))
    table = mined(out)
    assert 0 < table.num_rows and min(table["score"].to_pylist()) >= 0.95
    assert_matches_st(table, vectors, ids, 6, 5000, threshold=0.95)

    capsys.readouterr()
    show_info(str(out), rows=2)  # `embedpipe info` on a mine output: its parameters and best pairs
    shown = capsys.readouterr().out
    brief = json.loads(shown[: shown.rindex("}") + 1])
    assert brief["format"] == "embedpipe/pairs" and brief["pairs"] == table.num_rows and brief["threshold"] == 0.95
    best = table.slice(0, 1).to_pylist()[0]
    assert f"{best['score']:.4f}  {best['id_a']} <-> {best['id_b']}" in shown
    with pytest.raises(InputError, match="--pairs: .* already holds mined pairs"):
        show_info(str(out), pairs=3)


@pytest.mark.slow  # make test-all; random and clustered vectors run in make test
def test_real_vectors_of_the_sample_corpus(ray_cluster, tmp_path, default_model_path):
    from pipeline import EmbedConfig, read_embeddings
    from pipeline.commands.embed import run_embed

    emb = tmp_path / "emb"
    run_embed(EmbedConfig(input=os.path.join(SAMPLE, "zh.csv"), output=str(emb), quiet=True))
    ids, vectors = read_embeddings(str(emb))
    out = tmp_path / "pairs"
    run_mine(MineConfig(str(emb), str(out), top_k=5, max_pairs=150, block_size=64, quiet=True))
    assert_matches_st(mined(out), vectors, ids, 5, 150)


def test_missing_or_empty_embeddings(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        run_mine(MineConfig(str(tmp_path / "nope"), str(tmp_path / "out")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no embeddings"):
        run_mine(MineConfig(str(tmp_path / "empty"), str(tmp_path / "out")))
    with pytest.raises(UsageError, match="--top-k must be a positive integer"):
        MineConfig("a", "b", top_k=0)


@pytest.mark.slow  # make test-all (~25 s each); make test mines float vectors, and reads binary back in test_precision
@pytest.mark.parametrize("precision", ["binary", "int8"])
def test_quantized_embeddings_are_mined_as_their_float_readings(ray_cluster, tmp_path, tiny_model, precision):
    """binary: by the cosine of the +1/-1 vectors (1 - 2 * Hamming / dim); int8: dequantised with the
    run's ranges. Every pair is kept (top_k above N), so ties among the few binary scores cannot move
    the cut: the scores must be exactly paraphrase_mining_embeddings'."""
    from pipeline import EmbedConfig, read_embeddings
    from pipeline.commands.embed import run_embed
    from tests.conftest import sample_texts, write_lines

    texts = sample_texts()[::25]  # 60 texts
    src = tmp_path / "in"
    src.mkdir()
    write_lines(src / "a.txt", texts)
    ranges = np.stack([np.full(32, -2.0), np.full(32, 2.0)]).astype(np.float32)
    np.save(tmp_path / "r.npy", ranges)
    extra = {"calibration": str(tmp_path / "r.npy")} if precision == "int8" else {}
    emb = tmp_path / "emb"
    run_embed(EmbedConfig(input=str(src), output=str(emb), model=tiny_model, precision=precision, num_encoders=1,
                          quiet=True, **extra))
    ids, floats = read_embeddings(str(emb), dequantize=True)
    if precision == "binary":
        assert set(np.unique(floats)) == {-1.0, 1.0} and floats.shape == (60, 32)
    out = tmp_path / "pairs"
    run_mine(MineConfig(str(emb), str(out), top_k=100, max_pairs=10_000, quiet=True))
    table = mined(out)
    ref = {frozenset((ids[i], ids[j])): s for s, i, j in st_mining(torch.from_numpy(floats), top_k=100, max_pairs=10_000)}
    got = {frozenset((a, b)): s for a, b, s in zip(*(table[c].to_pylist() for c in ("id_a", "id_b", "score")))}
    assert len(got) == len(ref) == 60 * 59 // 2
    assert max(abs(got[p] - ref[p]) for p in ref) <= 1e-6
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["precision"] == precision
    if precision == "binary":  # scores are 1 - 2 * Hamming / 32
        sixteenths = np.array(table["score"].to_pylist()) * 16
        assert np.abs(sixteenths - np.round(sixteenths)).max() <= 1e-5


def test_chunks_of_one_document_are_left_out_by_default_and_kept_with_the_flag(ray_cluster, tmp_path):
    from tests.test_mining import chunk_groups, masked_reference

    n = 400
    x = clustered_vectors(n)
    x[1::2] = x[::2] + 0.01 * x[1::2]  # overlapping neighbours: near copies, mostly of the same document
    groups = chunk_groups(n)
    doc_ids = [f"d{g}" for g in groups]
    chunk = [int(np.sum(groups[:i] == groups[i])) for i in range(n)]
    ids = [f"{d}#{c}" for d, c in zip(doc_ids, chunk)]
    emb = tmp_path / "emb"
    emb.mkdir()
    bounds = [0, 133, 260, n]  # files hold whole documents, as embed writes them
    bounds = [int(np.searchsorted(groups, groups[b], "left")) if b < n else n for b in bounds]
    for f, (a, b) in enumerate(zip(bounds, bounds[1:])):
        flat = pa.array(x[a:b].reshape(-1))
        pq.write_table(pa.table({"id": ids[a:b], "doc_id": doc_ids[a:b], "chunk": pa.array(chunk[a:b], pa.int32()),
                                 "embedding": pa.FixedSizeListArray.from_arrays(flat, x.shape[1])}),
                       emb / f"part{f}.parquet")

    out = tmp_path / "pairs"
    run_mine(MineConfig(embeddings=str(emb), output=str(out), top_k=5, max_pairs=300, block_size=64, quiet=True))
    got = mined(out)
    ref = masked_reference(x, groups, 5, 300)
    assert {frozenset((ids[i], ids[j])) for _, i, j in ref} == {
        frozenset(p) for p in zip(got["id_a"].to_pylist(), got["id_b"].to_pylist())}
    assert all(a.split("#")[0] != b.split("#")[0] for a, b in zip(got["id_a"].to_pylist(), got["id_b"].to_pylist()))
    assert json.loads((out / "_manifest.json").read_text())["same_document_pairs"] == "left out"

    run_mine(MineConfig(embeddings=str(emb), output=str(out), top_k=5, max_pairs=300, block_size=64, quiet=True,
                        same_document_pairs=True))
    assert_matches_st(mined(out), x, ids, top_k=5, max_pairs=300)
    same = [a.split("#")[0] == b.split("#")[0] for a, b in zip(mined(out)["id_a"].to_pylist(), mined(out)["id_b"].to_pylist())]
    assert sum(same) > len(same) // 3  # what the default leaves out: here neighbours would fill the top
    assert json.loads((out / "_manifest.json").read_text())["same_document_pairs"] == "kept"
