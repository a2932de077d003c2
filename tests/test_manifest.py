"""pipeline.manifest: one writer and one reader for every output kind; version-1 manifests still read."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.config import EmbedConfig, MineConfig
from pipeline.errors import InputError
from pipeline.manifest import COMMON_KEYS, FORMAT_VERSION, KEYS, build, read, read_required, reference_markdown, write
from pipeline.storage.filesystems import get_fs
from tests.conftest import REPO

LEGACY = os.path.join(REPO, "tests", "fixtures", "legacy_output")


def test_every_kind_has_the_common_sections_and_round_trips(tmp_path):
    fs, root = get_fs(str(tmp_path))
    pairs = build("pairs", rows={"documents": 3, "pairs": 1}, files=[{"file": "pairs.parquet", "rows": 1}],
                  config=MineConfig(embeddings="e", output="o", storage_options={"key": "secret"}),
                  started=0.0, finished=1.5, top_k=2, score="cosine")
    assert list(pairs)[:7] == ["kind", "format", "format_version", "version", "model", "rows", "files"]
    assert pairs["kind"] == "pairs" and pairs["format"] == "embedpipe/pairs" and pairs["format_version"] == FORMAT_VERSION
    assert pairs["model"] is None and pairs["timings"]["seconds"] == 1.5
    assert pairs["config"]["top_k"] == 100 and "storage_options" not in pairs["config"]
    assert "secret" not in json.dumps(pairs) and pairs["versions"]["embedpipe"]
    write(fs, root, pairs)
    assert read(fs, root) == pairs
    assert set(COMMON_KEYS) <= set(pairs)


def test_a_key_that_the_reference_does_not_document_is_refused():
    with pytest.raises(AssertionError, match="undocumented manifest keys for dense: \\['surprise'\\]"):
        build("dense", rows={}, files=[], config=EmbedConfig(input="i", output="o"), started=0, finished=0, surprise=1)


def test_manifests_written_before_kind_and_format_version_are_read_in_todays_shape(tmp_path):
    fs, _ = get_fs(LEGACY)
    dense = read(fs, LEGACY)  # a real one, written by embedpipe at 557bfa5
    assert "format_version" not in json.loads(open(os.path.join(LEGACY, "_manifest.json")).read())
    assert dense["kind"] == "dense" and dense["format_version"] == 1 and dense["rows"]["embedded"] == 5
    old_pairs = {"format": "embedpipe/pairs", "version": 1, "documents": 9, "pairs": 4, "top_k": 100}
    old_reranked = {"format": "embedpipe/reranked-pairs", "version": 1, "counts": {"pairs_in": 4, "reranked": 4}}
    for name, data in (("p", old_pairs), ("r", old_reranked)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "_manifest.json").write_text(json.dumps(data))
    assert read(fs, str(tmp_path / "p"))["kind"] == "pairs"
    assert read(fs, str(tmp_path / "p"))["rows"] == {"documents": 9, "pairs": 4}
    assert read(fs, str(tmp_path / "r"))["rows"] == {"pairs_in": 4, "reranked": 4}
    assert read(fs, str(tmp_path / "r"))["kind"] == "reranked"


def test_missing_unreadable_and_wrong_kind(tmp_path, caplog):
    fs, root = get_fs(str(tmp_path))
    assert read(fs, root) is None
    with pytest.raises(InputError, match="no _manifest.json"):
        read_required(fs, root, "out")
    (tmp_path / "_manifest.json").write_text("{not json")
    assert read(fs, root) is None and "ignoring unreadable" in caplog.text
    (tmp_path / "_manifest.json").write_text(json.dumps({"format": "embedpipe/pairs", "version": 1}))
    with pytest.raises(InputError, match="out: holds pairs output, expected dense or sparse"):
        read_required(fs, root, "out", kinds=("dense", "sparse"))


def test_the_reference_lists_every_key_of_every_kind():
    page = reference_markdown()
    for key in [*COMMON_KEYS, *(k for keys in KEYS.values() for k in keys)]:
        assert f"| `{key}` |" in page
