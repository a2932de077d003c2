"""`--precision`, `--truncate-dim`, `--role`: what is stored equals sentence-transformers'
encode(precision=..., truncate_dim=..., normalize_embeddings=...) and quantize_embeddings on the real
default model; int8/uint8 ranges are the run's, computed once (sampled rows or a file) and reused on
a resume; readers, `quantize_queries`, `mine` and `info` read every precision."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers.util import quantize_embeddings

from pipeline import EmbedConfig, quantize_queries, read_embeddings
from pipeline.commands.embed import run_embed
from pipeline.errors import UsageError
from pipeline.quantization import ranges_of
from tests.conftest import assert_same, make_st_dir, run_main, sample_texts, write_lines

TEXTS = sample_texts()[::10]  # 150 English, German and Chinese texts


@pytest.fixture(scope="module")
def st_model(default_model_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(default_model_path, device="cpu")


def embed(tmp_path, texts=TEXTS, files=1, name="out", **options):
    src = tmp_path / "in"
    if not src.exists():
        src.mkdir()
        bounds = np.linspace(0, len(texts), files + 1).astype(int)
        for f in range(files):
            write_lines(src / f"part{f}.txt", texts[bounds[f]:bounds[f + 1]])
    out = tmp_path / name
    options.setdefault("num_encoders", 1)
    result = run_embed(EmbedConfig(input=str(src), output=str(out), quiet=True, **options))
    return out, result


def stored(out) -> np.ndarray:
    ids, values = read_embeddings(str(out))
    assert ids == sorted(ids, key=lambda i: (i.rsplit(":", 1)[0], int(i.rsplit(":", 1)[1])))  # the input's order
    return values


def test_ubinary_truncated_equals_encode(ray_cluster, tmp_path, st_model, capsys):
    out, result = embed(tmp_path, precision="ubinary", truncate_dim=128)
    m = result.manifest
    assert (m["precision"], m["dim"], m["truncate_dim"], m["bytes_per_vector"]) == ("ubinary", 128, 128, 16)
    schema = pq.read_schema(next(out.glob("*.parquet")))
    assert schema.field("embedding").type == pa.list_(pa.uint8(), 16)
    ours = stored(out)
    ref = st_model.encode(TEXTS, precision="ubinary", truncate_dim=128, normalize_embeddings=True)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (len(TEXTS), 16)
    differing = np.unpackbits(ours ^ ref).sum()  # a sign bit of a value within rounding of 0 may flip
    assert differing <= 2, differing
    # read back as +1/-1, 128 dimensions; queries stored as the run stored its documents
    _, signs = read_embeddings(str(out), dequantize=True)
    assert signs.shape == (len(TEXTS), 128) and set(np.unique(signs)) == {-1.0, 1.0}
    queries = st_model.encode(TEXTS[:5])  # full 384-dimensional float vectors
    assert np.array_equal(quantize_queries(queries, str(out)), ref[:5])
    code = run_main(capsys, "info", str(out), "--rows", "1")
    assert code.returncode == 0, code.stderr
    assert '"precision": "ubinary"' in code.stdout and '"bytes_per_vector": 16' in code.stdout


def test_int8_ranges_from_sampled_rows_and_a_resume_reuses_them(ray_cluster, tmp_path, st_model):
    out, result = embed(tmp_path, files=3, precision="int8", calibration_rows=30, pack_files=False)  # a file a shard
    q = result.manifest["quantization"]
    assert q["precision"] == "int8" and q["source"]["from"] == "rows" and q["source"]["rows"] == 30
    assert q["source"]["shards"] == 3
    ranges = np.asarray(q["ranges"], np.float32)
    # the sample: the first 10 texts of each of the 3 shards, embedded as encode does
    bounds = np.linspace(0, len(TEXTS), 4).astype(int)
    sample = [t for b in bounds[:3] for t in TEXTS[b:b + 10]]
    assert np.allclose(ranges, ranges_of(st_model.encode(sample)), atol=2e-6)
    ours = stored(out)
    ref = quantize_embeddings(st_model.encode(TEXTS), "int8", ranges=ranges)
    assert ours.dtype == np.int8 and np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    # a resume: the ranges come from _run.json, not from a second calibration
    first = sorted(out.glob("*.parquet"))[0]
    before = pq.read_table(first)
    first.unlink()
    _, resumed = embed(tmp_path, precision="int8", calibration_rows=30, pack_files=False)
    assert resumed.files_written == 1 and resumed.manifest["quantization"]["ranges"] == q["ranges"]
    assert resumed.manifest["quantization"]["source"] == q["source"]
    assert pq.read_table(first).equals(before)
    # another precision, or other ranges, onto the same output: refused, nothing touched
    with pytest.raises(UsageError, match="precision='int8', this run has 'binary'"):
        embed(tmp_path, precision="binary")
    other = tmp_path / "other.npy"
    np.save(other, ranges * 2)
    first.unlink()
    with pytest.raises(UsageError, match="other ranges"):
        embed(tmp_path, precision="int8", calibration=str(other))
    assert not first.exists()


def test_role_picks_the_models_document_prompt(ray_cluster, tmp_path, tiny_bert_dir):
    from sentence_transformers import SentenceTransformer

    prompts = {"query": "query: ", "document": "passage: "}
    model_dir = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean", prompts=prompts)
    texts = TEXTS[:40]
    out, result = embed(tmp_path, texts, model=model_dir, role="document")
    model = SentenceTransformer(model_dir, device="cpu")
    assert_same(stored(out), model.encode_document(texts))
    assert np.abs(stored(out) - model.encode(texts)).max() > 1e-3  # the prompt really changed the vectors
    assert result.manifest["model"]["prompt"] == "passage: "


def test_truncate_dim_larger_than_the_model_is_refused(ray_cluster, tmp_path, tiny_model):
    with pytest.raises(UsageError, match="--truncate-dim 64: model .* makes 32-dimensional vectors"):
        embed(tmp_path, TEXTS[:5], model=tiny_model, truncate_dim=64)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("precision, normalize, truncate_dim", [
    ("float16", False, 100),   # without Normalize, truncated: not normalised again
    ("binary", None, None),    # the model's Normalize, every dimension
    ("uint8", False, 64),      # ranges from rows of unnormalised, truncated vectors
    ("int8", None, 200),
])
def test_each_precision_equals_encode(ray_cluster, tmp_path, st_model, default_model_path, precision, normalize,
                                      truncate_dim):
    from sentence_transformers import SentenceTransformer

    options = {"normalize": normalize} if normalize is not None else {}
    out, result = embed(tmp_path, precision=precision, truncate_dim=truncate_dim, **options)
    model = st_model
    if normalize is False:  # the model without its Normalize module, as --no-normalize loads it
        model = SentenceTransformer(default_model_path, device="cpu")
        del model[len(model) - 1]
    floats = model.encode(TEXTS, truncate_dim=truncate_dim, normalize_embeddings=normalize is None)
    ours = stored(out)
    if precision == "float16":
        assert ours.dtype == np.float32  # read back as float32
        assert np.abs(ours - floats).max() <= 2e-3 and ours.shape[1] == truncate_dim
        assert np.abs(np.linalg.norm(ours, axis=1) - 1).max() > 0.01  # not normalised again
    elif precision == "binary":
        assert np.unpackbits((ours ^ quantize_embeddings(floats, "binary")).view(np.uint8)).sum() <= 2
    else:
        ranges = np.asarray(result.manifest["quantization"]["ranges"], np.float32)
        ref = quantize_embeddings(floats, precision, ranges=ranges)
        assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert result.manifest["dim"] == (truncate_dim or 384)


@pytest.mark.slow
def test_uint8_ranges_from_a_file_and_from_an_earlier_output(ray_cluster, tmp_path, st_model):
    floats = st_model.encode(TEXTS)
    ranges = ranges_of(floats[:20])
    path = tmp_path / "ranges.npy"
    np.save(path, ranges)
    out, result = embed(tmp_path, precision="uint8", calibration=str(path))
    q = result.manifest["quantization"]
    assert q["source"] == {"from": "file", "path": str(path)}
    assert np.array_equal(np.asarray(q["ranges"], np.float32), ranges)
    assert np.abs(stored(out).astype(int) - quantize_embeddings(floats, "uint8", ranges=ranges).astype(int)).max() <= 1
    again, second = embed(tmp_path, name="again", precision="uint8", calibration=str(out))
    assert second.manifest["quantization"]["ranges"] == q["ranges"]
    assert np.array_equal(stored(again), stored(out))
    # dequantised by readers as by mine: bucket centres close to the float vectors
    _, back = read_embeddings(str(out), dequantize=True)
    inside = (floats >= ranges[0]) & (floats <= ranges[1])
    step = (ranges[1] - ranges[0]) / 255
    assert (np.abs(back - floats)[inside] <= np.broadcast_to(step, floats.shape)[inside] * 0.51).all()
    bad = tmp_path / "bad.npy"
    np.save(bad, ranges[:, :10])
    with pytest.raises(UsageError, match=r"ranges of shape \(2, 10\), this run needs \(2, 384\)"):
        embed(tmp_path, name="bad", precision="uint8", calibration=str(bad))
    assert json.loads((out / "_manifest.json").read_text())["precision"] == "uint8"
    assert not os.path.exists(tmp_path / "bad")
