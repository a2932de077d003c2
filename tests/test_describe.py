"""The driver's model description, computed by a child process (pipeline.models.describe)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from pipeline import EmbedConfig
from pipeline.models.describe import ModelFacts, model_facts
from pipeline.errors import UsageError
from tests.conftest import cli_env, make_st_dir


@pytest.fixture(scope="module")
def prompted_model(tmp_path_factory, tiny_bert_dir):
    return make_st_dir(tiny_bert_dir, str(tmp_path_factory.mktemp("m") / "st"), pooling="cls", normalize=True,
                       max_seq_length=48, prompts={"query": "query: "})


def test_the_child_describes_the_model_as_a_load_in_process_does(prompted_model, tmp_path):
    config = EmbedConfig(input=str(tmp_path), output=str(tmp_path / "out"), model=prompted_model, prompt_name="query")
    info, vectors, spec = ModelFacts(config, child=True, cached=False).result()
    assert (info, vectors, spec) == model_facts(config) == ModelFacts(config, child=False, cached=False).result()
    assert spec is not None and spec.prompt == "query: " and spec.max_len == 48
    assert (info.pooling, info.normalize, info.max_seq_length, info.prompt) == ("cls", True, 48, "query: ")
    assert vectors == {"kind": "dense", "dim": 32, "model_truncate_dim": None}  # the tiny BERT, cls pooling


def test_an_option_the_model_refuses_comes_back_from_the_child_as_the_same_error(prompted_model, tmp_path):
    config = EmbedConfig(input=str(tmp_path), output=str(tmp_path / "out"), model=prompted_model, prompt_name="nope")
    for child in (True, False, False):  # the third: an error is not cached (a thread reads the same cache; no third child)
        with pytest.raises(UsageError, match=r"^--prompt-name 'nope': the model has prompts \['document', 'query'\]$"):
            ModelFacts(config, child=child).result()


def test_a_script_without_a_main_guard_is_not_run_again_by_the_child(prompted_model, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "from pipeline import EmbedConfig\n"
        "from pipeline.models.describe import ModelFacts\n"
        "print('script ran', flush=True)\n"
        f"info, _, _ = ModelFacts(EmbedConfig(input='.', output='out', model={prompted_model!r})).result()\n"
        "print('pooling', info.pooling)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=cli_env(), timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["script ran", "pooling cls"]


def test_a_description_is_cached_until_the_model_or_an_option_changes(prompted_model, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))
    model = str(tmp_path / "model")
    shutil.copytree(prompted_model, model)
    config = EmbedConfig(input=str(tmp_path), output=str(tmp_path / "out"), model=model, prompt_name="query")
    first = ModelFacts(config, child=True)
    assert not first.from_cache
    expected = first.result()
    again = ModelFacts(config)
    assert again.from_cache and again._child is None and again._thread is None  # nothing started
    assert again.result() == expected
    assert expected[2] is not None and expected[2].fields == (("input_ids", "ids"), ("token_type_ids", "type_ids"))

    other = ModelFacts(dataclasses.replace(config, prompt="passage: "))  # another option: described anew
    assert not other.from_cache and other.result()[0].prompt == "passage: "

    settings = os.path.join(model, "sentence_bert_config.json")  # the model directory changes
    with open(settings) as f:
        saved = json.load(f)
    with open(settings, "w") as f:
        json.dump({**saved, "max_seq_length": 40}, f)
    changed = ModelFacts(config)
    assert not changed.from_cache
    info = changed.result()[0]
    assert info.max_seq_length == 40 and info.fingerprint != expected[0].fingerprint
    assert ModelFacts(config).from_cache


def test_a_damaged_cache_entry_is_described_again(prompted_model, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))
    config = EmbedConfig(input=str(tmp_path), output=str(tmp_path / "out"), model=prompted_model)
    expected = ModelFacts(config, child=False).result()
    (entry,) = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "cache") for f in files]
    with open(entry, "w") as f:
        f.write('{"info": {"name": "trunc')
    facts = ModelFacts(config, child=False)
    assert not facts.from_cache and facts.result() == expected
