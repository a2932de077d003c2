"""Vectors from `embedpipe embed` equal SentenceTransformer.encode on the same directory.

Per-document cosine >= 0.99999 and max abs difference <= 1e-5, for every
pooling mode, a combination, Dense + Normalize, a plain HF directory, a
decoder with `lasttoken`, prompts, overrides, and the real default model on
varied multilingual texts with truncation.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import EmbedConfig, read_embeddings
from pipeline.commands.embed import run_embed
from tests.conftest import assert_same, make_st_dir, varied_texts, write_lines

TINY_TEXTS = [
    "Hello world", "The cat sat on the mat.", "a", "猫", "床前明月光，疑是地上霜。",
    "Ein kurzer deutscher Satz über Häuser.", "x " * 200, "Sentence embeddings with pooling",
    "What is the capital of France?", "  leading and trailing spaces  ", "UPPER lower MiXeD", "🙂 emoji",
] * 3


def embed(tmp_path, texts, model, **options):
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    write_lines(src / "docs.txt", texts)
    out = tmp_path / "out"
    options.setdefault("num_encoders", 1)  # vectors do not depend on it; one process fewer loads on 2 cores
    result = run_embed(EmbedConfig(input=str(src), output=str(out), model=model, quiet=True, **options))
    ids, vectors = read_embeddings(str(out))
    order = [int(i.rsplit(":", 1)[1]) for i in ids]
    assert order == sorted(order) and len(ids) == len(texts)
    return vectors, result


def reference(model_dir, texts, normalize=False, **kwargs):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    if "max_seq_length" in kwargs:
        model.max_seq_length = kwargs.pop("max_seq_length")
    return model.encode(texts, batch_size=16, normalize_embeddings=normalize, **kwargs)


@pytest.mark.parametrize(
    "pooling",
    [
        # make test: cls here, mean in the plain Hugging Face directory test, lasttoken in the decoder
        # test; every other mode and a combination in make test-all
        "cls",
        *(pytest.param(mode, marks=pytest.mark.slow)
          for mode in ("mean", "lasttoken", "max", "mean_sqrt_len_tokens", "weightedmean", ("cls", "mean", "max"))),
    ],
    ids=lambda p: "+".join(p) if isinstance(p, tuple) else p,
)
def test_pooling_modes_match_sentence_transformers(ray_cluster, tmp_path, tiny_bert_dir, pooling):
    model_dir = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling=pooling)
    ours, _ = embed(tmp_path, TINY_TEXTS, model_dir)
    assert_same(ours, reference(model_dir, TINY_TEXTS))


def test_lasttoken_decoder_with_left_padding(ray_cluster, tmp_path, tiny_decoder_dir):
    model_dir = make_st_dir(tiny_decoder_dir, str(tmp_path / "st"), pooling="lasttoken", normalize=True)
    ours, _ = embed(tmp_path, TINY_TEXTS, model_dir)
    assert_same(ours, reference(model_dir, TINY_TEXTS))


@pytest.mark.slow  # make test-all; in make test the decoder's and the default model's tests have a Normalize module
def test_dense_and_normalize_modules(ray_cluster, tmp_path, tiny_bert_dir):
    model_dir = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean", dense=True, normalize=True)
    ours, result = embed(tmp_path, TINY_TEXTS, model_dir)
    assert ours.shape[1] == 16 and result.manifest["normalize"] is True
    assert_same(ours, reference(model_dir, TINY_TEXTS))


def test_plain_huggingface_directory_uses_mean_pooling(ray_cluster, tmp_path, tiny_bert_dir):
    ours, result = embed(tmp_path, TINY_TEXTS, tiny_bert_dir)
    assert result.manifest["pooling"] == "mean"
    assert_same(ours, reference(tiny_bert_dir, TINY_TEXTS))


def test_pooling_normalize_and_length_overrides(ray_cluster, tmp_path, tiny_bert_dir):
    model_dir = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean", normalize=True)
    ours, result = embed(tmp_path, TINY_TEXTS, model_dir, pooling="max", normalize=False, max_seq_length=8)
    ref_dir = make_st_dir(tiny_bert_dir, str(tmp_path / "ref"), pooling="max", normalize=False)
    assert_same(ours, reference(ref_dir, TINY_TEXTS, max_seq_length=8))
    assert result.manifest["pooling"] == "max" and result.manifest["normalize"] is False
    assert result.manifest["rows"]["truncated"] > 0


def test_prompts_as_in_encode(ray_cluster, tmp_path, tiny_bert_dir):
    prompts = {"query": "query: ", "document": "passage: "}
    model_dir = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean", prompts=prompts)
    ours, _ = embed(tmp_path, TINY_TEXTS, model_dir, prompt_name="query")
    assert_same(ours, reference(model_dir, TINY_TEXTS, prompt_name="query"))
    plain = reference(model_dir, TINY_TEXTS)
    assert np.abs(ours - plain).max() > 1e-3  # the prompt really changed the vectors


def test_default_model_on_varied_multilingual_texts(ray_cluster, tmp_path, default_model_path):
    texts = varied_texts(500)
    assert len(texts) >= 500 and any("\u4e00" <= ch <= "\u9fff" for t in texts for ch in t)
    ours, result = embed(tmp_path, texts, "all-MiniLM-L6-v2", max_batch_tokens=4096, num_encoders=None)  # a real load: all cores
    assert_same(ours, reference(default_model_path, texts))
    rows = result.manifest["rows"]
    assert rows["embedded"] == len(texts)
    assert rows["truncated"] >= 11  # the long texts, each far beyond 256 tokens
    assert result.manifest["dim"] == 384 and result.manifest["normalize"] is True
