"""Starting or joining Ray, and checking the output location, for every command.

Kept apart from `pipeline.commands.embed` so that `embedpipe mine` and `embedpipe rerank`
start without importing Ray Data (~0.7 s of a run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from typing import Any, Iterator, Mapping

from pipeline.engine import interrupts
from pipeline.errors import InputError, PipelineError, UsageError
from pipeline.storage.filesystems import check_bucket, check_local_dir_writable, first_line, get_fs, is_local

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
# A local cluster's GCS keeps the events of the last this-many tasks and actor calls (Ray's
# default: 100,000, which a long run reaches and holds in memory); a variable the user set wins.
LOCAL_GCS_ENV = {"RAY_task_events_max_num_task_in_gcs": "1000"}


def ray_init_kwargs(address: str | None, quiet: bool) -> dict[str, Any]:
    """How embedpipe starts or joins Ray: a local cluster runs without a dashboard (bound to
    127.0.0.1 should it start); the runtime_env carries only non-secret worker settings.

    A local cluster gets no runtime_env: its workers inherit WORKER_ENV from the raylet
    (see `_inherited_env`). A job-level runtime_env makes Ray start new workers for the
    job instead of using the ones it prestarted, which cost ~2 s of a 2-core machine.
    """
    kwargs: dict[str, Any] = {"log_to_driver": os.environ.get("EMBEDPIPE_DEBUG") == "1"}
    if address:
        job_env = _job_env_vars()  # under `ray job submit`, Ray refuses a key set by both the job and ray.init
        kwargs["address"] = address
        kwargs["runtime_env"] = {"env_vars": {k: v for k, v in WORKER_ENV.items() if k not in job_env}}
    else:
        # "local", not None: with None, ray.init joins whatever cluster `ray start` last left
        # running on this machine (/tmp/ray/ray_current_cluster) instead of starting our own.
        kwargs.update(address="local", include_dashboard=False, dashboard_host="127.0.0.1")
    if quiet:  # errors only: not even Ray's notices (token authentication, ...)
        kwargs["logging_level"] = logging.ERROR
    return kwargs


@contextlib.contextmanager
def _inherited_env(values: Mapping[str, str]) -> Iterator[None]:
    """Set `values` in this process's environment for the block, then restore it.

    Around the ray.init that starts a local cluster: the GCS and the raylet are started
    with this environment, and the raylet passes it to every worker it starts, while the
    caller's own environment is left as it was.
    """
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast, in one line, when a cluster address (host:port, ray://host:port) does not answer:
    ray.init would otherwise retry for minutes. 'auto' is left to Ray, which fails at once."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or address == "auto":
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PipelineError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc.__class__.__name__}); "
            "embedpipe joins the cluster it is given and never starts one in its place"
        ) from None


def _job_env_vars() -> dict[str, str]:
    """env_vars of the runtime_env of the Ray job this driver runs in (none outside a job)."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return dict((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


@contextlib.contextmanager
def ray_session_for(address: str | None, quiet: bool) -> Iterator[None]:
    """Join the cluster the user named, reuse one already initialised, or start a local one."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        check_reachable(address)
    try:
        local_env = {**{k: v for k, v in LOCAL_GCS_ENV.items() if k not in os.environ}, **WORKER_ENV}
        with contextlib.nullcontext() if address else _inherited_env(local_env):
            ray.init(**ray_init_kwargs(address, quiet))
        interrupts.reinstall()  # ray.init set a SIGTERM handler of its own
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise PipelineError(f"cannot start or join Ray ({str(exc).splitlines()[0]})") from None
    try:
        with _ray_lines_dropped() if quiet and os.environ.get("EMBEDPIPE_DEBUG") != "1" else contextlib.nullcontext():
            yield
    finally:
        if not address:
            _kill_local_monitor()
        ray.shutdown()


# Lines Ray's C++ core worker writes to the driver's stderr that --quiet leaves out: they are not about
# the user's run (Ray Data hands every actor its arguments through the object store, and Ray warns
# about that for every actor pool).
QUIET_DROPPED = ("has constructor arguments in the object store and max_restarts > 0",)


@contextlib.contextmanager
def _ray_lines_dropped() -> Iterator[None]:
    """With --quiet: the driver's stderr (file descriptor 2, where Ray's C++ code writes) goes through
    a pipe whose reader drops QUIET_DROPPED's lines and passes every other line on, until the block ends.
    Processes Ray starts have their own stderr; nothing is held back when the block ends."""
    import sys
    import threading

    sys.stderr.flush()
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError, ImportError, AttributeError):  # room for Ray's bursts (Linux)
        import fcntl

        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        target = os.dup(saved)
        try:
            with os.fdopen(read_end, "rb") as lines:
                for line in lines:
                    while line and not any(p.encode() in line for p in QUIET_DROPPED):
                        line = line[os.write(target, line):]
        finally:
            os.close(target)

    thread = threading.Thread(target=forward, name="embedpipe-quiet-stderr", daemon=True)
    thread.start()
    interrupts.STDERR["fd"] = saved  # a signal's stop line goes straight to the terminal
    try:
        yield
    finally:
        sys.stderr.flush()
        interrupts.STDERR["fd"] = 2
        os.dup2(saved, 2)  # the pipe's last writer here is gone: the reader ends at its end
        os.close(saved)
        thread.join(timeout=2)


def _kill_local_monitor() -> None:
    """Kill the autoscaler monitor of the local cluster this process started, before ray.shutdown.

    ray.shutdown stops the GCS before the monitor, then sends the monitor SIGTERM, whose
    handler tries to report to the stopped GCS; Ray kills it after waiting one second (1.0 s
    of a 1.5 s shutdown, measured). A local cluster has nothing to autoscale, so the monitor
    is killed at once. Private Ray structures: if they change, shutdown is only slower.
    """
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        monitors = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []
    except (ImportError, AttributeError):
        return
    for info in monitors:
        if info.process.poll() is None:
            info.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # ray.shutdown must still run
                info.process.wait(timeout=5)


def prepare_output(output: str, storage_options: Mapping[str, Any] | None = None):
    """Check the output location up front; returns (filesystem, root).

    Local: the directory is created, and proven writable by writing a probe
    file. S3: the bucket must exist and be listable with these credentials;
    nothing is created (keys need no directories, and a bucket is never made).
    A file where the directory should be is refused on both.
    """
    try:
        fs, root = get_fs(output, storage_options)
    except (ImportError, ValueError) as exc:
        raise UsageError(f"--output {output}: {exc}") from None
    root = root.rstrip("/") or root
    where = f"--output {output}"
    check_bucket(fs, root, where)
    try:
        is_file = fs.isfile(root)
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}: {first_line(exc)}") from None
    if is_file:
        raise InputError(f"{where}: is a file, expected a directory")
    if is_local(fs):
        check_local_dir_writable(root, where)
    return fs, root
