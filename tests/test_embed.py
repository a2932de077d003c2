"""The whole chain on the local Ray cluster: exactly once, resume, manifest, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import EmbedConfig, read_embeddings
from pipeline.errors import InputError, UsageError
from pipeline.engine.cluster import LOCAL_GCS_ENV, WORKER_ENV
from pipeline.commands.embed import run_embed
from pipeline.engine.plan import plan_resources
from tests.conftest import REPO, make_st_dir, snapshot


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_bert_dir):
    return make_st_dir(tiny_bert_dir, str(tmp_path_factory.mktemp("m") / "st"), pooling="mean", normalize=True)


def write_formats(d):
    """Seven shards in every format; returns the expected ids of valid rows."""
    import datasets

    (d / "nested").mkdir(parents=True)
    expected = []
    (d / "a.txt").write_text("".join(f"txt doc {i}\n" if i % 7 else "\n" for i in range(40)))
    expected += [f"a.txt:{i}" for i in range(40) if i % 7]
    with open(d / "b.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"json doc {i}" if i != 3 else None, "n": i}) + "\n")
    expected += [f"b.jsonl:{i}" for i in range(30) if i != 3]
    (d / "c.csv").write_text("text,n\n" + "".join(f"csv doc {i},{i}\n" for i in range(25)))
    expected += [f"c.csv:{i}" for i in range(25)]
    pq.write_table(pa.table({"text": [f"pq doc {i}" for i in range(33)], "n": list(range(33))}), d / "nested" / "d.parquet")
    expected += [f"nested/d.parquet:{i}" for i in range(33)]
    (d / "e.json").write_text(json.dumps([{"text": f"arr doc {i}", "n": i} for i in range(12)]))
    expected += [f"e.json:{i}" for i in range(12)]
    datasets.Dataset.from_dict({"text": [f"hf doc {i}" for i in range(20)], "n": list(range(20))}).save_to_disk(str(d / "hf"))
    expected += [f"hf/data-00000-of-00001.arrow:{i}" for i in range(20)]
    return expected


def test_every_format_every_row_exactly_once(ray_cluster, tmp_path, tiny_model):
    src = tmp_path / "in"
    expected = write_formats(src)
    out = tmp_path / "out"
    result = run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, quiet=True))
    ids, vectors = read_embeddings(str(out))
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert vectors.shape == (len(expected), 32) and vectors.dtype == "float32"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"]["embedded"] == len(expected)
    assert manifest["rows"]["invalid"] == 6 + 1
    assert manifest["rows"]["documents"] == len(expected) + 7
    assert {s["shard"] for s in manifest["shards"]} == {
        "a.txt", "b.jsonl", "c.csv", "nested/d.parquet", "e.json", "hf/data-00000-of-00001.arrow"
    }
    for entry in manifest["files"]:
        assert (out / entry["file"]).is_file()
    assert manifest["model"]["fingerprint"].startswith("sha256:")
    assert "storage_options" not in manifest["config"]
    assert result.embedded == len(expected)
    assert sorted(os.listdir(out)) == sorted([e["file"] for e in manifest["files"]] + ["_manifest.json", "_run.json"])
    assert_replicas_recorded(ray_cluster, manifest)


def assert_replicas_recorded(ray_cluster, manifest):
    """The manifest says where each replica ran: here, the encoders and the tokenizer on the one node.

    The plan has one encoder per core; on this small input the run may end before Ray has
    started the second (the 3-node test in test_cluster waits for the whole pool and checks it).
    """
    node = ray_cluster.get_runtime_context().get_node_id()  # the local cluster's only node
    replicas = manifest["replicas"]
    assert manifest["resources"]["num_encoders"] == 2  # one per core of the 2-CPU cluster
    encoders = replicas["encode"]["actors"]
    assert 1 <= len(encoders) <= 2 and replicas["encode"]["per_node"] == {node: len(encoders)}
    assert replicas["tokenize"]["per_node"] == {node: manifest["resources"]["num_tokenizers"]}
    # the tokenizer actors ran the model's Rust tokenizer alone (pipeline.models.fast_tokenizer), no torch
    assert {t["tokenizer"] for t in replicas["tokenize"]["actors"]} == {"tokenizers"}
    for encoder in encoders:
        assert encoder["device"] == "cpu" and encoder["dtype"] == "float32" and encoder["gpu_ids"] == []
        assert encoder["node_id"] == node and encoder["node_ip"]


@pytest.mark.parametrize(
    "spread",
    [False, pytest.param(True, marks=pytest.mark.slow)],  # the multi-node join path, in make test-all (keeps make test < 15 min)
    ids=["joined-by-the-driver", "joined-by-ray-tasks"],
)
def test_shard_larger_than_a_block_and_a_file(ray_cluster, tmp_path, tiny_model, monkeypatch, spread):
    """Tiny Ray blocks force chunks to be split across blocks: the pieces are joined, once each,
    by a driver thread (one node) or by Ray tasks (what a multi-node cluster does)."""
    from ray.data import DataContext

    from pipeline.engine import chain

    class Tracker(chain.FileTracker):
        def __init__(self, sink, **options):
            assert options == {"spread": False}  # the local cluster has one node
            super().__init__(sink, spread=spread)

    monkeypatch.setattr(chain, "FileTracker", Tracker)

    src = tmp_path / "in"
    src.mkdir()
    n = 2500
    (src / "big.txt").write_text("".join(f"document number {i} " + "word " * (i % 13) + "\n" for i in range(n)))
    (src / "small.txt").write_text("just one line\n")
    ctx = DataContext.get_current()
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = 16 * 1024
    try:
        out = tmp_path / "out"
        result = run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, rows_per_file=1000, quiet=True))
    finally:
        ctx.target_max_block_size = saved
    files = sorted(f for f in os.listdir(out) if f.endswith(".parquet"))
    assert files == ["big.txt-00000.parquet", "big.txt-00001.parquet", "big.txt-00002.parquet", "small.txt.parquet"]
    assert [pq.read_metadata(out / f).num_rows for f in files] == [1000, 1000, 500, 1]
    ids, _ = read_embeddings(str(out))
    assert ids == [f"big.txt:{i}" for i in range(n)] + ["small.txt:0"]
    assert not (out / "_pieces").exists()
    assert result.files_written == 4


def test_rerun_resumes_and_leaves_committed_files_untouched(ray_cluster, tmp_path, tiny_model):
    """Also: an id field, kept columns and float16 vectors, which the resumed files must have too."""
    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        (src / f"s{k}.jsonl").write_text(
            "".join(json.dumps({"text": f"shard {k} doc {i}", "lang": "en", "doc": f"s{k}:{i}"}) + "\n" for i in range(20))
        )
    out = tmp_path / "out"
    config = EmbedConfig(input=str(src), output=str(out), model=tiny_model, id_field="doc", num_encoders=1,
                         keep_columns=("text", "lang"), output_dtype="float16", quiet=True)  # one encoder loads faster
    run_embed(config)
    os.remove(out / "s1.jsonl.parquet")  # as if the run had died before this shard
    before = {f: os.stat(out / f).st_mtime_ns for f in ("s0.jsonl.parquet", "s2.jsonl.parquet")}
    result = run_embed(config)
    assert result.files_written == 1 and result.files_skipped == 2
    assert {f: os.stat(out / f).st_mtime_ns for f in before} == before
    ids, _ = read_embeddings(str(out))
    assert sorted(ids) == sorted(f"s{k}:{i}" for k in range(3) for i in range(20))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"]["embedded"] == 60
    table = pq.read_table(out / "s1.jsonl.parquet")
    assert table.column_names == ["id", "embedding", "text", "lang"]
    assert table["id"].to_pylist() == [f"s1:{i}" for i in range(20)]
    assert table["text"].to_pylist() == [f"shard 1 doc {i}" for i in range(20)]
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 32)


@pytest.mark.slow  # make test-all; test_int8 shows a refused resume (float32 onto int8 vectors) in make test
def test_rerun_with_other_settings_is_refused(ray_cluster, tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("alpha\nbeta\n")
    out = tmp_path / "out"
    run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, quiet=True))
    before = snapshot(out)
    with pytest.raises(UsageError, match="pooling='mean', this run has 'cls'"):
        run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, pooling="cls", quiet=True))
    assert snapshot(out) == before  # --overwrite, which would replace it, is tested in test_reliability


@pytest.mark.slow  # make test-all; test_cli checks the same worker-side error as the user sees it
def test_error_inside_a_worker_reaches_the_user_and_keeps_prior_output(ray_cluster, tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.jsonl").write_text('{"text": "fine"}\n')
    out = tmp_path / "out"
    run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, quiet=True))
    before = snapshot(out)
    (src / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(InputError, match="bad.jsonl: line 2 is not valid JSON"):
        run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, quiet=True))
    assert snapshot(out) == before


def test_resource_plan_fits_two_cpus():
    config = EmbedConfig(input="x", output="y")
    plan = plan_resources(config, {"CPU": 2.0}, nodes=1)
    reserved = plan.num_encoders * plan.encoder_cpus + plan.num_tokenizers * plan.tokenizer_cpus
    assert plan.device == "cpu" and reserved <= 1.5  # read + commit tasks keep 0.5 CPU
    gpu = plan_resources(config, {"CPU": 16.0, "GPU": 2.0}, nodes=2)
    assert gpu.device == "cuda" and gpu.num_encoders == 2 and gpu.encoder_gpus == 1
    assert gpu.num_tokenizers == 13  # up to 8 per GPU, capped by the CPUs the encoders and read/commit leave
    assert plan_resources(config, {"CPU": 16.0, "GPU": 1.0}, nodes=1).num_tokenizers == 8
    with pytest.raises(UsageError, match="no GPUs"):
        plan_resources(EmbedConfig(input="x", output="y", device="cuda"), {"CPU": 2.0}, nodes=1)
    with pytest.raises(UsageError, match="do not fit"):
        plan_resources(EmbedConfig(input="x", output="y", num_encoders=20), {"CPU": 2.0}, nodes=1)


def test_a_local_cluster_has_no_public_dashboard_and_no_secrets_in_its_runtime_env(monkeypatch):
    from pipeline.engine.cluster import ray_init_kwargs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship-me")
    local = ray_init_kwargs(None, quiet=True)
    assert local["include_dashboard"] is False and local["dashboard_host"] == "127.0.0.1"
    assert local["address"] == "local"  # never silently joins a cluster `ray start` left running
    assert "do-not-ship-me" not in repr(local) and "runtime_env" not in local  # workers inherit WORKER_ENV
    joined = ray_init_kwargs("auto", quiet=False)
    assert joined["address"] == "auto" and "include_dashboard" not in joined  # the cluster's own settings stand
    assert "do-not-ship-me" not in repr(joined) and "AWS" not in repr(joined["runtime_env"])


def test_a_local_cluster_passes_the_worker_settings_to_its_workers_and_leaves_the_callers_environment():
    """Without a runtime_env the workers Ray prestarted serve the first tasks; the settings reach
    them through the raylet's environment, set only while ray.init starts it."""
    script = textwrap.dedent(
        """
        import json, os
        import ray
        from pipeline.engine.cluster import LOCAL_GCS_ENV, WORKER_ENV, ray_session_for

        names = [*WORKER_ENV, *LOCAL_GCS_ENV]
        os.environ["TRANSFORMERS_VERBOSITY"] = "info"  # the caller's own value
        with ray_session_for(None, quiet=True):
            seen = ray.get(ray.remote(num_cpus=1)(lambda: {k: os.environ.get(k) for k in names}).remote())
        print(json.dumps({"worker": seen, "caller": {k: os.environ.get(k) for k in names}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", "RAY_ADDRESS", *LOCAL_GCS_ENV)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["worker"] == {**WORKER_ENV, **LOCAL_GCS_ENV}  # what the GCS and raylet started with
    assert out["caller"] == {"TOKENIZERS_PARALLELISM": None, "TRANSFORMERS_VERBOSITY": "info", **dict.fromkeys(LOCAL_GCS_ENV)}


def test_cpu_plan_puts_the_chosen_number_of_encoders_on_every_node():
    config = EmbedConfig(input="x", output="y", encoders_per_node=2)
    plan = plan_resources(config, {"CPU": 32.0}, nodes=2)  # two 16-CPU nodes
    assert plan.device == "cpu" and plan.num_encoders == 4 and plan.encoder_threads == 7  # one core left per node
    node_cpus = 16.0
    assert 2 * plan.encoder_cpus + plan.tokenizer_cpus <= node_cpus  # two replicas and a tokenizer fit a node ...
    assert 3 * plan.encoder_cpus > node_cpus  # ... a third replica does not, so Ray must use the other node
    gpu = plan_resources(config, {"CPU": 32.0, "GPU": 4.0}, nodes=2)
    assert gpu.num_encoders == 4 and gpu.encoder_gpus == 1  # GPUs: one per GPU, encoders_per_node does not apply
    with pytest.raises(UsageError, match="--encoders-per-node must be a positive integer"):
        EmbedConfig(input="x", output="y", encoders_per_node=0)


def test_an_encoder_given_a_gpu_torch_cannot_see_falls_back_only_under_device_auto(monkeypatch):
    import torch

    from pipeline.stages.encode import usable_device
    from pipeline.errors import PipelineError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert usable_device("cuda", "auto") == "cpu"
    assert usable_device("cpu", "auto") == "cpu"
    with pytest.raises(PipelineError, match="--device cuda: Ray gave this encoder a GPU, but torch"):
        usable_device("cuda", "cuda")


def test_a_job_runtime_env_and_ray_init_never_set_the_same_variable(monkeypatch):
    """Under `ray job submit --runtime-env configs/runtime_env.yaml`, Ray refuses a ray.init runtime_env
    that sets a variable the job's runtime_env sets too ("Failed to merge the Job's runtime env")."""
    from pipeline.engine.cluster import ray_init_kwargs

    job = {"runtime_env": {"working_dir": "gcs://pkg.zip", "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env_vars = ray_init_kwargs("auto", quiet=True)["runtime_env"]["env_vars"]
    assert "TOKENIZERS_PARALLELISM" not in env_vars and set(env_vars) == set(WORKER_ENV) - {"TOKENIZERS_PARALLELISM"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert ray_init_kwargs("auto", quiet=True)["runtime_env"]["env_vars"] == WORKER_ENV


def test_an_unreachable_cluster_address_fails_fast():
    import socket
    import time

    from pipeline.errors import PipelineError
    from pipeline.engine.cluster import check_reachable

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(PipelineError, match=f"cannot reach the Ray cluster at {address}"):
            check_reachable(address, timeout=5)
    assert time.time() - started < 10
    check_reachable("auto")  # left to Ray


def test_a_run_leaves_ray_data_and_logging_as_it_found_them_so_a_second_run_in_one_process_works(
    ray_cluster, tmp_path, tiny_model
):
    """run_embed changes Ray Data's context, the ray.data logger's level and the log record factory
    for its chain, and restores every one of them (pipeline.engine.execution.ray_data_settings)."""
    import logging

    from ray.data import DataContext

    def state():
        ctx = DataContext.get_current()
        return (
            ctx.max_errored_blocks, ctx.target_max_block_size, ctx.wait_for_min_actors_s, ctx.enable_progress_bars,
            ctx.print_on_execution_start, ctx.execution_options.resource_limits,
            logging.getLogger("ray.data").level, logging.getLogRecordFactory(),
        )

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("one\ntwo\nthree\n")
    before = state()
    for k in range(2):
        result = run_embed(EmbedConfig(input=str(src), output=str(tmp_path / f"out{k}"), model=tiny_model, quiet=True))
        assert result.embedded == 3
        assert state() == before, f"run {k + 1} left a global setting changed"
