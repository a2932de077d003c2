"""The embed chain (pipeline.engine.chain) on the local Ray cluster: chunks that Ray splits across
blocks are written as pieces and joined once each (`FileTracker`)."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from pipeline import EmbedConfig, read_embeddings
from pipeline.commands.embed import run_embed


@pytest.mark.parametrize(
    "spread",
    [False, pytest.param(True, marks=pytest.mark.slow)],  # the multi-node join path, in make test-all (keeps make test < 15 min)
    ids=["joined-by-the-driver", "joined-by-ray-tasks"],
)
def test_shard_larger_than_a_block_and_a_file(ray_cluster, tmp_path, tiny_model, monkeypatch, spread):
    """Tiny Ray blocks force chunks to be split across blocks: the pieces are joined, once each,
    by a driver thread (one node) or by Ray tasks (what a multi-node cluster does)."""
    from ray.data import DataContext

    from pipeline.engine import chain, plan

    spread_joins = spread
    monkeypatch.setattr(plan, "block_rows_for", lambda device, weights: 256)  # the tiny model would get 4,096

    class Tracker(chain.FileTracker):
        def __init__(self, sink, spread, board):
            assert spread is False  # the local cluster has one node
            super().__init__(sink, spread=spread_joins, board=board)

    monkeypatch.setattr(chain, "FileTracker", Tracker)

    src = tmp_path / "in"
    src.mkdir()
    n = 2500
    (src / "big.txt").write_text("".join(f"document number {i} " + "word " * (i % 13) + "\n" for i in range(n)))
    (src / "small.txt").write_text("just one line\n")
    ctx = DataContext.get_current()
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = 16 * 1024
    try:
        out = tmp_path / "out"
        result = run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, rows_per_file=1000, quiet=True))
    finally:
        ctx.target_max_block_size = saved
    files = sorted(f for f in os.listdir(out) if f.endswith(".parquet"))
    # the two shards are one group (small.txt packed after big.txt): big's last 500 rows share a file with small's
    assert files == ["big.txt+1-00000.parquet", "big.txt+1-00001.parquet", "big.txt+1-00002.parquet"]
    assert [pq.read_metadata(out / f).num_rows for f in files] == [1000, 1000, 501]
    ids, _ = read_embeddings(str(out))
    assert ids == [f"big.txt:{i}" for i in range(n)] + ["small.txt:0"]
    assert not (out / "_pieces").exists()
    assert result.files_written == 3
    assert result.manifest["timings"]["stages"]["write.joining"]["steps"] == 3  # the big files came in pieces
