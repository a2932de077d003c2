"""The output opens unchanged in read_embeddings (pipeline.storage.readers), pyarrow, pandas, polars,
duckdb and datasets; on S3 the readers never use a stale listing."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import EmbedConfig, read_embeddings
from pipeline.commands.embed import run_embed


@pytest.fixture(scope="module")
def output_dir(ray_cluster, tmp_path_factory, tiny_model):
    base = tmp_path_factory.mktemp("readers")
    src = base / "in"
    src.mkdir()
    (src / "a.txt").write_text("".join(f"alpha {i}\n" for i in range(7)))
    (src / "b.txt").write_text("".join(f"beta {i}\n" for i in range(5)))
    out = base / "out"
    run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, num_encoders=1, quiet=True))  # 12 rows
    ids, vectors = read_embeddings(str(out))
    return out, ids, vectors


def test_read_embeddings(output_dir):
    _, ids, vectors = output_dir
    assert ids == [f"a.txt:{i}" for i in range(7)] + [f"b.txt:{i}" for i in range(5)]
    assert vectors.dtype == np.float32 and vectors.shape == (12, 32)


def test_pyarrow_dataset(output_dir):
    import pyarrow as pa
    import pyarrow.dataset as pads

    out, ids, vectors = output_dir
    table = pads.dataset(str(out), format="parquet").to_table()  # skips _manifest.json
    assert sorted(table["id"].to_pylist()) == sorted(ids)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    got = dict(zip(table["id"].to_pylist(), table["embedding"].to_numpy(zero_copy_only=False)))
    np.testing.assert_array_equal(np.stack([got[i] for i in ids]), vectors)


def test_pandas(output_dir):
    import pandas as pd

    out, ids, vectors = output_dir
    df = pd.read_parquet(out)
    got = dict(zip(df["id"], df["embedding"]))
    np.testing.assert_array_equal(np.asarray(got[ids[3]], np.float32), vectors[3])


def test_polars(output_dir):
    import polars as pl

    out, ids, vectors = output_dir
    df = pl.read_parquet(str(out / "*.parquet"))
    assert df.height == len(ids)
    row = df.filter(pl.col("id") == ids[-1])["embedding"].to_list()[0]
    np.testing.assert_array_equal(np.asarray(row, np.float32), vectors[-1])


def test_duckdb(output_dir):
    import duckdb

    out, ids, vectors = output_dir
    db = duckdb.connect()
    count, dim = db.execute(f"select count(*), max(len(embedding)) from read_parquet('{out}/*.parquet')").fetchone()
    assert count == len(ids) and dim == 32
    (row,) = db.execute(f"select embedding from read_parquet('{out}/*.parquet') where id = ?", [ids[8]]).fetchall()
    np.testing.assert_array_equal(np.asarray(row[0], np.float32), vectors[8])


def test_datasets_load_dataset(output_dir):
    import datasets

    out, ids, vectors = output_dir
    ds = datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train")
    assert len(ds) == len(ids)
    row = ds[0]
    i = ids.index(row["id"])
    np.testing.assert_allclose(np.asarray(row["embedding"], np.float32), vectors[i])


def test_readers_see_files_committed_after_an_earlier_read(moto_s3):
    import numpy as np
    import pyarrow as pa

    from pipeline.storage.sink import parquet_bytes

    bucket = moto_s3.new_bucket("reread")
    uri, options = f"s3://{bucket}/out", moto_s3.storage_options()

    def put(name: str, ids: list[str]) -> None:
        emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(2 * len(ids), np.float32)), 2)
        moto_s3.client().put_object(Bucket=bucket, Key=f"out/{name}", Body=parquet_bytes(pa.table({"id": ids, "embedding": emb})))

    put("a.parquet", ["a"])
    assert read_embeddings(uri, options)[0] == ["a"]
    put("b.parquet", ["b"])
    assert read_embeddings(uri, options)[0] == ["a", "b"]
