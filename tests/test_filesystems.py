"""Local output checks (`prepare_output`) and atomic writes, on places that really fail for root.

Tests run as root, for whom `os.access` says "writable" almost everywhere;
the checks must prove writability by writing, so the failing places used
here are ones where even root cannot create a file: /proc, and a path
under a regular file.
"""

from __future__ import annotations

import os

import pytest

from pipeline.errors import InputError
from pipeline.engine.cluster import prepare_output
from pipeline.storage.filesystems import get_fs, write_bytes_atomic
from tests.conftest import assert_one_line_error, cli


def embed_to(tmp_path, output: str):
    (tmp_path / "a.txt").write_text("hello\n")
    return cli("embed", "--input", str(tmp_path / "a.txt"), "--output", output)


def test_output_under_a_regular_file_exits_2_and_keeps_the_file(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    proc = embed_to(tmp_path, str(blocker / "vectors"))
    assert_one_line_error(proc, 2, f"--output {blocker / 'vectors'}: {blocker} is a file, expected a directory")
    assert blocker.read_text() == "keep me"


def test_output_where_root_cannot_write_exits_2(tmp_path):
    assert os.access("/proc", os.W_OK)  # why os.access is not enough: it says yes
    proc = embed_to(tmp_path, "/proc")
    assert_one_line_error(proc, 2, "--output /proc: not writable")


def test_output_that_cannot_be_created_is_refused():
    with pytest.raises(InputError, match="--output /proc/embedpipe-out: cannot create the directory"):
        prepare_output("/proc/embedpipe-out")


def test_output_that_is_a_file_is_refused_and_kept(tmp_path):
    target = tmp_path / "out"
    target.write_text("I am a file")
    with pytest.raises(InputError, match="is a file, expected a directory"):
        prepare_output(str(target))
    assert target.read_text() == "I am a file"


def test_existing_output_is_kept_and_the_probe_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.parquet").write_bytes(b"old")
    (out / "_manifest.json").write_text("{}")
    fs, root = prepare_output(str(out))
    assert root == str(out)
    assert sorted(os.listdir(out)) == ["_manifest.json", "a.parquet"]
    assert (out / "a.parquet").read_bytes() == b"old"


def test_missing_output_directories_are_created(tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    prepare_output(str(out) + "/")
    assert out.is_dir() and os.listdir(out) == []


def test_atomic_local_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    fs, root = get_fs(str(tmp_path))
    path = os.path.join(root, "sub", "f.parquet")
    write_bytes_atomic(fs, path, b"first")
    write_bytes_atomic(fs, path, b"second")
    assert open(path, "rb").read() == b"second"
    assert os.listdir(tmp_path / "sub") == ["f.parquet"]
