"""Config: defaults <- YAML <- flags, validated once with the flag named."""

from __future__ import annotations

import glob
import os

import pytest

from pipeline.config import build_config, load_yaml
from pipeline.errors import UsageError
from tests.conftest import REPO


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: a\noutput: b\nmax_seq_length: 64\nkeep_columns: [x, y]\n")
    config = build_config(str(path), max_seq_length=32, output=None)
    assert (config.input, config.output, config.max_seq_length, config.keep_columns) == ("a", "b", 32, ("x", "y"))


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: a\noutput: b\nmax_seq_len: 64\n")
    with pytest.raises(UsageError, match="unknown key 'max_seq_len'"):
        load_yaml(str(path))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_seq_length": -3}, "--max-seq-length must be a positive integer, got -3"),
        ({"max_batch_tokens": 0}, "--max-batch-tokens must be a positive integer"),
        ({"pooling": "avg"}, "--pooling 'avg'"),
        ({"device": "tpu"}, "--device must be one of auto, cpu, cuda"),
        ({"keep_columns": "id"}, "--keep-columns cannot include"),
    ],
)
def test_invalid_values_name_the_flag(options, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        build_config(None, input="a", output="b", **options)


def test_shipped_configs_load(tmp_path):
    not_embed = {"mine.yaml", "runtime_env.yaml", "rerank.yaml"}  # checked in test_configs_infra.py, test_rerank.py
    paths = [p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")) if os.path.basename(p) not in not_embed]
    assert len(paths) >= 3
    for path in paths:
        build_config(path, input="x", output="y")
