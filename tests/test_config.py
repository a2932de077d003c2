"""Config: defaults <- YAML <- flags, validated once with the flag named; the CLI's flags, their help
and docs/reference.md generated from the config fields."""

from __future__ import annotations

import argparse
import glob
import os
import re
from dataclasses import fields

import pytest
import yaml

from pipeline.cli import _load_config, build_parser
from pipeline.config import (
    CONFIGS, FIELD_GROUPS, GROUPS, EmbedConfig, build_config, build_mine_config, load_yaml, options,
)
from pipeline.errors import UsageError
from pipeline.reference import reference_markdown
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
        ({"precision": "int4"}, "--precision must be one of float32, float16, int8, uint8, binary, ubinary"),
        ({"precision": "binary", "calibration_rows": 100}, "--calibration-rows: only --precision int8 or uint8"),
        ({"precision": "int8", "calibration_rows": 10, "calibration": "r.npy"}, "give one"),
        ({"output_dtype": "int8"}, "--output-dtype must be one of float32, float16"),
        ({"output_dtype": "float16", "precision": "binary"}, "--output-dtype is the old name of --precision"),
        ({"truncate_dim": 0}, "--truncate-dim must be a positive integer"),
        ({"role": "passage"}, "--role must be one of query, document"),
    ],
)
def test_invalid_values_name_the_flag(options, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        build_config(None, input="a", output="b", **options)


def test_output_dtype_is_the_deprecated_name_of_precision(caplog, tmp_path):
    config = build_config(None, input="a", output="b", output_dtype="float16")
    assert config.precision == "float16" and config.output_dtype is None
    assert "--output-dtype is deprecated" in caplog.text
    assert build_config(None, input="a", output="b").precision == "float32"
    old = tmp_path / "old.yaml"
    old.write_text("output_dtype: float16\n")
    assert build_config(str(old), input="a", output="b", precision="int8").precision == "int8"  # the flag wins
    assert build_config(str(old), input="a", output="b").precision == "float16"


def test_shipped_configs_load(tmp_path):
    not_embed = {"mine.yaml", "runtime_env.yaml", "rerank.yaml", "search.yaml"}  # test_configs_infra.py, test_rerank.py, test_search.py
    paths = [p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")) if os.path.basename(p) not in not_embed]
    assert len(paths) >= 3
    for path in paths:
        with open(path, encoding="utf-8") as f:
            written = yaml.safe_load(f)
        config = build_config(path, input="x", output="y")
        assert (config.input, config.output) == ("x", "y"), path  # the flags win over the file
        for option in options(EmbedConfig):
            if option.name in ("input", "output"):
                continue
            if option.name in written:  # the file wins over the defaults
                value = written[option.name]
                assert getattr(config, option.name) == (tuple(value) if option.kind == "list" else value), (path, option.name)
            else:
                assert getattr(config, option.name) == option.default, (path, option.name)


def test_one_yaml_file_with_sections_configures_embed_and_mine(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("embed:\n  input: docs\n  output: vecs\n  keep_columns: title, url\n  mine: true\n"
                    "mine:\n  embeddings: vecs\n  output: pairs\n  top-k: 7\n  threshold: 0.8\n")
    embed = build_config(str(path), rows_per_file=10)
    assert (embed.input, embed.output, embed.keep_columns, embed.mine, embed.rows_per_file) == (
        "docs", "vecs", ("title", "url"), True, 10)
    mine = build_mine_config(str(path), max_pairs=9)
    assert (mine.embeddings, mine.output, mine.top_k, mine.threshold, mine.max_pairs) == ("vecs", "pairs", 7, 0.8, 9)


def test_unknown_yaml_keys_in_a_file_of_sections_are_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("embed:\n  input: a\n  output: b\n  batch: 3\nmine:\n  embeddings: b\n  output: c\n")
    with pytest.raises(UsageError, match="unknown key 'batch'"):
        build_config(str(path))
    assert build_mine_config(str(path)).output == "c"  # the mine: section is fine
    path.write_text("embed:\n  input: a\n  output: b\nbogus: 1\n")
    with pytest.raises(UsageError, match="unknown key 'bogus'"):
        build_config(str(path))


def test_embed_builds_the_mine_and_the_rerank_it_runs_after_embedding():
    config = build_config(None, input="docs", output="s3://b/vecs/", mine=True, mine_top_k=5, mine_threshold=0.5,
                          rerank_model="ce", rerank_top=10, text_field="body", device="cpu", quiet=True,
                          storage_options={"anon": True})
    mine = config.mine_config()
    assert (mine.embeddings, mine.output, mine.top_k, mine.max_pairs, mine.threshold, mine.texts, mine.quiet) == (
        "s3://b/vecs/", "s3://b/vecs-pairs", 5, 500_000, 0.5, "docs", True)
    assert mine.storage_options == {"anon": True}
    rerank = config.rerank_config()
    assert (rerank.pairs, rerank.texts, rerank.model, rerank.output, rerank.top) == (
        "s3://b/vecs-pairs", "docs", "ce", "s3://b/vecs-pairs-reranked", 10)
    assert (rerank.text_field, rerank.device, rerank.overwrite, rerank.storage_options) == ("body", "cpu", True, {"anon": True})
    assert build_config(None, input="a", output="b", mine=True).rerank_config() is None
    with pytest.raises(UsageError, match="--mine-threshold must be a cosine between -1 and 1, got 2"):
        build_config(None, input="a", output="b", mine=True, mine_threshold=2)


# --------------------------------------------------------------------------- flags and docs from the fields


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return capsys.readouterr().out


def _groups_of_flags(help_text: str) -> dict[str, str]:
    """{flag (or ARGUMENT): the argument group --help shows it under}."""
    found, group = {}, None
    for line in help_text.splitlines():
        heading = re.fullmatch(r"(\w[\w ]*):", line)
        if heading:
            group = heading.group(1)
        for flag in re.findall(r"^  (--[\w-]+|[A-Z][A-Z_]*\b)", line):
            found[flag] = group
    return found


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_help_lists_every_field_with_its_help_default_and_group(capsys, command):
    text = _help(capsys, command)
    squeezed = re.sub(r"\s+", "", text)  # argparse wraps lines, at hyphens too
    groups = _groups_of_flags(text)
    for option in options(CONFIGS[command]):
        assert groups.get(option.flag) == option.group, option.flag
        if option.kind == "boolean" and option.default is None:
            assert groups.get("--no-" + option.flag[2:]) == option.group
        help_text = re.sub(r"\s+", "", option.help)  # the docstring, then (default: X) or (required)
        assert re.search(re.escape(option.flag) + r"[A-Z_,.]*" + re.escape(help_text), squeezed), option.flag
        assert option.doc and (option.shown_default is None or option.shown_default in option.help)
    if command == "embed":
        assert "--rows-per-fileROWS_PER_FILELargestnumberofrowsinoneoutputfile:abiggershardiswrittenasseveral" \
               "files,smallshardsarepackedtogether(docs/usage.md#many-small-files).Withchunk_tokensitcounts" \
               "documents:afileholdsitsdocuments'chunks.(default:50000)" in squeezed
        assert "--inputINPUTFile,directory,globors3://URIofthedocuments.(required)" in squeezed
        assert "--normalizeL2-normalisethevectors;defaultfollowsthemodel(itsNormalizemodule).--no-normalize" in squeezed


@pytest.mark.parametrize("cls", list(CONFIGS.values()), ids=list(CONFIGS))
def test_every_field_is_in_one_known_group(cls):
    names = [name for members in FIELD_GROUPS[cls].values() for name in members]
    assert sorted(names) == sorted(f.name for f in fields(cls))
    assert set(FIELD_GROUPS[cls]) <= set(GROUPS)


def test_every_option_of_every_subcommand_has_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"embed", "mine", "rerank", "search", "info"}
    for name, sub in [("", parser), *commands.items()]:
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help and len(action.help) > 10, f"embedpipe {name} {action.option_strings or action.dest}"


def test_flags_parse_into_the_config_and_flags_not_given_leave_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: a\noutput: b\nnormalize: false\noverwrite: true\nkeep_columns: [x]\nstall_timeout: 60\n")
    args = build_parser().parse_args(["embed", "--config", str(path), "--keep-columns", "t, u", "--rows-per-file", "7",
                                      "--storage-options", '{"anon": true}'])
    config = _load_config(args)
    assert (config.normalize, config.overwrite, config.keep_columns, config.rows_per_file, config.stall_timeout) == (
        False, True, ("t", "u"), 7, 60)
    assert dict(config.storage_options) == {"anon": True}
    assert _load_config(build_parser().parse_args(["embed", "--config", str(path), "--normalize"])).normalize is True
    args = build_parser().parse_args(["embed", "--input", "a", "--output", "b", "--storage-options", "[1]"])
    with pytest.raises(UsageError, match="--storage-options must be a JSON object"):
        _load_config(args)


def test_reference_doc_is_what_make_docs_generates():
    with open(os.path.join(REPO, "docs", "reference.md"), encoding="utf-8") as f:
        written = f.read()
    assert written == reference_markdown(), "docs/reference.md is stale: run `make docs`"
    for command, cls in CONFIGS.items():
        section = written.split(f"## `embedpipe {command}`")[1].split("\n## ")[0]
        for option in options(cls):
            assert f"| `{option.flag}`" in section and f"| `{option.name}` |" in section, (command, option.name)
    assert "## Manifest keys" in written
