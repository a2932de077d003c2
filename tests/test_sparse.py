"""Sparse (SPLADE) embeddings: `embedpipe embed` on a SparseEncoder directory equals
SparseEncoder.encode on the same directory (same non-zero set, values within 1e-5),
written as `indices: list<int32>`, `values: list<float32>`, with the vocabulary size
in the manifest; `--sparse-top-k` keeps the strongest terms as max_active_dims does.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import EmbedConfig, read_sparse_embeddings
from pipeline.cli import main
from pipeline.stages.encode import sparse_terms
from pipeline.errors import InputError, UsageError
from pipeline.commands.embed import run_embed
from tests.conftest import sample_texts, write_lines

TEXTS = sample_texts()[:60] + ["a", "猫", "x " * 150, "Sparse lexical vectors for retrieval."] * 2


@pytest.fixture(scope="module")
def splade_dir(tmp_path_factory, default_model_path) -> str:
    """A random 2-layer BERT masked LM (MiniLM's tokenizer) + SPLADE max pooling, saved by SparseEncoder.

    The MLM head's bias is drawn around -2.3, so each document activates a few hundred of
    the 30,522 terms, as a trained SPLADE model does (a zero bias would make half the vocabulary active).
    """
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(3)
    base = tmp_path_factory.mktemp("tiny-mlm")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    )
    mlm = BertForMaskedLM(config).eval()
    with torch.no_grad():
        mlm.cls.predictions.bias.copy_(torch.randn(config.vocab_size) - 2.3)
    mlm.save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path_factory.mktemp("splade")
    model = SparseEncoder(modules=[Transformer(str(base), transformer_task="fill-mask", max_seq_length=64),
                                   SpladePooling("max")], device="cpu")
    model.save(str(out))
    return str(out)


def reference(model_dir: str, texts: list[str], max_active_dims: int | None = None) -> np.ndarray:
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(model_dir, device="cpu")
    dense = model.encode(texts, batch_size=16, convert_to_sparse_tensor=False, max_active_dims=max_active_dims)
    return dense.numpy()


def assert_same_terms(ours, ref: np.ndarray) -> None:
    ours = ours.toarray()
    assert ours.shape == ref.shape
    assert np.array_equal(ours != 0, ref != 0), f"{int(((ours != 0) != (ref != 0)).sum())} entries differ in being zero"
    assert np.abs(ours - ref).max() <= 1e-5, np.abs(ours - ref).max()


@pytest.fixture(scope="module")
def sparse_run(ray_cluster, tmp_path_factory, splade_dir):
    """One sparse run over two shards cut into small blocks and files."""
    src = tmp_path_factory.mktemp("sparse-in")
    write_lines(src / "a.txt", TEXTS[:40])
    write_lines(src / "b.txt", TEXTS[40:])
    out = tmp_path_factory.mktemp("sparse-out") / "out"
    result = run_embed(EmbedConfig(input=str(src), output=str(out), model=splade_dir, quiet=True, rows_per_file=16,
                                     num_encoders=1))  # one encoder: one process fewer loads on 2 cores
    return src, out, result


def test_sparse_vectors_equal_sparse_encoder_encode(sparse_run, splade_dir):
    src, out, result = sparse_run
    ids, matrix = read_sparse_embeddings(str(out))
    assert ids == [f"a.txt:{i}" for i in range(40)] + [f"b.txt:{i}" for i in range(len(TEXTS) - 40)]
    assert_same_terms(matrix, reference(splade_dir, TEXTS))
    active = np.diff(matrix.indptr)
    assert 10 < active.mean() < 3000  # truly sparse, not dense vectors stored as lists

    manifest = result.manifest
    assert manifest["kind"] == "sparse" and manifest["model"]["kind"] == "sparse"
    assert manifest["vocab_size"] == manifest["dim"] == 30522
    assert manifest["sparse_top_k"] is None and manifest["pooling"] == "splade-max"
    assert manifest["rows"]["embedded"] == len(TEXTS) and len(manifest["files"]) > 2

    table = pq.read_table(out / manifest["files"][0]["file"])
    assert table.schema.field("indices").type == pa.list_(pa.int32())
    assert table.schema.field("values").type == pa.list_(pa.float32())
    assert "embedding" not in table.schema.names
    first = table.slice(0, 1).to_pylist()[0]
    assert first["indices"] == sorted(first["indices"]) and all(v > 0 for v in first["values"])


@pytest.mark.slow  # make test-all; test_sparse_terms_match_select_max_active_dims checks the selection in make test
def test_sparse_top_k_keeps_the_strongest_terms_as_max_active_dims(ray_cluster, tmp_path, splade_dir):
    src = tmp_path / "in"
    src.mkdir()
    write_lines(src / "docs.txt", TEXTS)
    out = tmp_path / "out"
    assert main(["embed", "--input", str(src), "--output", str(out), "--model", splade_dir,
                 "--sparse-top-k", "8", "--output-dtype", "float16", "--quiet"]) == 0
    ids, matrix = read_sparse_embeddings(str(out))
    assert len(ids) == len(TEXTS) and np.diff(matrix.indptr).max() == 8
    ref = reference(splade_dir, TEXTS, max_active_dims=8)
    ours = matrix.toarray()
    assert np.array_equal(ours != 0, ref != 0)
    assert np.abs(ours - ref).max() <= 2e-3 * np.abs(ref).max()  # stored as float16
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["sparse_top_k"] == 8 and manifest["output_dtype"] == "float16"

    # a resume with another top-k would mix two kinds of vectors in one output
    with pytest.raises(UsageError, match="sparse_top_k=8"):
        run_embed(EmbedConfig(input=str(src), output=str(out), model=splade_dir, quiet=True, sparse_top_k=4,
                              output_dtype="float16"))


def test_sparse_terms_match_select_max_active_dims():
    import torch
    from sentence_transformers.util import select_max_active_dims

    rng = np.random.default_rng(0)
    dense = np.where(rng.random((6, 50)) < 0.3, rng.random((6, 50)), 0).astype(np.float32)
    dense[2] = 0  # a document with no active term
    for k in (None, 3, 50, 80):
        kept = select_max_active_dims(torch.from_numpy(dense), k).numpy() if k else dense
        terms = sparse_terms(dense.copy(), k)
        for row, (indices, values) in zip(kept, terms):
            assert indices.dtype == np.int32 and values.dtype == np.float32
            assert indices.tolist() == np.flatnonzero(row).tolist()
            assert values.tolist() == row[row != 0].tolist()


def test_options_a_sparse_model_cannot_take_are_refused_before_anything_runs(tmp_path, splade_dir, default_model_path):
    src = tmp_path / "in"
    src.mkdir()
    write_lines(src / "docs.txt", ["one", "two"])
    out = tmp_path / "out"

    def embed(**options):
        return run_embed(EmbedConfig(input=str(src), output=str(out), quiet=True, **options))

    with pytest.raises(UsageError, match="--pooling: .* sparse"):
        embed(model=splade_dir, pooling="mean")
    with pytest.raises(UsageError, match="--normalize: .* sparse"):
        embed(model=splade_dir, normalize=True)
    with pytest.raises(UsageError, match="--dtype int8: .* sparse"):
        embed(model=splade_dir, dtype="int8")
    with pytest.raises(UsageError, match="--sparse-top-k: .* dense model"):
        embed(model=default_model_path, sparse_top_k=8)
    with pytest.raises(UsageError, match="--sparse-top-k must be"):
        embed(model=splade_dir, sparse_top_k=0)
    assert not out.exists()


def test_a_cross_encoder_directory_is_refused_by_embed(tmp_path, tiny_bert_dir):
    from sentence_transformers import CrossEncoder

    model_dir = tmp_path / "ce"
    CrossEncoder(tiny_bert_dir, num_labels=1, device="cpu").save(str(model_dir))
    src = tmp_path / "in"
    src.mkdir()
    write_lines(src / "docs.txt", ["one"])
    with pytest.raises(InputError, match="is a cross-encoder.*embedpipe rerank"):
        run_embed(EmbedConfig(input=str(src), output=str(tmp_path / "out"), model=str(model_dir), quiet=True))


def test_sparse_output_is_refused_by_mine_and_dense_reader_and_shown_by_info(sparse_run, tmp_path, capsys):
    from pipeline import read_embeddings

    _, out, _ = sparse_run
    with pytest.raises(InputError, match="sparse vectors.*read_sparse_embeddings"):
        read_embeddings(str(out))
    assert main(["mine", "--embeddings", str(out), "--output", str(tmp_path / "pairs"), "--quiet"]) == 2
    assert "sparse (SPLADE) vectors; mining works on dense embeddings" in capsys.readouterr().err
    assert main(["info", str(out), "--rows", "2"]) == 0
    shown = capsys.readouterr().out
    assert '"vocab_size": 30522' in shown and "a.txt:0: " in shown and " terms {" in shown
