"""Faults: kill -9 and resume, a worker killed mid-run, a stalled stage, --overwrite that keeps the old output."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest

from pipeline import EmbedConfig, read_embeddings
from pipeline.errors import InputError
from pipeline.commands.embed import run_embed
from tests.conftest import assert_one_line_error, cli, committed, kill_cli_when, snapshot, write_lines
from tests.slow_model import make_slow_model


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory, tiny_bert_dir):
    """Sleeps 0.5 s per forward: a few seconds per encoder call, so files commit one after another."""
    return make_slow_model(tiny_bert_dir, str(tmp_path_factory.mktemp("slow") / "model"), delay=0.5)


def assert_exactly_once(out, expected_ids):
    ids, vectors = read_embeddings(str(out))
    assert len(ids) == len(set(ids)), "a document was written twice"
    assert sorted(ids) == sorted(expected_ids), "a document is missing"
    assert vectors.shape[0] == len(ids)
    for name in committed(out):  # every visible file is whole
        pq.read_table(out / name)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"]["embedded"] == len(expected_ids)
    assert not [f for f in os.listdir(out) if f.startswith(("_tmp", "_pieces", "_overwrite"))]


def shards_input(src, shards: int, rows: int) -> list[str]:
    src.mkdir(parents=True, exist_ok=True)
    ids = []
    for k in range(shards):
        write_lines(src / f"s{k}.txt", [f"shard {k} document {i} " + "word " * (i % 9) for i in range(rows)])
        ids += [f"s{k}.txt:{i}" for i in range(rows)]
    return ids


# --------------------------------------------------------------------------- kill -9 and resume


@pytest.mark.parametrize(
    "shards, rows, rows_per_file, expected_files",
    # make test-all: about 80 s each on 2 cores; in make test the encoder-kill test below shows a worker's death
    [pytest.param(6, 1000, 50_000, 6, marks=pytest.mark.slow), pytest.param(1, 6000, 1000, 6, marks=pytest.mark.slow)],
    ids=["kill-between-shards", "kill-between-files-of-one-shard"],
)
def test_kill_9_of_the_process_group_then_rerun_gives_every_document_once(
    tmp_path, slow_model, shards, rows, rows_per_file, expected_files
):
    expected = shards_input(tmp_path / "in", shards, rows)
    out = tmp_path / "out"
    args = ["embed", "--input", str(tmp_path / "in"), "--output", str(out), "--model", slow_model,
            "--trust-remote-code", "--rows-per-file", str(rows_per_file), "--max-batch-tokens", "4096", "--quiet",
            "--no-pack-files"]  # a file per shard: kills between files of shards (test_small_files: packed ones)

    killed = kill_cli_when(args, ready=lambda: len(committed(out)) >= 1)
    assert killed, "the run finished before the kill: nothing was tested"
    before = committed(out)
    assert 1 <= len(before) < expected_files, before
    assert not (out / "_manifest.json").exists()

    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = committed(out)
    assert len(after) == expected_files
    assert {f: after[f] for f in before} == before, "a committed file was rewritten"
    assert_exactly_once(out, expected)
    assert f"{len(before)} file(s) already done" not in proc.stdout  # --quiet: no summary line


# --------------------------------------------------------------------------- a worker dies


def encoder_actors() -> list[dict]:
    """Live encoder actors of this test's cluster: GCS actor table, told apart by their process title.

    (`ray.util.state` needs the dashboard, which the test cluster runs without.)
    """
    import psutil
    from ray._private import state

    found = []
    for actor in state.actors().values():
        if actor["State"] != "ALIVE" or not actor["Pid"]:
            continue
        try:
            title = " ".join(psutil.Process(actor["Pid"]).cmdline())
        except psutil.Error:
            continue
        if "EncodeStage" in title:
            found.append(actor)
    return found


def embed_in_thread(config: EmbedConfig) -> tuple[threading.Thread, dict]:
    """run_embed(config) started in a thread; the dict gets its "result", or the "error" it raised."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = run_embed(config)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's assertions
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("writer", ["encoder", pytest.param("separate", marks=pytest.mark.slow)])  # separate: test-all
def test_encoder_actor_killed_mid_run_is_replaced_and_every_document_lands_once(ray_cluster, tmp_path, slow_model,
                                                                                 writer):
    """With --writer separate the encoder builds no file: every file's rows go out as pieces and the
    driver builds it, so the kill lands while pieces of a whole file wait to be joined."""
    expected = shards_input(tmp_path / "in", 6, 1000)
    out = tmp_path / "out"
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(out), model=slow_model, trust_remote_code=True,
                         max_batch_tokens=4096, quiet=True, pack_files=False, writer=writer)  # six files, one after another
    thread, outcome = embed_in_thread(config)
    killed = None
    deadline = time.time() + 240
    def past_its_first_call() -> bool:  # the encoder has written something and has more to do
        if writer == "encoder":
            return bool(committed(out))
        return any(f.endswith(".arrow") for _, _, files in os.walk(out / "_pieces") for f in files)

    while time.time() < deadline and thread.is_alive() and killed is None:
        if past_its_first_call():
            for actor in encoder_actors():
                killed, files_at_kill = actor, len(committed(out))
                os.kill(actor["Pid"], signal.SIGKILL)
        time.sleep(0.05)
    thread.join(300)
    assert killed is not None and files_at_kill < 6, "the run ended before the encoder could be killed"
    assert "error" not in outcome, outcome.get("error")
    assert_exactly_once(out, expected)
    assert outcome["result"].embedded == 6000
    from ray._private import state

    assert state.actors()[killed["ActorID"]]["NumRestarts"] >= 1  # Ray replaced it; nothing was dropped


def test_an_encoder_killed_while_a_file_is_in_pieces_still_commits_it_once(ray_cluster, tmp_path, slow_model, monkeypatch):
    """One file of 3,000 rows in blocks of 100: each block is written as a piece by the encoder and
    the driver joins them. An encoder killed after some pieces exist is replaced, its block is
    redone, and the joined file holds every row exactly once; no piece is left behind."""
    from pipeline.engine import plan

    monkeypatch.setattr(plan, "block_rows_for", lambda device, weights: 100)
    src = tmp_path / "in"
    src.mkdir()
    write_lines(src / "big.txt", [f"document {i} " + "word " * (i % 7) for i in range(3000)])
    out = tmp_path / "out"
    config = EmbedConfig(input=str(src), output=str(out), model=slow_model, trust_remote_code=True,
                         max_batch_tokens=4096, rows_per_file=3000, quiet=True)
    thread, outcome = embed_in_thread(config)
    killed, deadline = None, time.time() + 240
    pieces = out / "_pieces" / "big.txt.parquet"
    while time.time() < deadline and thread.is_alive() and killed is None:
        if pieces.is_dir() and len([p for p in os.listdir(pieces) if p.endswith(".arrow")]) >= 2:
            for actor in encoder_actors()[:1]:
                killed = actor
                os.kill(actor["Pid"], signal.SIGKILL)
        time.sleep(0.05)
    thread.join(300)
    assert killed is not None, "the run ended before the encoder could be killed"
    assert "error" not in outcome, outcome.get("error")
    assert list(committed(out)) == ["big.txt.parquet"] and not (out / "_pieces").exists()
    ids, _ = read_embeddings(str(out))
    assert sorted(ids) == sorted(f"big.txt:{i}" for i in range(3000))
    assert outcome["result"].embedded == 3000


# --------------------------------------------------------------------------- never hang silently


@pytest.mark.slow  # ~75 s; make test checks the watchdog itself on a real board (test_execution)
def test_a_stalled_stage_ends_the_run_with_a_message_naming_it(tmp_path, tiny_bert_dir):
    hung = make_slow_model(tiny_bert_dir, str(tmp_path / "hung"), delay=3600)
    write_lines(tmp_path / "a.txt", [f"document {i}" for i in range(50)])
    started = time.time()
    proc = cli("embed", "--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "out"), "--model", hung,
               "--trust-remote-code", "--stall-timeout", "20", "--quiet", timeout=300)
    assert_one_line_error(proc, 1, "the encode stage made no progress for")
    assert "stuck encoding 50 rows" in proc.stderr
    assert time.time() - started < 200  # it ended on its own, far before the model would have woken up
    assert not committed(tmp_path / "out")


# --------------------------------------------------------------------------- --overwrite


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(ray_cluster, tmp_path, tiny_model):
    # one encoder per run: the count does not matter here, and on 2 cores one process fewer loads torch
    src = tmp_path / "in"
    shards_input(src, 3, 20)
    out = tmp_path / "out"
    run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, num_encoders=1, quiet=True))
    old = snapshot(out)

    (src / "z_bad.jsonl").write_text('{"text": "fine"}\n{"text": oops\n')  # fails after the good shards
    with pytest.raises(InputError, match="z_bad.jsonl: line 2 is not valid JSON"):
        run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, num_encoders=1, pooling="cls", overwrite=True, quiet=True))
    visible = {f: b for f, b in snapshot(out).items() if not f.startswith("_overwrite")}
    assert visible == old, "a failed --overwrite run changed the old output"

    os.remove(src / "z_bad.jsonl")
    os.remove(src / "s2.txt")  # its old vectors must not survive the overwrite
    result = run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, num_encoders=1, pooling="cls", overwrite=True, quiet=True))
    # the three small shards were one packed group, the two left are another: the old file is gone
    assert sorted(old_files := [f for f in old if f.endswith(".parquet")]) == ["s0.txt+2.parquet"]
    assert sorted(committed(out)) == ["s0.txt+1.parquet"]
    assert result.manifest["pooling"] == "cls" and json.loads((out / "_manifest.json").read_text())["pooling"] == "cls"
    assert_exactly_once(out, [f"s{k}.txt:{i}" for k in range(2) for i in range(20)])
    plan = json.loads((out / "_plan.json").read_text())  # the new output's groups were swapped in with it
    assert [[entry[0] for entry in group] for group in plan["groups"]] == [["s0.txt", "s1.txt"]], old_files


@pytest.mark.slow  # make test-all; the plain --overwrite test runs in make test
def test_an_overwrite_killed_while_swapping_is_finished_by_the_next_run(ray_cluster, tmp_path, tiny_model, monkeypatch):
    from pipeline.storage import output

    src = tmp_path / "in"
    expected = shards_input(src, 3, 20)
    out = tmp_path / "out"
    # a file per shard (no packing): three files to swap in, so that the "crash" falls between two of them
    run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, quiet=True, pack_files=False))

    moves = []
    real_finish = output.finish_swap

    def die_after_one_move(fs, root):
        real_mv = fs.mv

        def mv(a, b, **kw):
            if a.endswith(".parquet"):  # the new _plan.json is moved in first, then the files
                if moves:
                    raise KeyboardInterrupt  # the process dies here, one file swapped in
                moves.append(a)
            return real_mv(a, b, **kw)

        monkeypatch.setattr(fs, "mv", mv)
        try:
            return real_finish(fs, root)
        finally:
            monkeypatch.setattr(fs, "mv", real_mv)

    monkeypatch.setattr(output, "finish_swap", die_after_one_move)
    with pytest.raises(KeyboardInterrupt):
        run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, pooling="cls", overwrite=True, quiet=True,
                              pack_files=False))
    monkeypatch.setattr(output, "finish_swap", real_finish)
    assert not (out / "_manifest.json").exists() and (out / "_overwrite" / "_swap.json").exists()
    moved = os.path.basename(moves[0])
    new_vectors = dict(zip(*read_embeddings(str(out / moved))))  # swapped in before the "crash"
    for name in os.listdir(out / "_overwrite"):
        if name.endswith(".parquet"):
            new_vectors.update(zip(*read_embeddings(str(out / "_overwrite" / name))))
    assert sorted(new_vectors) == sorted(expected)

    result = run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, pooling="cls", quiet=True,
                                   pack_files=False))
    assert result.files_written == 0 and result.manifest["pooling"] == "cls"
    assert sorted(committed(out)) == [f"s{k}.txt.parquet" for k in range(3)]
    assert_exactly_once(out, expected)
    ids, vectors = read_embeddings(str(out))
    assert all((vectors[i] == new_vectors[id_]).all() for i, id_ in enumerate(ids))  # every file is the new run's


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the test (root and mount rights needed: skipped with the reason where
    mounting is not allowed); `grow()` remounts it at 64 MiB, keeping its files."""
    import subprocess

    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or 'mount failed'}")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(where)], check=True)

    try:
        yield where, grow
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_write_errors_that_cannot_heal_name_the_condition_and_the_path(small_disk):
    import subprocess

    from pipeline.errors import PipelineError
    from pipeline.storage.filesystems import get_fs, write_bytes_atomic

    where, _ = small_disk
    fs, root = get_fs(str(where))
    with pytest.raises(PipelineError, match=rf"^no space left on device writing {where}/x.parquet: free space, then rerun to resume$"):
        write_bytes_atomic(fs, f"{root}/x.parquet", b"0" * (2 << 20))
    assert os.listdir(where) == []  # no temporary file left behind
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
    with pytest.raises(PipelineError, match=rf"^read-only file system writing {where}/y.parquet: make the output writable"):
        write_bytes_atomic(fs, f"{root}/y.parquet", b"0")


@pytest.mark.slow  # two CLI runs (~80 s); the write errors themselves are checked in make test above
def test_a_full_disk_is_one_line_naming_it_and_the_rerun_completes(tmp_path, tiny_model, small_disk):
    from tests.conftest import sample_texts

    where, grow = small_disk
    texts = sample_texts() * 8  # 12,000 documents, about 2 MiB of output with their texts
    src = tmp_path / "in"
    src.mkdir()
    for k in range(4):
        write_lines(src / f"p{k}.txt", texts[k::4])
    out = where / "out"
    # --no-pack-files: a file per shard (~0.5 MiB each), so some commit before the disk is full (packed: one file)
    args = ("embed", "--input", str(src), "--output", str(out), "--model", tiny_model, "--keep-columns", "text",
            "--no-pack-files")
    began = time.time()
    full = cli(*args)
    assert_one_line_error(full, 1, f"no space left on device writing {out}/")
    assert full.stderr.strip().splitlines()[-1].endswith("free space, then rerun to resume")
    assert time.time() - began < 240  # no retry loop on an error that cannot heal
    kept = committed(out)
    before = {name: (out / name).read_bytes() for name in kept}
    grow()
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {name: (out / name).read_bytes() for name in kept} == before  # committed files untouched
    ids, _ = read_embeddings(str(out))
    assert len(ids) == len(set(ids)) == len(texts)


# --------------------------------------------------------------------------- Ctrl-C and SIGTERM


def signal_mid_run(args, out, signum: int, group: bool, second: bool = False):
    """Start `python -m pipeline ARGS` in a new session; once a file is committed, send `signum` to its
    process group (a terminal's Ctrl-C) or to the command alone (Kubernetes' SIGTERM), a second time
    0.3 s later if `second`. Returns (exit code, stderr, seconds from the signal to the exit, the
    session's processes still alive 10 s after the exit)."""
    import subprocess
    import sys

    from tests.conftest import REPO, cli_env, session_processes

    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=cli_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not committed(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the signal: nothing was tested"
        sent = time.time()
        (os.killpg if group else os.kill)(proc.pid, signum)
        if second:
            time.sleep(0.3)
            with __import__("contextlib").suppress(ProcessLookupError):
                (os.killpg if group else os.kill)(proc.pid, signum)
        _, stderr = proc.communicate(timeout=120)
        took = time.time() - sent
        deadline = time.time() + 10
        while session_processes(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        return proc.returncode, stderr, took, session_processes(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.mark.parametrize("signum, group, code, line", [
    (signal.SIGINT, True, 130, "embedpipe: interrupted; rerun the same command to resume"),
    pytest.param(signal.SIGTERM, False, 143, "embedpipe: stopped by SIGTERM; rerun the same command to resume",
                 marks=pytest.mark.slow),  # make test-all; Ctrl-C takes the same path in make test
])
def test_ctrl_c_and_sigterm_end_with_one_line_and_no_ray_process_and_the_rerun_completes(
    tmp_path, slow_model, signum, group, code, line
):
    expected = shards_input(tmp_path / "in", 4, 400)
    out = tmp_path / "out"
    args = ["embed", "--input", str(tmp_path / "in"), "--output", str(out), "--model", slow_model,
            "--trust-remote-code", "--max-batch-tokens", "4096", "--quiet", "--no-pack-files"]  # files commit one by one
    returncode, stderr, took, left = signal_mid_run(args, out, signum, group)
    assert returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "SIGTERM handler" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == line
    assert took < 30, took
    assert left == [], f"processes of the run still alive: {left}"
    assert not (out / "_lock.json").exists()
    kept = committed(out)
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {f: committed(out)[f] for f in kept} == kept
    assert_exactly_once(out, expected)


@pytest.mark.slow  # make test-all
def test_a_second_ctrl_c_while_shutting_down_ends_at_once(tmp_path, slow_model):
    shards_input(tmp_path / "in", 4, 400)
    out = tmp_path / "out"
    args = ["embed", "--input", str(tmp_path / "in"), "--output", str(out), "--model", slow_model,
            "--trust-remote-code", "--max-batch-tokens", "4096", "--quiet", "--no-pack-files"]  # files commit one by one
    returncode, stderr, took, left = signal_mid_run(args, out, signal.SIGINT, True, second=True)
    assert returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("embedpipe: interrupted")
    assert left == [], f"processes of the run still alive: {left}"
