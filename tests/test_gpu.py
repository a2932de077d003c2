"""The CUDA path on a real GPU: the whole command through Ray, and a real out-of-memory split.

Skipped (and reported as skipped) where torch sees no CUDA device, which is every CI machine;
the GPU session runs them with jobs/device/run_gpu.sh (BENCHMARKS.md, "GPU").
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from tests.conftest import cli, sample_texts, write_lines

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def gpu_texts(tmp_path_factory):
    texts = [t for t in sample_texts() if t.strip()]
    texts += [f"sentence {i}: " + " ".join(texts[i % len(texts)].split()[: 3 + i % 40]) for i in range(3000)]
    path = write_lines(tmp_path_factory.mktemp("gpu") / "docs.txt", texts)
    return path, texts


@pytest.fixture(scope="module")
def st_reference(gpu_texts, default_model_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(default_model_path, device="cuda")
    vectors = model.encode(gpu_texts[1], batch_size=64, convert_to_numpy=True)
    del model
    torch.cuda.empty_cache()
    return vectors


def _read(out):
    from pipeline import read_embeddings

    ids, vectors = read_embeddings(str(out))
    order = np.argsort([int(i.rsplit(":", 1)[1]) for i in ids])
    return vectors[order], json.load(open(os.path.join(out, "_manifest.json")))


def _cosine(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_cuda_run_is_float16_on_one_gpu_replica_and_matches_sentence_transformers(tmp_path, gpu_texts, st_reference):
    path, texts = gpu_texts
    out = tmp_path / "out"
    proc = cli("embed", "--input", path, "--output", str(out), "--device", "cuda", "--precision", "float16",
               "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vectors, manifest = _read(out)
    assert len(vectors) == len(texts)
    assert manifest["dtype"] == "float16" and manifest["precision"] == "float16"
    encoders = manifest["replicas"]["encode"]["actors"]
    assert len(encoders) == torch.cuda.device_count()  # one replica per GPU
    assert all(a["device"] == "cuda" and len(a["gpu_ids"]) == 1 for a in encoders)
    assert len({a["gpu_ids"][0] for a in encoders}) == len(encoders)
    import pyarrow.parquet as pq

    first = os.path.join(out, manifest["files"][0]["file"])
    assert str(pq.read_schema(first).field("embedding").type.value_type) == "halffloat"
    cos = _cosine(vectors.astype(np.float32), st_reference)
    assert cos.min() >= 0.999, cos.min()  # float16 compute and float16 storage against float32
    assert cos.mean() >= 0.9999, cos.mean()


def test_cuda_float32_reproduces_sentence_transformers(tmp_path, gpu_texts, st_reference):
    path, texts = gpu_texts
    out = tmp_path / "out"
    proc = cli("embed", "--input", path, "--output", str(out), "--device", "cuda", "--dtype", "float32", "--quiet",
               timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vectors, manifest = _read(out)
    assert manifest["dtype"] == "float32"
    # the GPU defaults: files built apart from the encoders, micro-batches cut at 4,096 tokens a call
    assert manifest["resources"]["writer"] == "separate" and manifest["resources"]["call_tokens"] == 4096
    assert np.abs(vectors - st_reference).max() <= 1e-4
    assert _cosine(vectors, st_reference).min() >= 0.99999


def test_two_replicas_share_each_gpu_and_give_the_same_vectors(tmp_path, gpu_texts, st_reference):
    """--encoders-per-gpu 2: two float32 replicas on every GPU, each fed ready micro-batches; every
    vector still equals sentence-transformers'. With --writer encoder the encoders build the files."""
    path, texts = gpu_texts
    out = tmp_path / "out"
    proc = cli("embed", "--input", path, "--output", str(out), "--device", "cuda", "--dtype", "float32",
               "--encoders-per-gpu", "2", "--writer", "encoder", "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vectors, manifest = _read(out)
    assert manifest["resources"]["writer"] == "encoder"
    encoders = manifest["replicas"]["encode"]["actors"]
    assert len(encoders) == 2 * torch.cuda.device_count() and manifest["resources"]["encoder_gpus"] == 0.5
    assert all(a["device"] == "cuda" for a in encoders)
    assert np.abs(vectors - st_reference).max() <= 1e-4


def test_a_real_cuda_out_of_memory_splits_the_batch_and_ids_keep_their_vectors(default_model_path, caplog):
    """A micro-batch far over a capped GPU memory: the allocator raises a real OutOfMemoryError,
    the batch is halved until it fits, and every id keeps its own vector."""
    import pyarrow as pa

    from pipeline.config import EmbedConfig
    from pipeline.stages.encode import EncodeStage
    from pipeline.stages.tokenize import TokenizeStage

    texts = [f"{i} " + " ".join(f"w{(i * 7 + j) % 997}" for j in range(200 + i % 50)) for i in range(256)]
    batch = pa.table({"id": [str(i) for i in range(256)], "text": texts, "_valid": [True] * 256})
    small = EmbedConfig(input="x", output="y", model=default_model_path, max_batch_tokens=4096)
    expected = EncodeStage(small, "cuda", None)(TokenizeStage(small)(batch))
    huge = EmbedConfig(input="x", output="y", model=default_model_path, max_batch_tokens=1 << 20)
    tokens = TokenizeStage(huge)(batch)  # the tokenizer cuts the micro-batches: one of 256 x 256 tokens
    stage = EncodeStage(huge, "cuda", None)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + (160 << 20)) / total)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.stages.batching"):
            split = stage(tokens)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert any("CUDA out of memory" in r.message for r in caplog.records)  # it really ran out, then split
    assert split["id"].to_pylist() == expected["id"].to_pylist()
    got = np.asarray(split["embedding"].combine_chunks().flatten().to_numpy()).reshape(256, -1)
    want = np.asarray(expected["embedding"].combine_chunks().flatten().to_numpy()).reshape(256, -1)
    assert _cosine(got, want).min() >= 0.9999  # a misaligned id would fall far below


def test_mining_on_the_gpu_gives_the_pairs_of_sentence_transformers():
    """The block products in float16 on the GPU, candidates scored again in float32: the same pairs."""
    from sentence_transformers.util import paraphrase_mining_embeddings as st_mining

    from pipeline.mining import paraphrase_mining_embeddings
    from tests.conftest import clustered_vectors
    from tests.test_mining import assert_same_pairs

    x = clustered_vectors(6000, d=384, noise=0.05)
    ref = st_mining(torch.from_numpy(x), top_k=20, max_pairs=20_000)
    assert_same_pairs(paraphrase_mining_embeddings(x, top_k=20, max_pairs=20_000, block_size=2048, device="cuda"), ref)
