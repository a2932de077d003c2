"""One run per output at a time (pipeline.storage.lock): a second run is refused naming the owner,
on a local directory and on S3 (a conditional PUT against the moto server); a lock left by a run
that died is taken over once stale; a real second `embedpipe embed` is refused while the first
runs, and the first completes."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pipeline.errors import UsageError
from pipeline.storage.filesystems import get_fs
from pipeline.storage.lock import LOCK_FILE, STALE_AFTER_S, output_lock, read_lock
from tests.conftest import REPO, SAMPLE, assert_one_line_error, cli, cli_env


def locked(path) -> dict | None:
    fs, root = get_fs(str(path))
    return read_lock(fs, os.path.join(root, LOCK_FILE))


def test_a_second_holder_is_refused_naming_the_first_and_the_lock_goes_with_the_run(tmp_path):
    fs, root = get_fs(str(tmp_path))
    with output_lock(fs, root, "out/", "embed") as mine:
        held = locked(tmp_path)
        assert held["token"] == mine["token"] and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(UsageError, match=rf"--output out/ is in use by embedpipe embed \(pid {os.getpid()} on "):
            with output_lock(fs, root, "out/", "embed"):
                pass
        assert locked(tmp_path)["token"] == mine["token"]  # the refused run left it alone
    assert locked(tmp_path) is None
    with pytest.raises(RuntimeError):  # released on an error too
        with output_lock(fs, root, "out/", "embed"):
            raise RuntimeError("boom")
    assert locked(tmp_path) is None and os.listdir(tmp_path) == []


def write_lock(directory, **fields) -> None:
    now = time.time()
    doc = {"command": "embedpipe embed", "user": "u", "host": socket.gethostname(), "pid": os.getpid(),
           "started": "then", "heartbeat_unix": now, "token": "theirs", **fields}
    (directory / LOCK_FILE).write_text(json.dumps(doc))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("fields, why", [
    ({"pid": None}, "its process (pid {pid}) is gone"),  # kill -9 on this host
    ({"host": "node-7.lost", "heartbeat_age": STALE_AFTER_S + 60}, "no heartbeat for 6 min"),  # a lost node
    ({}, None),  # this live process: not stale
    ({"host": "node-7.alive", "heartbeat_age": 20}, None),  # another host, beating
])
def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path, caplog, fields, why):
    if fields.get("pid", 0) is None:
        fields = {**fields, "pid": dead_pid()}
    if "heartbeat_age" in fields:  # ages, not times: the parameters are made when the tests are collected
        fields = {**fields, "heartbeat_unix": time.time() - fields.pop("heartbeat_age")}
    write_lock(tmp_path, **fields)
    fs, root = get_fs(str(tmp_path))
    if why is None:
        with pytest.raises(UsageError, match="is in use by embedpipe embed"):
            with output_lock(fs, root, "out/", "embed"):
                pass
        assert locked(tmp_path)["token"] == "theirs"
        return
    with caplog.at_level(logging.WARNING), output_lock(fs, root, "out/", "embed") as mine:
        assert locked(tmp_path)["token"] == mine["token"]
    assert why.format(pid=fields.get("pid")) in caplog.text and "taking over the lock" in caplog.text
    assert locked(tmp_path) is None


def test_s3_lock_is_a_conditional_put(moto_s3):
    bucket = moto_s3.new_bucket("lock")
    fs, root = get_fs(f"s3://{bucket}/out", moto_s3.storage_options())
    with output_lock(fs, root, f"s3://{bucket}/out", "embed") as mine:
        assert read_lock(fs, f"{root}/{LOCK_FILE}")["token"] == mine["token"]
        with pytest.raises(UsageError, match="is in use by embedpipe embed"):
            with output_lock(fs, root, f"s3://{bucket}/out", "embed"):
                pass
    assert not fs.exists(f"{root}/{LOCK_FILE}")


def test_embed_into_a_locked_output_exits_2_at_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fs, root = get_fs(str(out))
    with output_lock(fs, root, str(out), "embed"):
        began = time.time()
        proc = cli("embed", "--input", SAMPLE, "--output", str(out), "--overwrite")
        assert_one_line_error(proc, 2, f"--output {out} is in use by embedpipe embed (pid {os.getpid()}")
        assert time.time() - began < 60  # refused before Ray starts
    assert sorted(os.listdir(out)) == []


@pytest.mark.slow  # two real runs; the in-process refusal above runs in make test
def test_the_same_job_started_twice_one_runs_the_other_is_refused(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pipeline", "embed", "--input", SAMPLE, "--output", str(out), "--quiet"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO)
    deadline = time.time() + 120
    while locked(out) is None and time.time() < deadline:
        time.sleep(0.2)
    second = cli("embed", "--input", SAMPLE, "--output", str(out), "--quiet")
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 2 and f"(pid {first.pid} on " in second.stderr
    # the three sample files are one packed group: the first run wrote its one file, every document in it
    assert locked(out) is None and sorted(f for f in os.listdir(out) if f.endswith(".parquet")) == ["de.jsonl+2.parquet"]
    assert json.loads((out / "_manifest.json").read_text())["rows"]["embedded"] == 1500


def test_a_stale_takeover_never_removes_a_lock_that_replaced_the_stale_one(tmp_path):
    from pipeline.storage.lock import _remove_stale

    write_lock(tmp_path, token="new-owner")  # another run took over the stale lock "old" just before us
    fs, root = get_fs(str(tmp_path))
    _remove_stale(fs, os.path.join(root, LOCK_FILE), "old")
    assert locked(tmp_path)["token"] == "new-owner" and os.listdir(tmp_path) == [LOCK_FILE]
    _remove_stale(fs, os.path.join(root, LOCK_FILE), "new-owner")
    assert os.listdir(tmp_path) == []


def test_a_dead_pid_of_another_container_with_the_same_host_name_is_not_taken_for_this_one(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), machine="another-boot:4026531836")  # beating, other pid namespace
    fs, root = get_fs(str(tmp_path))
    with pytest.raises(UsageError, match="is in use by"):
        with output_lock(fs, root, "out/", "embed"):
            pass


def test_a_run_whose_lock_was_taken_over_stops(tmp_path, monkeypatch):
    from pipeline.storage import lock

    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    # Python's own SIGINT handler, as a process starts with it: interrupt_main does nothing where an
    # earlier test of this session left SIGINT ignored or at SIG_DFL (seen in full runs from a fresh clone)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    fs, root = get_fs(str(tmp_path))
    try:
        with pytest.raises(KeyboardInterrupt):  # the heartbeat interrupts the main thread
            with output_lock(fs, root, "out/", "embed"):
                write_lock(tmp_path, token="after-a-suspend", host="other")  # another run took it meanwhile
                for _ in range(600):  # short sleeps: interrupt_main sends no real signal, so it cannot cut a sleep
                    time.sleep(0.1)  # short; up to 60 s for a loaded machine's heartbeat
        assert "another run took over the output's lock" in lock.LOST[0]
        assert locked(tmp_path)["token"] == "after-a-suspend"  # the new owner's lock is left alone
    finally:
        lock.LOST.clear()
        signal.signal(signal.SIGINT, previous)
