"""Ready-to-run micro-batches (pipeline.stages.ready): the tokenizer lays a block out so that the
encoder only slices matrices out of Arrow buffers; the layout holds together under the slicing and
concatenation Ray Data may do between the two stages."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import EmbedConfig
from pipeline.stages.ready import COPY, NONE, flat_columns, micro_batches_of
from tests.conftest import make_st_dir

TEXTS = [f"row {i} " + "word " * (i % 13) for i in range(90)] + ["row 5 " + "word " * 5] * 4 + ["the same"] * 3


def block(texts, files=2):
    n = len(texts)
    valid = [bool(t.strip()) for t in texts]
    return pa.table({
        "id": [f"d:{i}" for i in range(n)], "text": texts, "_valid": valid, "_row": np.arange(n, dtype=np.int64),
        "_file": [f"f{i % files}.parquet" for i in range(n)],
    })


@pytest.fixture(scope="module")
def model(tiny_bert_dir, tmp_path_factory):
    return make_st_dir(tiny_bert_dir, str(tmp_path_factory.mktemp("ready") / "st"), pooling="mean")


@pytest.mark.parametrize("call_tokens", [None, 2], ids=["filled", "least-padding"])
def test_the_layout_pads_each_micro_batch_to_its_longest_row_within_the_budget(model, call_tokens):
    from pipeline.stages.tokenize import TokenizeStage

    texts = TEXTS + ["", "   "]
    out = TokenizeStage(EmbedConfig(input="x", output="y", model=model), batch_tokens=120,
                        call_tokens=call_tokens)(block(texts))
    lists = flat_columns(out, ["input_ids", "attention_mask"])
    lengths = np.asarray(out["_n_tokens"])
    mb = np.asarray(out["_mb"])
    files = out["_file"].to_pylist()
    spans = micro_batches_of(out)
    distinct = {(i % 2, t) for i, t in enumerate(texts) if t.strip()}  # repeats are found within a file
    assert sum(e - s for s, e in spans) == len(distinct)  # each distinct text of a file once
    for s, e in spans:
        ids = lists["input_ids"][0][lists["input_ids"][1][s] : lists["input_ids"][1][e]].reshape(e - s, -1)
        mask = lists["attention_mask"][0][lists["attention_mask"][1][s] : lists["attention_mask"][1][e]].reshape(e - s, -1)
        width = ids.shape[1]
        assert width == lengths[s] == lengths[s:e].max() and list(lengths[s:e]) == sorted(lengths[s:e], reverse=True)
        assert (e - s) * width <= 120 or e - s == 1  # the budget, or a single row longer than it
        assert (mask.sum(1) == lengths[s:e]).all() and (ids[mask == 0] == 0).all()  # right-padded with [PAD]
        assert len(set(files[s:e])) == 1  # a micro-batch never spans two files
    copies = np.flatnonzero(mb == COPY)
    assert len(copies) == len(TEXTS) - len(distinct) == 4
    text_of = dict(zip(out["_row"].to_pylist(), [texts[r] for r in out["_row"].to_pylist()]))
    for i in copies:
        first = out["_copy_of"][i].as_py()
        assert text_of[first] == texts[out["_row"][i].as_py()] and files[i] == files[list(out["_row"].to_pylist()).index(first)]
    assert sorted(np.flatnonzero(mb == NONE)) == sorted(np.flatnonzero(lengths == 0))


def test_vectors_are_the_same_whatever_slices_of_the_block_reach_the_encoder(model):
    """Ray Data may cut a tokenized block, or join pieces of two: a micro-batch cut in two still
    runs, and a repeated text whose first copy went to another piece is encoded on its own."""
    from pipeline.stages.encode import EncodeStage
    from pipeline.stages.tokenize import TokenizeStage

    config = EmbedConfig(input="x", output="y", model=model)
    tokens = TokenizeStage(config, batch_tokens=200)(block(TEXTS))
    stage = EncodeStage(config, "cpu", 1)
    whole = stage(tokens)
    want = dict(zip(whole["id"].to_pylist(), np.asarray(whole["embedding"].combine_chunks().flatten()).reshape(len(TEXTS), -1)))
    # micro-batches of least padding (more of them, padded less): the same vectors
    least = stage(TokenizeStage(config, batch_tokens=200, call_tokens=1)(block(TEXTS)))
    assert len(micro_batches_of(TokenizeStage(config, batch_tokens=200, call_tokens=1)(block(TEXTS)))) > len(
        micro_batches_of(tokens))
    for i, v in zip(least["id"].to_pylist(), np.asarray(least["embedding"].combine_chunks().flatten()).reshape(len(TEXTS), -1)):
        np.testing.assert_allclose(v, want[i], atol=1e-6)

    cuts = [0, 7, 40, 41, 77, len(TEXTS)]  # inside micro-batches, and between copies and their first copy
    pieces = [tokens.slice(a, b - a) for a, b in zip(cuts, cuts[1:])]
    mixed = [pa.concat_tables([pieces[3], pieces[0]]), pieces[1], pa.concat_tables([pieces[4], pieces[2]])]
    for part in mixed:
        got = stage(part)
        vectors = np.asarray(got["embedding"].combine_chunks().flatten()).reshape(got.num_rows, -1)
        for i, v in zip(got["id"].to_pylist(), vectors):
            np.testing.assert_allclose(v, want[i], atol=1e-6)


def test_the_encoder_runs_the_model_once_per_micro_batch_on_views_of_the_block(model, monkeypatch):
    from pipeline.stages.encode import EncodeStage
    from pipeline.stages.tokenize import TokenizeStage

    config = EmbedConfig(input="x", output="y", model=model)
    tokens = TokenizeStage(config, batch_tokens=150)(block(TEXTS))
    stage = EncodeStage(config, "cpu", 1)
    shapes = []
    real = stage._forward_padded

    def spy(features):
        shapes.append(features["input_ids"].shape)
        assert not features["input_ids"].flags.owndata  # a view of the block's buffer, not a copy
        return real(features)

    monkeypatch.setattr(stage, "_forward_padded", spy)
    stage(tokens)
    widths = [(e - s, int(tokens["_n_tokens"][s].as_py())) for s, e in micro_batches_of(tokens)]
    assert shapes == widths
