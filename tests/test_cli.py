"""The CLI as a user calls it: a real process, its own local Ray cluster, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, assert_one_line_error, cli, cli_env, snapshot


@pytest.fixture
def thirty_lines(tmp_path, tiny_model):
    """(a mean-pooling tiny model, an input folder holding a.txt of 30 lines)."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("".join(f"line {i}\n" for i in range(30)))
    return tiny_model, src


def test_embed_and_mine_then_info(tmp_path, thirty_lines):
    model, src = thirty_lines
    out = tmp_path / "out"
    proc = cli("embed", "--input", str(src), "--output", str(out), "--model", model, "--keep-columns", "text",
               "--mine", "--mine-top-k", "3", "--num-encoders", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embedded 30 documents" in proc.stdout and str(out) in proc.stdout
    assert "mined " in proc.stdout and (tmp_path / "out-pairs" / "pairs.parquet").is_file()
    import pyarrow.parquet as pq

    pairs = pq.read_table(tmp_path / "out-pairs" / "pairs.parquet")
    assert 0 < pairs.num_rows <= 30 * 3 and set(pairs["id_a"].to_pylist()) <= {f"a.txt:{i}" for i in range(30)}
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"]["embedded"] == 30

    info = cli("info", str(out), "--pairs", "2")
    assert info.returncode == 0, info.stderr
    assert '"dim": 32' in info.stdout and '"replicas_per_node"' in info.stdout and "a.txt:0" in info.stdout and "most similar pairs" in info.stdout


def test_quiet_prints_nothing_at_all_on_a_local_cluster(tmp_path, thirty_lines):
    """Not even Ray's notices: token authentication, "Progress bars disabled", the core worker's line on
    actor constructor arguments, Ray Data's advice on concurrency (a real process, a real local cluster)."""
    model, src = thirty_lines
    proc = cli("embed", "--input", str(src), "--output", str(tmp_path / "out"), "--model", model, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")
    assert (tmp_path / "out" / "_manifest.json").is_file()


@pytest.mark.slow  # make test-all; test_bad_input checks the same worker-side errors through main() in make test
def test_a_worker_side_error_in_a_real_process_is_one_line_and_keeps_the_output(tmp_path, thirty_lines):
    model, src = thirty_lines
    out = tmp_path / "out"
    assert cli("embed", "--input", str(src), "--output", str(out), "--model", model, "--quiet").returncode == 0
    before = snapshot(out)
    (src / "b.jsonl").write_text('{"text": "fine"}\nnot json\n')
    bad = cli("embed", "--input", str(src), "--output", str(out), "--model", model)
    assert_one_line_error(bad, 2, "b.jsonl: line 2 is not valid JSON")
    after = snapshot(out)
    # every file as it was; the plan keeps its groups (the failed run added its new shard's group before reading it)
    plan_before, plan_after = (json.loads(s.pop("_plan.json")) for s in (before, after))
    assert after == before
    assert plan_after["groups"][: len(plan_before["groups"])] == plan_before["groups"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "/nonexistent/docs/*.txt"], "the glob matches no files"),
        (["--input", "/nonexistent/docs"], "no such file or directory"),
        (["--max-seq-length", "-3"], "--max-seq-length must be a positive integer, got -3"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
        (["--pooling", "average"], "--pooling 'average'"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    ],
)
def test_bad_usage_exits_2_with_one_line(tmp_path, args, message):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    base = ["embed", "--input", str(src), "--output", str(tmp_path / "out")]
    proc = cli(*base, *args)
    assert_one_line_error(proc, 2, message)


def test_output_that_is_a_file(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    (tmp_path / "out").write_text("I am a file")
    proc = cli("embed", "--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "out"))
    assert_one_line_error(proc, 2, "is a file, expected a directory")
    assert (tmp_path / "out").read_text() == "I am a file"


def test_config_file_with_unknown_key(tmp_path):
    (tmp_path / "c.yaml").write_text("input: x\noutput: y\nbatch: 3\n")
    proc = cli("embed", "--config", str(tmp_path / "c.yaml"))
    assert_one_line_error(proc, 2, "unknown key 'batch'")


def test_mine_on_a_missing_directory(tmp_path):
    proc = cli("mine", "--embeddings", str(tmp_path / "nope"), "--output", str(tmp_path / "pairs"))
    assert_one_line_error(proc, 2, "no such directory")


def test_info_on_a_directory_without_manifest(tmp_path):
    proc = cli("info", str(tmp_path))
    assert_one_line_error(proc, 2, "no _manifest.json")


EXIT_PROBE = """
import atexit, sys, threading, time
from pipeline import cli

class Teardown:  # collected only by the interpreter's own teardown, where Arrow's thread pools die
    def __del__(self):
        print("interpreter teardown ran", flush=True)

sys.modules["__main__"].keep = Teardown()
atexit.register(lambda: print("atexit ran", flush=True))
threading.Thread(target=lambda: (time.sleep(0.5), print("worker thread finished")), daemon=False).start()
sys.argv = ["embedpipe", *sys.argv[1:]]
cli.run()
"""


@pytest.mark.parametrize("args, code", [(["info", "--help"], 0), (["info", "/no/such/output"], 2)])
def test_the_command_exits_with_its_code_after_atexit_but_before_native_teardown(tmp_path, args, code):
    """run(): threads joined and atexit handlers run (Ray's shutdown is one), piped output flushed,
    then no interpreter teardown, where Arrow's pools intermittently aborted a finished command (exit -6)."""
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=cli_env())
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "worker thread finished" in proc.stdout and "atexit ran" in proc.stdout  # unflushed print got through
    assert proc.stdout.index("worker thread finished") < proc.stdout.index("atexit ran")
    assert "interpreter teardown ran" not in proc.stdout
    assert ("usage: embedpipe info" in proc.stdout) if code == 0 else ("/no/such/output: no _manifest.json" in proc.stderr)
