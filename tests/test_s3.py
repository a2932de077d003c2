"""s3:// input and output against a real S3 protocol (a moto server on 127.0.0.1), through the CLI.

The expensive CLI runs are module fixtures; each test asserts one behaviour of
one run. Credentials come either as AWS users set them (AWS_* variables) or
as `--storage-options` with no AWS_* variable at all.
"""

from __future__ import annotations

import io
import json
import os
import time

import pyarrow.parquet as pq
import pytest

from pipeline import build_config, read_embeddings
from pipeline.errors import InputError
from pipeline.engine.cluster import prepare_output
from pipeline.storage.output import committed_files
from tests.conftest import (
    kill_cli_when,
    REPO, assert_one_line_error, cli, cli_env, objects, read_object, sample_texts, start_moto_server,
    stop_moto_server,
)

SECRET = "embedpipe-SECRET-4f9c2e7d1b"  # distinctive, so any leak is found by a plain substring search
KEY_ID = "EMBEDPIPEKEYID7X3Q"


# --------------------------------------------------------------------------- helpers


def upload_shards(s3, bucket: str, prefix: str, shards: dict[str, int]) -> list[str]:
    """One .txt object per shard with `rows` lines of real text; returns the expected ids."""
    texts = sample_texts()
    expected, start = [], 0
    for name, rows in shards.items():
        lines = [texts[(start + i) % len(texts)].replace("\n", " ") for i in range(rows)]
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body="".join(f"{t}\n" for t in lines).encode())
        expected += [f"{name}:{i}" for i in range(rows)]
        start += rows
    return expected


def is_visible(key: str) -> bool:
    """What a Parquet reader picks up: names not starting with '_' or '.' (at any level below the output)."""
    return not any(part.startswith(("_", ".")) for part in key.split("/")[1:])


def visible_parquet(s3, bucket: str, prefix: str) -> dict[str, dict]:
    return {k: o for k, o in objects(s3, bucket, prefix + "/").items() if k.endswith(".parquet") and is_visible(k)}


def manifest_on_s3(s3, bucket: str, prefix: str) -> dict:
    return json.loads(read_object(s3, bucket, f"{prefix}/_manifest.json"))


def env_without_aws(**extra: str) -> dict[str, str]:
    """A CLI environment with no AWS_* variable: credentials can only come from --storage-options."""
    return {k: v for k, v in cli_env(**extra).items() if not k.startswith("AWS_")}


def assert_every_id_once(ids: list[str], expected: list[str]) -> None:
    assert len(ids) == len(set(ids)), "an id was written more than once"
    assert sorted(ids) == sorted(expected)


# --------------------------------------------------------------------------- configured as AWS users do


@pytest.fixture(scope="module")
def env_run(moto_s3, tiny_model):
    """`embed` from s3:// to s3:// with AWS_ENDPOINT_URL and AWS_* credentials in the environment."""
    s3 = moto_s3.client()
    bucket = moto_s3.new_bucket("env")
    expected = upload_shards(s3, bucket, "in", {"a.txt": 120, "sub/b.txt": 90})
    proc = cli("embed", "--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out", "--model", tiny_model,
               env=cli_env(**moto_s3.env()))
    return proc, bucket, expected


@pytest.mark.slow  # the kill-and-resume run below is configured the same way, and runs in `make test`
def test_env_configured_run_embeds_every_id_once(moto_s3, env_run):
    proc, bucket, expected = env_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids, vectors = read_embeddings(f"s3://{bucket}/out", moto_s3.storage_options())
    assert_every_id_once(ids, expected)
    assert vectors.shape == (len(expected), 32)
    manifest = manifest_on_s3(moto_s3.client(), bucket, "out")
    assert manifest["rows"]["embedded"] == len(expected)
    assert f"s3://{bucket}/out" in proc.stdout  # the summary names the output


# --------------------------------------------------------------------------- configured by --storage-options


@pytest.fixture(scope="module")
def options_run(moto_s3, tiny_model):
    """`embed`, then `mine`, s3:// to s3://, configured only by --storage-options with a distinctive secret."""
    s3 = moto_s3.client()
    bucket = moto_s3.new_bucket("opt")
    expected = upload_shards(s3, bucket, "in", {"a.txt": 150, "b.txt": 110})
    options = json.dumps(moto_s3.storage_options(key=KEY_ID, secret=SECRET))
    env = env_without_aws()
    embed = cli("embed", "--input", f"s3://{bucket}/in", "--output", f"s3://{bucket}/out", "--model", tiny_model,
                "--storage-options", options, env=env)
    mine = cli("mine", "--embeddings", f"s3://{bucket}/out", "--output", f"s3://{bucket}/pairs", "--top-k", "3",
               "--storage-options", options, env=env)
    return embed, mine, bucket, expected


@pytest.mark.slow  # make test-all; the error tests below check secrets stay out of messages
def test_storage_options_run_embeds_every_id_once(moto_s3, options_run):
    embed, _, bucket, expected = options_run
    assert embed.returncode == 0, embed.stderr[-3000:]
    ids, _ = read_embeddings(f"s3://{bucket}/out", moto_s3.storage_options())
    assert_every_id_once(ids, expected)
    assert manifest_on_s3(moto_s3.client(), bucket, "out")["rows"]["embedded"] == len(expected)


@pytest.mark.slow  # make test-all; the error tests below check secrets stay out of messages
def test_info_reads_s3_with_storage_options(moto_s3, options_run, capsys):
    from pipeline.cli import main

    _, _, bucket, expected = options_run
    code = main(["info", f"s3://{bucket}/out", "--pairs", "2",
                 "--storage-options", json.dumps(moto_s3.storage_options(key=KEY_ID, secret=SECRET))])
    out = capsys.readouterr().out
    assert code == 0 and f'"embedded": {len(expected)}' in out and "most similar pairs" in out
    assert SECRET not in out


@pytest.mark.slow  # make test-all; the error tests below check secrets stay out of messages
def test_mine_reads_and_writes_s3(moto_s3, options_run):
    _, mine, bucket, expected = options_run
    assert mine.returncode == 0, mine.stderr[-3000:]
    s3 = moto_s3.client()
    pairs = pq.read_table(io.BytesIO(read_object(s3, bucket, "pairs/pairs.parquet")))
    assert 0 < pairs.num_rows <= len(expected) * 3
    assert set(pairs["id_a"].to_pylist()) | set(pairs["id_b"].to_pylist()) <= set(expected)
    assert manifest_on_s3(s3, bucket, "pairs")["documents"] == len(expected)


@pytest.mark.slow  # make test-all; the error tests below check secrets stay out of messages
def test_credentials_never_printed_or_written(moto_s3, options_run):
    embed, mine, bucket, _ = options_run
    assert embed.returncode == 0 and mine.returncode == 0, (embed.stderr + mine.stderr)[-3000:]
    printed = embed.stdout + embed.stderr + mine.stdout + mine.stderr
    assert SECRET not in printed and KEY_ID not in printed
    s3 = moto_s3.client()
    written = objects(s3, bucket)
    assert any(k.endswith("_manifest.json") for k in written) and any(k.startswith("pairs/") for k in written)
    for key in written:
        data = read_object(s3, bucket, key)
        assert SECRET.encode() not in data and KEY_ID.encode() not in data, key


# --------------------------------------------------------------------------- kill and resume


@pytest.fixture(scope="module")
def killed_and_resumed(moto_s3, tiny_model):
    """Crash an S3 run once some of its files are committed, then run the same command again.

    Versioning is on, so every write of a key stays visible to the checks,
    even one overwritten later.
    """
    s3 = moto_s3.client()
    bucket = moto_s3.new_bucket("kill")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    shards = {f"part-{i}.txt": 100 for i in range(8)}
    expected = upload_shards(s3, bucket, "in", shards)
    rows_per_file = 10
    total_files = sum(-(-rows // rows_per_file) for rows in shards.values())
    args = ["embed", "--input", f"s3://{bucket}/in", "--output", f"s3://{bucket}/out", "--model", tiny_model,
            "--rows-per-file", str(rows_per_file), "--quiet"]
    env = cli_env(**moto_s3.env())
    killed = kill_cli_when(args, lambda: len(visible_parquet(s3, bucket, "out")) >= 1, env=env, poll=0.02)
    at_kill = visible_parquet(s3, bucket, "out")
    time.sleep(2)
    after_pause = visible_parquet(s3, bucket, "out")
    versions_at_kill = _versions(s3, bucket, "out/")
    rerun = cli(*args, env=env)
    return {
        "bucket": bucket, "expected": expected, "killed": killed, "at_kill": at_kill, "after_pause": after_pause,
        "versions_at_kill": versions_at_kill, "total_files": total_files, "rerun": rerun,
    }


def _versions(s3, bucket: str, prefix: str) -> list[dict]:
    out = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        out += page.get("Versions", [])
    return out


@pytest.mark.slow  # make test-all; test_reliability kills and resumes a local run in make test
def test_kill_came_while_files_were_being_committed(killed_and_resumed):
    run = killed_and_resumed
    assert run["killed"], "the run finished before it could be killed"
    assert 1 <= len(run["at_kill"]) < run["total_files"], "the kill did not fall between the first and last commit"
    assert run["after_pause"] == run["at_kill"], "objects kept being written after the process group was killed"


@pytest.mark.slow  # make test-all; test_reliability kills and resumes a local run in make test
def test_nothing_half_written_was_ever_visible(moto_s3, killed_and_resumed):
    run = killed_and_resumed
    s3 = moto_s3.client()
    for when in ("versions_at_kill", None):
        versions = run[when] if when else _versions(s3, run["bucket"], "out/")
        seen = [v for v in versions if v["Key"].endswith(".parquet") and is_visible(v["Key"])]
        assert seen
        for v in seen:  # every version a reader could ever have listed is a whole Parquet file
            table = pq.read_table(io.BytesIO(read_object(s3, run["bucket"], v["Key"], v["VersionId"])))
            assert table.num_rows > 0 and table.column_names[:2] == ["id", "embedding"]


@pytest.mark.slow  # make test-all; test_reliability kills and resumes a local run in make test
def test_resume_embeds_every_id_once(moto_s3, killed_and_resumed):
    run = killed_and_resumed
    assert run["rerun"].returncode == 0, run["rerun"].stderr[-3000:]
    ids, _ = read_embeddings(f"s3://{run['bucket']}/out", moto_s3.storage_options())
    assert_every_id_once(ids, run["expected"])
    assert len(visible_parquet(moto_s3.client(), run["bucket"], "out")) == run["total_files"]
    assert manifest_on_s3(moto_s3.client(), run["bucket"], "out")["rows"]["embedded"] == len(run["expected"])


@pytest.mark.slow  # make test-all; test_reliability kills and resumes a local run in make test
def test_resume_leaves_committed_objects_untouched(moto_s3, killed_and_resumed):
    run = killed_and_resumed
    assert run["rerun"].returncode == 0, run["rerun"].stderr[-3000:]
    s3 = moto_s3.client()
    now = visible_parquet(s3, run["bucket"], "out")
    versions = _versions(s3, run["bucket"], "out/")
    for key, before in run["at_kill"].items():
        assert (now[key]["ETag"], now[key]["LastModified"]) == (before["ETag"], before["LastModified"]), key
        assert len([v for v in versions if v["Key"] == key]) == 1, f"{key} was written again"


# --------------------------------------------------------------------------- missing bucket, wrong credentials


@pytest.mark.parametrize("side", ["output", "input"])
def test_missing_bucket_exits_2_naming_it(moto_s3, tmp_path, tiny_model, side):
    (tmp_path / "a.txt").write_text("hello\n")
    missing = f"no-such-bucket-{side}"
    paths = {"input": str(tmp_path / "a.txt"), "output": str(tmp_path / "out")}
    paths[side] = f"s3://{missing}/x"
    options = json.dumps(moto_s3.storage_options(key=KEY_ID, secret=SECRET))
    proc = cli("embed", "--input", paths["input"], "--output", paths["output"], "--model", tiny_model,
               "--storage-options", options, env=env_without_aws())
    assert_one_line_error(proc, 2, f"--{side} s3://{missing}/x: bucket '{missing}' does not exist")
    assert SECRET not in proc.stderr + proc.stdout
    assert missing not in [b["Name"] for b in moto_s3.client().list_buckets()["Buckets"]], "a bucket was created"


@pytest.fixture(scope="module")
def moto_s3_auth():
    """A private moto server that checks signatures and IAM policies, with one user allowed everything.

    Its own server, so turning authentication on cannot disturb the shared one.
    """
    proc, server = start_moto_server()
    try:
        iam = server.client("iam")
        iam.create_user(UserName="embedder")
        key = iam.create_access_key(UserName="embedder")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="embedder", PolicyName="all", PolicyDocument=json.dumps(policy))
        server.key, server.secret = key["AccessKeyId"], key["SecretAccessKey"]
        server.client().create_bucket(Bucket="guarded")
        server.client().put_object(Bucket="guarded", Key="in/a.txt", Body=b"hello\nworld\n")
        server.set_auth(True)
        yield server
    finally:
        stop_moto_server(proc)


def test_wrong_secret_exits_2_naming_the_bucket(moto_s3_auth, tmp_path, tiny_model):
    server = moto_s3_auth
    assert "Contents" in server.client().list_objects_v2(Bucket="guarded")  # the right credentials work
    env = cli_env(**server.env(AWS_SECRET_ACCESS_KEY=SECRET))
    proc = cli("embed", "--input", "s3://guarded/in", "--output", str(tmp_path / "out"), "--model", tiny_model, env=env)
    assert_one_line_error(proc, 2, "--input s3://guarded/in: access to bucket 'guarded' denied")
    assert "check the credentials" in proc.stderr and SECRET not in proc.stderr + proc.stdout


def test_unknown_access_key_is_refused_for_output(moto_s3_auth):
    server = moto_s3_auth
    options = server.storage_options(key="AKIAUNKNOWNKEY000000", secret=SECRET)
    with pytest.raises(InputError, match="--output s3://guarded/out: access to bucket 'guarded' denied") as info:
        prepare_output("s3://guarded/out", options)
    assert SECRET not in str(info.value)


def test_right_credentials_pass_the_check(moto_s3_auth):
    server = moto_s3_auth
    fs, root = prepare_output("s3://guarded/out", server.storage_options())
    assert root == "guarded/out" and committed_files(fs, root) == {}


# --------------------------------------------------------------------------- configs/s3.yaml


def test_s3_config_loads_and_holds_no_secrets():
    import yaml

    path = os.path.join(REPO, "configs", "s3.yaml")
    config = build_config(path)
    assert config.input.startswith("s3://") and config.output.startswith("s3://")
    assert dict(config.storage_options) == {}
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f)
    assert not {"storage_options", "key", "secret", "token"} & set(values)


# --------------------------------------------------------------------------- precision on S3


@pytest.mark.slow  # make test-all; tests/test_precision.py checks every precision locally in make test
def test_uint8_ranges_sampled_from_s3_shards_and_read_from_an_s3_output(moto_s3, tiny_model):
    """The calibration reads its rows from s3:// shards; a second run takes those ranges from the first
    output on S3 (--calibration s3://...); readers and quantize_queries dequantise and quantise there."""
    import numpy as np

    from pipeline import quantize_queries

    s3 = moto_s3.client()
    bucket = moto_s3.new_bucket("prec")
    expected = upload_shards(s3, bucket, "in", {"a.txt": 80, "b.txt": 60})
    env = cli_env(**moto_s3.env())
    first = cli("embed", "--input", f"s3://{bucket}/in", "--output", f"s3://{bucket}/u8", "--model", tiny_model,
                "--precision", "uint8", "--truncate-dim", "16", "--calibration-rows", "40", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = manifest_on_s3(s3, bucket, "u8")
    q = manifest["quantization"]
    assert q["source"]["from"] == "rows" and q["source"]["rows"] == 40 and q["source"]["shards"] == 2
    assert manifest["dim"] == 16 and manifest["bytes_per_vector"] == 16
    options = moto_s3.storage_options()
    ids, stored = read_embeddings(f"s3://{bucket}/u8", options)
    assert_every_id_once(ids, expected)
    assert stored.dtype == np.uint8 and stored.shape == (len(expected), 16)
    _, floats = read_embeddings(f"s3://{bucket}/u8", options, dequantize=True)
    assert floats.dtype == np.float32
    assert np.array_equal(quantize_queries(floats, f"s3://{bucket}/u8", options), stored)  # centres stay in their buckets
    second = cli("embed", "--input", f"s3://{bucket}/in", "--output", f"s3://{bucket}/again", "--model", tiny_model,
                 "--precision", "uint8", "--truncate-dim", "16", "--calibration", f"s3://{bucket}/u8", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    again = manifest_on_s3(s3, bucket, "again")["quantization"]
    assert again["ranges"] == q["ranges"] and again["source"] == {"from": "file", "path": f"s3://{bucket}/u8"}
    assert np.array_equal(read_embeddings(f"s3://{bucket}/again", options)[1], stored)
