"""Starting or joining Ray (pipeline.engine.cluster): the settings ray.init gets, the local cluster's
environment, an unreachable address; and running on a real Ray cluster: `ray job submit` to a head
started with `ray start`, replica placement on a multi-node cluster, and jobs that must never start
their own."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest

from pipeline import read_embeddings
from pipeline.engine.cluster import LOCAL_GCS_ENV, WORKER_ENV
from tests.slow_model import make_slow_model
from tests.test_reliability import assert_exactly_once, shards_input
from tests.conftest import REPO, _free_port, assert_one_line_error, cli, cli_env, committed, session_processes

VENV_BIN = os.path.dirname(sys.executable)


def write_shards(directory, shards: int = 4, rows: int = 25) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        (directory / f"s{k}.txt").write_text("".join(f"shard {k} document {i}\n" for i in range(rows)))
    return sorted(f"s{k}.txt:{i}" for k in range(shards) for i in range(rows))


# --------------------------------------------------------------------------- ray.init settings, the local cluster, reachability


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


# --------------------------------------------------------------------------- multi-node placement


@pytest.mark.slow  # ~85 s (one per GPU) and ~2 min (two per GPU) on 2 cores: three raylets, 2 or 4 encoder processes
@pytest.mark.parametrize("per_gpu", [1, 2], ids=["one-per-gpu", "two-per-gpu"])
def test_encoder_pool_gets_its_replicas_on_every_gpu_node(tmp_path, tiny_model, per_gpu):
    """Two worker nodes with one (logical) GPU each: one encoder on each, as on a GPU cluster, or
    with --encoders-per-gpu 2 two on each, each reserving half a GPU.

    torch sees no CUDA here, so each replica encodes on CPU (--device auto); the placement,
    the reservations (num_gpus=1/N) and the GPU ids Ray hands out are those of a GPU cluster.
    """
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "include_dashboard": False})
    node_cpus = 1 + per_gpu
    try:
        # Each GPU node keeps a CPU for each of its encoders whichever node the one tokenizer lands on:
        # Ray Data places the tokenizer pool before the encoder pool, so a tokenizer on a GPU node short
        # of CPUs would leave that GPU without a replica (the run would wait, up to --stall-timeout).
        gpu_nodes = {cluster.add_node(num_cpus=node_cpus, num_gpus=1).node_id for _ in range(2)}
        cluster.wait_for_nodes()
        expected = write_shards(tmp_path / "in")
        out = tmp_path / "out"
        args = ["embed", "--input", str(tmp_path / "in"), "--output", str(out), "--model", tiny_model,
                "--ray-address", cluster.address, "--num-tokenizers", "1", "--quiet"]
        if per_gpu > 1:
            args += ["--encoders-per-gpu", str(per_gpu)]

        dry = cli(*args, "--dry-run")
        assert dry.returncode == 0, dry.stderr[-2000:]
        where = "one per GPU" if per_gpu == 1 else f"{per_gpu} per GPU"
        line = f"encode:   {2 * per_gpu} actor(s) x {1 / per_gpu:g} GPU + 1 CPU ({where}, on every GPU node)"
        assert line in dry.stdout, dry.stdout
        assert "3 node(s)" in dry.stdout and dry.stdout.count(f"{node_cpus} CPU/1 GPU") == 2
        assert not out.exists()  # a dry run writes nothing

        proc = cli(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        cluster.shutdown()
    manifest = json.loads((out / "_manifest.json").read_text())
    encoders = manifest["replicas"]["encode"]
    assert sorted(encoders["per_node"]) == sorted(gpu_nodes)  # on the GPU nodes only ...
    assert list(encoders["per_node"].values()) == [per_gpu, per_gpu]  # ... per_gpu on each
    assert all(a["gpu_ids"] == ["0"] and a["device"] == "cpu" for a in encoders["actors"])
    assert manifest["resources"]["num_encoders"] == 2 * per_gpu and manifest["resources"]["encoder_gpus"] == 1 / per_gpu
    assert manifest["dtype"] == "float32"  # what the replicas really ran, not the plan's float16
    assert sum(manifest["replicas"]["tokenize"]["per_node"].values()) == manifest["resources"]["num_tokenizers"]
    ids, vectors = read_embeddings(str(out))
    assert sorted(ids) == expected and vectors.shape == (len(expected), 32)


@pytest.mark.slow  # ~1 min on 2 cores: three raylets, mining tasks importing torch to look for CUDA
def test_mine_puts_its_block_products_on_gpu_workers(tmp_path):
    """On a cluster with (logical) GPUs, every diagonal and off-diagonal block product is a task holding
    a GPU, so they run on the GPU nodes only. torch sees no CUDA here, so each falls back to the
    float32 numpy product, and says so in the manifest; the pairs are sentence-transformers'."""
    import numpy as np
    import pyarrow as pa
    import torch
    from ray.cluster_utils import Cluster
    from sentence_transformers.util import paraphrase_mining_embeddings as st_mining

    from tests.conftest import clustered_vectors

    x = clustered_vectors(300, d=32)
    emb = tmp_path / "emb"
    emb.mkdir()
    ids = [f"d:{i}" for i in range(len(x))]
    pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 32)}),
                   emb / "part.parquet")
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        gpu_nodes = {cluster.add_node(num_cpus=1, num_gpus=1).node_id for _ in range(2)}
        cluster.wait_for_nodes()
        out = tmp_path / "pairs"
        proc = cli("mine", "--embeddings", str(emb), "--output", str(out), "--top-k", "5", "--max-pairs", "200",
                   "--block-size", "100", "--ray-address", cluster.address, "--quiet")
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        cluster.shutdown()
    products = json.loads((out / "_manifest.json").read_text())["products"]
    assert products["device"] == "cuda" and products["gpu_tasks"] == products["tasks"] == 6  # all 3 + 3 held a GPU ...
    assert set(products["per_node"]) <= gpu_nodes  # ... so they ran on the GPU nodes only
    assert products["ran_on"] == [["cpu", "float32"]]  # torch saw no CUDA: the numpy product, and it says so
    got = pq.read_table(out / "pairs.parquet").to_pylist()
    ref = st_mining(torch.from_numpy(x), top_k=5, max_pairs=200)
    assert {(r["id_a"], r["id_b"]) for r in got} == {(ids[min(i, j)], ids[max(i, j)]) for _, i, j in ref}
    assert np.allclose(sorted(r["score"] for r in got), sorted(s for s, _, _ in ref), atol=1e-5)


# --------------------------------------------------------------------------- a node lost mid-run


def encoders_on(node) -> list[int]:
    """Pids of the encoder actors a node of a ray.cluster_utils.Cluster runs (its raylet's workers)."""
    import psutil

    found = []
    for worker in psutil.Process(node.all_processes["raylet"][0].process.pid).children():
        with contextlib.suppress(psutil.Error):
            if "EncodeStage" in " ".join(worker.cmdline()):
                found.append(worker.pid)
    return found


def file_ids(path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def run_losing_a_node(cluster, workers, args) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `embedpipe ARGS` and, once a file is committed, remove the worker node that runs an encoder.
    Returns the finished command and what the loss took: the files committed then, the encoders lost."""
    out = pathlib.Path(args[args.index("--output") + 1])
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lost: dict = {}
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if not lost and os.path.isdir(out) and any(f.endswith(".parquet") for f in os.listdir(out)):
            for node in workers:
                if encoders_on(node):
                    files = committed(out)
                    lost = {"files": files, "ids": {f: file_ids(out / f) for f in files}, "encoders": encoders_on(node),
                            "node": node.node_id}
                    cluster.remove_node(node, allow_graceful=False)  # SIGKILL: a machine gone, not a drained one
                    break
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), lost


@pytest.mark.slow  # ~4 min on 2 cores: three raylets, six encoders and three tokenizers
def test_a_node_lost_mid_run_is_replaced_by_the_other_nodes_and_every_document_lands_once(tmp_path, tiny_bert_dir):
    """Three 2-CPU nodes with the default plan (two encoders and a tokenizer on each). The worker node
    running encoders is removed once files are committed: Ray restarts its actors on the nodes left
    (each node keeps room for them once others finish) and retries their batches; blocks lost with
    the node's object store are rebuilt from lineage. The run ends normally with every document once."""
    from ray.cluster_utils import Cluster

    slow = make_slow_model(tiny_bert_dir, str(tmp_path / "slow"), delay=0.5)
    expected = shards_input(tmp_path / "in", 6, 2000)
    out = tmp_path / "out"
    args = ["embed", "--input", str(tmp_path / "in"), "--output", str(out), "--model", slow, "--trust-remote-code",
            "--max-batch-tokens", "512", "--rows-per-file", "500", "--quiet"]
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        proc, lost = run_losing_a_node(cluster, workers, [*args, "--ray-address", cluster.address])
    finally:
        cluster.shutdown()
    assert lost, "no worker node ran an encoder while the run was going: nothing was tested"
    assert len(lost["files"]) < 24, "the run was over before the node was lost"
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A block whose results were lost with the node is redone (Ray rebuilds it from lineage) and writes
    # its file again, atomically and with the same rows: a file may be replaced, never changed.
    assert {f: file_ids(out / f) for f in lost["files"]} == lost["ids"]
    assert_exactly_once(out, expected)


@pytest.mark.slow  # ~3 min on 2 cores: three raylets, two encoders
def test_a_lost_gpu_node_leaves_its_work_to_the_other_gpu_node_and_every_document_lands_once(tmp_path, tiny_bert_dir):
    """Two (logical) GPU nodes, one encoder each. When one is removed, its encoder needs a GPU no other
    node has; the run goes on with the encoder left and ends normally, every document once."""
    from ray.cluster_utils import Cluster

    slow = make_slow_model(tiny_bert_dir, str(tmp_path / "slow"), delay=0.5)
    expected = shards_input(tmp_path / "in", 6, 1000)
    out = tmp_path / "out"
    args = ["embed", "--input", str(tmp_path / "in"), "--output", str(out), "--model", slow, "--trust-remote-code",
            "--max-batch-tokens", "512", "--rows-per-file", "500", "--num-tokenizers", "1", "--quiet",
            "--no-pack-files"]  # six read tasks, as the other node-loss tests have (their shards are too big to pack)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        proc, lost = run_losing_a_node(cluster, workers, [*args, "--ray-address", cluster.address])
    finally:
        cluster.shutdown()
    assert lost, "no GPU node ran an encoder while the run was going: nothing was tested"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {f: file_ids(out / f) for f in lost["files"]} == lost["ids"]
    assert_exactly_once(out, expected)


@pytest.mark.slow  # ~4 min on 2 cores: three raylets, a stall, a replacement node, a rerun
def test_losing_the_only_gpu_node_ends_the_run_in_one_line_and_the_rerun_on_a_new_node_completes(tmp_path, tiny_bert_dir):
    """One (logical) GPU node and a CPU node: when the GPU node is removed no node can take its encoder,
    so nothing moves; the watchdog ends the run after --stall-timeout with one line naming the lost
    node. A new GPU node joins (as an autoscaler or KubeRay would bring one) and the rerun commits
    exactly the missing files."""
    from ray.cluster_utils import Cluster

    # A GPU plan gives an encoder blocks of 8,192 rows, and a block's files commit when it is done:
    # 12,000 rows make two blocks, and the node is lost while the second one is being encoded.
    slow = make_slow_model(tiny_bert_dir, str(tmp_path / "slow"), delay=0.5)
    expected = shards_input(tmp_path / "in", 6, 2000)
    out = tmp_path / "out"
    args = ["embed", "--input", str(tmp_path / "in"), "--output", str(out), "--model", slow, "--trust-remote-code",
            "--max-batch-tokens", "2048", "--rows-per-file", "500", "--num-tokenizers", "1", "--stall-timeout", "45",
            "--quiet"]
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        args += ["--ray-address", cluster.address]
        proc, lost = run_losing_a_node(cluster, [gpu_node], args)
        assert lost, "the GPU node ran no encoder while the run was going: nothing was tested"
        assert_one_line_error(proc, 1, "node(s) left the cluster")  # at once, or after --stall-timeout (see docs)
        assert lost["node"][:8] in proc.stderr and "rerun the same command to resume" in proc.stderr
        before = committed(out)
        assert {f: file_ids(out / f) for f in lost["files"]} == lost["ids"]
        assert 0 < len(before) < 24 and not (out / "_manifest.json").exists()

        cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.wait_for_nodes()
        rerun = cli(*args, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    finally:
        cluster.shutdown()
    after = committed(out)
    assert {f: after[f] for f in before} == before, "the rerun rewrote a committed file"
    assert_exactly_once(out, expected)


# --------------------------------------------------------------------------- ray start --head + ray job submit


class RayHead:
    """`ray start --head --block` on 127.0.0.1 with ports of its own, in a session of its own,
    so that stopping it ends exactly its processes (never `ray stop`, which ends every Ray on the machine)."""

    def __init__(self, tmp_path):
        self.dashboard_port = _free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.env = {**cli_env(), "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS")
        ports = {
            "--port": _free_port(), "--dashboard-port": self.dashboard_port, "--ray-client-server-port": _free_port(),
            "--node-manager-port": _free_port(), "--object-manager-port": _free_port(),
            "--dashboard-agent-listen-port": _free_port(), "--dashboard-agent-grpc-port": _free_port(),
            "--runtime-env-agent-port": _free_port(), "--metrics-export-port": _free_port(),
        }
        args = [f"{VENV_BIN}/ray", "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
                "--dashboard-host", "127.0.0.1", "--disable-usage-stats", "--temp-dir", self.temp_dir]
        args += [str(x) for item in ports.items() for x in item]
        self.log = open(tmp_path / "head.log", "w")
        self.proc = subprocess.Popen(args, env=self.env, start_new_session=True, stdout=self.log, stderr=subprocess.STDOUT)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, "ray start --head exited"
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2).close()
                return
            except urllib.error.HTTPError:  # it answers (401 without the token): up
                return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError("the Ray head's dashboard did not answer")

    def submit(self, *entrypoint: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run(
            [f"{VENV_BIN}/ray", "job", "submit", "--address", self.address, "--working-dir", ".",
             "--runtime-env", "configs/runtime_env.yaml", "--", *entrypoint],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            for pid in session_processes(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + wait
            while session_processes(self.proc.pid) and time.time() < deadline:
                time.sleep(0.2)
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.mark.slow  # ~3 min on 2 cores: a head with its dashboard, two jobs with their runtime_env uploads
def test_ray_job_submit_runs_embed_then_mine_on_a_running_head(tmp_path, tiny_model):
    expected = write_shards(tmp_path / "in")
    out, pairs = tmp_path / "vectors", tmp_path / "pairs"
    head = RayHead(tmp_path)
    try:
        head.wait_ready()
        embed = head.submit("python", "jobs/embed.py", "--config", "configs/cluster.yaml", "--input", str(tmp_path / "in"),
                            "--output", str(out), "--model", tiny_model, "--device", "auto", "--dtype", "auto",
                            "--quiet")
        assert embed.returncode == 0, (embed.stdout + embed.stderr)[-4000:]
        assert "succeeded" in embed.stdout + embed.stderr
        mine = head.submit("python", "jobs/mine.py", "--config", "configs/mine.yaml", "--embeddings", str(out),
                           "--output", str(pairs), "--top-k", "3", "--max-pairs", "50")
        assert mine.returncode == 0, (mine.stdout + mine.stderr)[-4000:]
        assert "mined 50 pairs among 100 documents" in mine.stdout
    finally:
        head.stop()
    assert not session_processes(head.proc.pid)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"]["embedded"] == 100 and manifest["resources"]["device"] == "cpu"
    assert manifest["config"]["ray_address"] not in ("", None)  # joined the head, never started a cluster
    (node,) = manifest["replicas"]["encode"]["per_node"]  # the head is the only node
    ids, _ = read_embeddings(str(out))
    assert sorted(ids) == expected
    table = pq.read_table(pairs / "pairs.parquet")
    assert table.num_rows == 50 and set(table["id_a"].to_pylist()) <= set(expected)
    assert json.loads((pairs / "_manifest.json").read_text())["documents"] == 100


# --------------------------------------------------------------------------- jobs never start a cluster


def run_job(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_job_with_an_unreachable_address_fails_in_one_line(tmp_path):
    import pyarrow as pa

    vectors = pa.FixedSizeListArray.from_arrays(pa.array([0.1, 0.2, 0.3, 0.4], pa.float32()), 2)
    pq.write_table(pa.table({"id": ["a", "b"], "embedding": vectors}), tmp_path / "e.parquet")
    port = _free_port()  # nothing listens there
    started = time.time()
    proc = run_job("mine.py", "--embeddings", str(tmp_path), "--output", str(tmp_path / "p"),
                   env=cli_env(RAY_ADDRESS=f"127.0.0.1:{port}"))
    assert_one_line_error(proc, 1, f"cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert time.time() - started < 60  # ray.init alone would retry for minutes
    assert not (tmp_path / "p" / "pairs.parquet").exists()


def test_job_refuses_an_empty_ray_address(tmp_path):
    proc = run_job("embed.py", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--ray-address", "",
                   env=cli_env())
    assert_one_line_error(proc, 2, "--ray-address is empty: a job joins its cluster and never starts one")
    assert not (tmp_path / "o").exists()
