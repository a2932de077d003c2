"""The tokenizer actors' torch-free path (pipeline.models.fast_tokenizer) against sentence-transformers' `preprocess`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline import EmbedConfig
from pipeline.models.loading import load_model, resolve_prompt
from pipeline.models.fast_tokenizer import PROBE_TEXTS, PlainTokenizer, spec_for
from tests.conftest import cli_env, make_st_dir, sample_texts, varied_texts

TEXTS = varied_texts(1500) + PROBE_TEXTS + ["", "   ", "Ünïcödé  with   runs of   spaces", "x " * 300]


def _loaded(model: str, **options):
    config = EmbedConfig(input=".", output="out", model=model, **options)
    model = load_model(config, weights=False)
    return config, model, resolve_prompt(model, config)


def _assert_same_as_preprocess(model, prompt, spec, texts):
    got, lengths = PlainTokenizer(spec).encode(texts)
    expected = model.preprocess(texts, prompt=prompt)
    mask = expected["attention_mask"].numpy().astype(bool)
    np.testing.assert_array_equal(lengths, mask.sum(axis=1))
    assert set(got) == {k for k in expected if k != "attention_mask" and tuple(getattr(expected[k], "shape", ())) == mask.shape}
    for name, values in got.items():
        np.testing.assert_array_equal(values, expected[name].numpy()[mask], err_msg=name)


@pytest.fixture(scope="module")
def cased_tokenizer_dir(tmp_path_factory, tiny_bert_dir):
    """The tiny BERT with a tokenizer that keeps case (MiniLM's WordPiece without its lower-casing)."""
    out = tmp_path_factory.mktemp("cased")
    for name in os.listdir(tiny_bert_dir):
        with open(os.path.join(tiny_bert_dir, name), "rb") as src, open(out / name, "wb") as dst:
            dst.write(src.read())
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["normalizer"]["lowercase"] = False
    (out / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["do_lower_case"] = False
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return str(out)


def test_the_default_model_tokenizes_as_preprocess_does_on_many_languages_and_lengths(default_model_path):
    _, model, prompt = _loaded(default_model_path)
    spec = spec_for(model, prompt)
    assert spec is not None and spec.max_len == 256
    assert [name for name, _ in spec.fields] == ["input_ids", "token_type_ids"]
    _assert_same_as_preprocess(model, prompt, spec, TEXTS)


def test_a_prompt_and_a_shorter_max_seq_length_are_applied(tiny_bert_dir, tmp_path):
    path = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean", max_seq_length=24,
                       prompts={"query": "query: "})
    _, model, prompt = _loaded(path, prompt_name="query", max_seq_length=16)
    spec = spec_for(model, prompt)
    assert (spec.prompt, spec.max_len) == ("query: ", 16)
    _assert_same_as_preprocess(model, prompt, spec, TEXTS)
    _, lengths = PlainTokenizer(spec).encode(["a few words", " ".join(["word"] * 50)])
    assert lengths[1] == 16 and lengths[0] == 2 + 2 + 3  # [CLS] query : a few words [SEP]


def test_lower_casing_that_sentence_transformers_adds_is_carried_over(cased_tokenizer_dir, tmp_path):
    """With do_lower_case, sentence-transformers adds a Lowercase normalizer to the loaded tokenizer:
    the spec is taken from the tokenizer as loaded, not from tokenizer.json, so it lower-cases too."""
    outcomes = {}
    for lower in (False, True):
        path = make_st_dir(cased_tokenizer_dir, str(tmp_path / f"st-{lower}"), pooling="mean")
        with open(os.path.join(path, "sentence_bert_config.json")) as f:
            settings = json.load(f)
        settings["do_lower_case"] = lower
        with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
            json.dump(settings, f)
        _, model, prompt = _loaded(path)
        spec = spec_for(model, prompt)
        _assert_same_as_preprocess(model, prompt, spec, TEXTS)
        ids, _ = PlainTokenizer(spec).encode(["Paris London", "paris london"])
        half = len(ids["input_ids"]) // 2
        outcomes[lower] = np.array_equal(ids["input_ids"][:half], ids["input_ids"][half:])
    assert outcomes == {False: False, True: True}


def test_a_left_padding_decoder_tokenizer_is_captured_too(tiny_decoder_dir, tmp_path):
    path = make_st_dir(tiny_decoder_dir, str(tmp_path / "st"), pooling="lasttoken")
    _, model, prompt = _loaded(path)
    spec = spec_for(model, prompt)
    assert spec is not None
    _assert_same_as_preprocess(model, prompt, spec, TEXTS)


def test_the_stage_gives_the_same_table_either_way(default_model_path, tiny_bert_dir, tmp_path):
    """TokenizeStage with a spec (what the actors run) and without one (sentence-transformers):
    the same token columns, lengths, truncation flags and row order, for two models."""
    from pipeline.stages.ready import micro_batches_of
    from pipeline.stages.tokenize import TokenizeStage

    texts = TEXTS[:400] + TEXTS[-60:]  # some far longer than both models take
    batch = pa.table({
        "id": [str(i) for i in range(len(texts) + 2)],
        "text": texts + [None, ""],
        "_valid": [True] * len(texts) + [False, True],
        "_file": [f"f{i % 3}" for i in range(len(texts) + 2)],
    })
    prompted = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="cls", max_seq_length=32,
                           prompts={"query": "query: "})
    for model, options in ((default_model_path, {}), (prompted, {"prompt_name": "query"})):
        config, loaded, prompt = _loaded(model, **options)
        plain, slow = TokenizeStage(config, spec=spec_for(loaded, prompt)), TokenizeStage(config)
        assert plain.model is None and slow.plain is None
        got, expected = plain(batch), slow(batch)
        assert micro_batches_of(got) == micro_batches_of(expected)  # the same cuts; their ids are random
        assert got.drop_columns(["_mb"]).equals(expected.drop_columns(["_mb"]))
        assert sum(got["_truncated"].to_pylist()) > 0


def test_the_tokenizer_actor_never_imports_torch(default_model_path, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import pickle, sys\n"
        "import pyarrow as pa\n"
        "from pipeline import EmbedConfig\n"
        "from pipeline.stages.tokenize import TokenizeStage\n"
        "spec = pickle.load(open(sys.argv[1], 'rb'))\n"
        "stage = TokenizeStage(EmbedConfig(input='.', output='out'), spec=spec)\n"
        "out = stage(pa.table({'id': ['a'], 'text': ['Hello world'], '_valid': [True]}))\n"
        "print(out['tok_input_ids'].to_pylist(), 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    _, model, prompt = _loaded(default_model_path)
    import pickle

    with open(tmp_path / "spec", "wb") as f:
        pickle.dump(spec_for(model, prompt), f)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "spec")], capture_output=True, text=True,
                          env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = model.preprocess(["Hello world"])["input_ids"].tolist()
    assert proc.stdout.strip() == f"{expected} False False"


def test_sample_corpus_in_one_call_matches(default_model_path):
    """Nothing depends on batching: the whole sample corpus at once, as one block of an actor."""
    _, model, prompt = _loaded(default_model_path)
    _assert_same_as_preprocess(model, prompt, spec_for(model, prompt), sample_texts())
