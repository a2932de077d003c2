"""pipeline.embed_dataset: a Ray Dataset in, its rows with an `embedding` column out, as `encode` makes them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.errors import UsageError
from tests.conftest import sample_texts


@pytest.fixture(scope="module")
def st_model(default_model_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(default_model_path, device="cpu")


def cosines(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


def test_rows_from_items_come_back_with_the_vectors_of_encode(ray_cluster, st_model):
    import ray

    texts = sample_texts()[:300]
    items = [{"key": f"k{i}", "body": text, "lang": "x"} for i, text in enumerate(texts)]
    items += [{"key": "blank", "body": "  ", "lang": "x"}, {"key": "null", "body": None, "lang": "x"}]
    rows = pipeline.embed_dataset(ray.data.from_items(items), text_field="body", num_encoders=1).take_all()
    assert len(rows) == len(items)
    assert set(rows[0]) == {"key", "body", "lang", "embedding"}  # the input's columns, and the vector
    by_key = {r["key"]: r for r in rows}
    assert by_key["blank"]["embedding"] is None and by_key["null"]["embedding"] is None
    assert by_key["blank"]["body"] == "  "
    want = st_model.encode(texts, batch_size=64)
    got = [by_key[f"k{i}"]["embedding"] for i in range(len(texts))]
    assert [by_key[f"k{i}"]["body"] for i in range(len(texts))] == texts
    assert cosines(got, want).min() >= 0.99999


def test_read_parquet_to_write_parquet_with_precision_and_chunks(ray_cluster, st_model, tmp_path):
    import ray

    from sentence_transformers.quantization import quantize_embeddings

    texts = sample_texts()[300:500]
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), src / "part.parquet")
    out = tmp_path / "out"
    pipeline.embed_dataset(ray.data.read_parquet(str(src)), id_field="id", precision="binary").write_parquet(str(out))
    table = pq.read_table(out)
    kind = table.schema.field("embedding").type
    assert (kind.list_size, kind.value_type, table.num_rows) == (48, pa.int8(), len(texts))  # 384 bits
    order = np.argsort(table["id"].to_pylist())
    ids = np.array([f"d{i}" for i in range(len(texts))])
    want = quantize_embeddings(st_model.encode(texts), precision="binary")
    got = np.array(table["embedding"].to_pylist(), np.int8)[order]
    assert np.array_equal(np.array(table["id"].to_pylist())[order], np.sort(ids))
    agree = (got == want[np.argsort(ids)]).mean()  # bits of a sign: a cosine near 0 may flip one in ~1e4
    assert agree >= 0.999

    long = [" ".join(texts[i : i + 40]) for i in range(0, 120, 40)]
    chunks = pipeline.embed_dataset(ray.data.from_items([{"id": f"L{i}", "text": t} for i, t in enumerate(long)]),
                                    id_field="id", chunk_tokens=64, chunk_overlap=8).take_all()
    assert {r["doc_id"] for r in chunks} == {"L0", "L1", "L2"} and len(chunks) > 10
    for r in chunks:
        assert r["id"] == f"{r['doc_id']}#{r['chunk']}" and r["text"] == long[int(r["doc_id"][1:])][r["start"]:r["end"]]
    assert cosines([r["embedding"] for r in chunks], st_model.encode([r["text"] for r in chunks])).min() >= 0.99999


def test_file_and_run_options_and_int8_without_ranges_are_refused(ray_cluster):
    import ray

    ds = ray.data.from_items([{"text": "a"}])
    with pytest.raises(UsageError, match="overwrite, rows_per_file concern"):
        pipeline.embed_dataset(ds, rows_per_file=10, overwrite=True)
    with pytest.raises(UsageError, match="chunk_tokens needs id_field"):
        pipeline.embed_dataset(ds, chunk_tokens=64)
    with pytest.raises(UsageError, match="precision=int8: embed_dataset needs calibration="):
        pipeline.embed_dataset(ds, precision="int8")
