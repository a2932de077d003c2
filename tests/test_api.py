"""The Python API (pipeline.api) does what the commands do, chained runs included."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.config import EmbedConfig
from tests.conftest import make_st_dir, write_lines


def test_public_functions_are_not_shadowed_by_modules():
    import pipeline.commands.embed  # noqa: F401 - importing the command modules must not replace the functions
    import pipeline.commands.mine  # noqa: F401
    import pipeline.commands.rerank  # noqa: F401
    import pipeline.commands.search  # noqa: F401
    import pipeline.config.search  # noqa: F401
    import pipeline.retrieval  # noqa: F401

    for name in ("embed", "mine", "rerank", "search"):
        assert callable(getattr(pipeline, name)) and getattr(pipeline, name).__module__ == "pipeline.api"
    assert pipeline.run_embed is pipeline.embed


def test_embed_with_mine_mines_as_the_command_does(ray_cluster, tmp_path, tiny_bert_dir):
    model = make_st_dir(tiny_bert_dir, str(tmp_path / "model"), pooling="mean", normalize=True)
    write_lines(tmp_path / "a.txt", [f"sentence number {i % 7} about topic {i % 3}" for i in range(40)])
    lines = []
    result = pipeline.embed(EmbedConfig(input=str(tmp_path / "a.txt"), output=str(tmp_path / "vec"), model=model,
                                        quiet=True, mine=True, mine_top_k=3), report=lambda r: lines.append(r.summary_line()))
    assert result.embedded == 40 and result.mined is not None
    pairs = pq.read_table(tmp_path / "vec-pairs" / "pairs.parquet")
    assert pairs.num_rows == result.mined.pairs > 0
    assert json.loads((tmp_path / "vec-pairs" / "_manifest.json").read_text())["embeddings"] == str(tmp_path / "vec")
    assert [line.split()[0] for line in lines] == ["embedded", "mined"]  # one summary per step, as the CLI prints
    # keywords instead of a config, and keywords over a config
    again = pipeline.mine(embeddings=str(tmp_path / "vec"), output=str(tmp_path / "p2"), top_k=3, quiet=True)
    assert again.pairs == result.mined.pairs and again.reranked is None


def test_options_are_validated_like_the_cli():
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match="--mine-top-k must be a positive integer"):
        pipeline.embed(input="x", output="y", mine=True, mine_top_k=0)
    with pytest.raises(TypeError, match="expected a MineConfig"):
        pipeline.mine(EmbedConfig(input="x", output="y"))
