"""Output checks (`prepare_output`, `check_bucket`) and atomic writes (pipeline.storage.filesystems):
locally, on places that really fail for root, and on S3 (a moto server).

Tests run as root, for whom `os.access` says "writable" almost everywhere;
the checks must prove writability by writing, so the failing places used
here are ones where even root cannot create a file: /proc, and a path
under a regular file.
"""

from __future__ import annotations

import os
import posixpath

import pytest

from pipeline.errors import InputError
from pipeline.engine.cluster import prepare_output
from pipeline.storage.filesystems import check_bucket, get_fs, write_bytes_atomic
from tests.conftest import assert_one_line_error, cli, objects, read_object


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


# --------------------------------------------------------------------------- on S3 (in process)


def test_output_that_is_an_object_is_refused_and_kept(moto_s3):
    bucket = moto_s3.new_bucket("isfile")
    moto_s3.client().put_object(Bucket=bucket, Key="out", Body=b"I am an object")
    with pytest.raises(InputError, match=f"--output s3://{bucket}/out: is a file, expected a directory"):
        prepare_output(f"s3://{bucket}/out", moto_s3.storage_options())
    assert read_object(moto_s3.client(), bucket, "out") == b"I am an object"


def test_atomic_write_leaves_only_the_final_object(moto_s3):
    bucket = moto_s3.new_bucket("atomic")
    fs, root = get_fs(f"s3://{bucket}/out", moto_s3.storage_options())
    write_bytes_atomic(fs, posixpath.join(root, "f.parquet"), b"payload")
    assert list(objects(moto_s3.client(), bucket)) == ["out/f.parquet"]
    assert read_object(moto_s3.client(), bucket, "out/f.parquet") == b"payload"


def test_check_bucket_ignores_local_paths(tmp_path, monkeypatch):
    """A local path passes unchecked and makes no S3 call; the same tripwire on the two entry
    points every S3 request goes through (botocore and aiobotocore, which s3fs uses) does
    catch the call an s3:// path makes, so it would catch one made for a local path."""
    import aiobotocore.client
    import botocore.client

    calls: list[str] = []

    class Tripwire(Exception):
        pass

    def sync_call(self, operation, params):
        calls.append(operation)
        raise Tripwire(operation)

    async def async_call(self, operation, params):
        calls.append(operation)
        raise Tripwire(operation)

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", sync_call)
    monkeypatch.setattr(aiobotocore.client.AioBaseClient, "_make_api_call", async_call)
    for path in (str(tmp_path), str(tmp_path / "missing" / "*.txt")):
        fs, root = get_fs(path)
        assert check_bucket(fs, root, "--output x") is None
    assert calls == []
    # the control: an s3:// path reaches the tripwire (nothing listens on the endpoint)
    fs, root = get_fs("s3://no-such-bucket/out", {"anon": True, "endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(Tripwire):
        check_bucket(fs, root, "--output s3://no-such-bucket/out")
    assert calls == ["ListObjectsV2"]


@pytest.mark.parametrize("code, said", [
    (28, "no space left on device writing {path}: free space, then rerun to resume"),  # ENOSPC
    (30, "read-only file system writing {path}: make the output writable, then rerun to resume"),  # EROFS
    (13, "permission denied writing {path}: fix the output's permissions (on S3: the credentials' right to write)"),
    (5, "input/output error writing {path}: then rerun to resume"),  # EIO: named as the OS names it
])
def test_a_write_that_cannot_heal_is_one_pipeline_error_naming_it(tmp_path, monkeypatch, code, said):
    from pipeline.errors import PipelineError
    from pipeline.storage import filesystems

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(filesystems, "_write_atomic", fail)
    fs, root = get_fs(str(tmp_path))
    path = f"{root}/x.parquet"
    with pytest.raises(PipelineError) as raised:
        write_bytes_atomic(fs, path, b"x")
    assert str(raised.value).startswith(said.format(path=path))


def test_an_s3_write_denied_mid_run_names_the_object(moto_s3, monkeypatch):
    from pipeline.errors import PipelineError

    bucket = moto_s3.new_bucket("denied")
    fs, root = get_fs(f"s3://{bucket}/out", moto_s3.storage_options())

    def denied(*args, **kwargs):
        raise PermissionError("Access Denied")

    monkeypatch.setattr(fs, "pipe_file", denied)
    with pytest.raises(PipelineError, match=rf"^permission denied writing s3://{bucket}/out/x.parquet: fix"):
        write_bytes_atomic(fs, f"{root}/x.parquet", b"x")
