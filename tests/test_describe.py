"""The driver's model description, computed by a child process (pipeline.describe)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import EmbedConfig
from pipeline.describe import ModelFacts, model_facts
from pipeline.errors import UsageError
from tests.conftest import cli_env, make_st_dir


@pytest.fixture(scope="module")
def prompted_model(tmp_path_factory, tiny_bert_dir):
    return make_st_dir(tiny_bert_dir, str(tmp_path_factory.mktemp("m") / "st"), pooling="cls", normalize=True,
                       max_seq_length=48, prompts={"query": "query: "})


def test_the_child_describes_the_model_as_a_load_in_process_does(prompted_model, tmp_path):
    config = EmbedConfig(input=str(tmp_path), output=str(tmp_path / "out"), model=prompted_model, prompt_name="query")
    info, vectors, spec = ModelFacts(config, child=True).result()
    assert (info, vectors, spec) == model_facts(config) == ModelFacts(config, child=False).result()
    assert spec is not None and spec.prompt == "query: " and spec.max_len == 48
    assert (info.pooling, info.normalize, info.max_seq_length, info.prompt) == ("cls", True, 48, "query: ")
    assert vectors == {"kind": "dense"}


def test_an_option_the_model_refuses_comes_back_from_the_child_as_the_same_error(prompted_model, tmp_path):
    config = EmbedConfig(input=str(tmp_path), output=str(tmp_path / "out"), model=prompted_model, prompt_name="nope")
    for child in (True, False):
        with pytest.raises(UsageError, match=r"^--prompt-name 'nope': the model has prompts \['document', 'query'\]$"):
            ModelFacts(config, child=child).result()


def test_a_script_without_a_main_guard_is_not_run_again_by_the_child(prompted_model, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "from pipeline import EmbedConfig\n"
        "from pipeline.describe import ModelFacts\n"
        "print('script ran', flush=True)\n"
        f"info, _, _ = ModelFacts(EmbedConfig(input='.', output='out', model={prompted_model!r})).result()\n"
        "print('pooling', info.pooling)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=cli_env(), timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["script ran", "pooling cls"]
