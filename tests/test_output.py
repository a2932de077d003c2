"""The output directory across runs (pipeline.storage.output): committed files from a fresh listing,
never a stale one (on S3, a moto server)."""

from __future__ import annotations

from pipeline.engine.cluster import prepare_output
from pipeline.manifest import read as read_manifest
from pipeline.storage.output import committed_files


def test_committed_files_sees_objects_written_behind_its_back(moto_s3):
    """s3fs caches listings per process; resume decisions must not use an old one."""
    bucket = moto_s3.new_bucket("cache")
    fs, root = prepare_output(f"s3://{bucket}/out", moto_s3.storage_options())
    moto_s3.client().put_object(Bucket=bucket, Key="out/first.parquet", Body=b"x")
    assert set(committed_files(fs, root)) == {"first.parquet"}  # s3fs now holds a listing of out/
    moto_s3.client().put_object(Bucket=bucket, Key="out/second.parquet", Body=b"x")
    moto_s3.client().put_object(Bucket=bucket, Key="out/_manifest.json", Body=b'{"version": 1}')
    assert set(committed_files(fs, root)) == {"first.parquet", "second.parquet"}
    assert read_manifest(fs, root)["version"] == 1  # read from storage, not from a listing
