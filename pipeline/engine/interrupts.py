"""Ctrl-C and SIGTERM for the command line: one line, exit 130 or 143, Ray's processes gone at once.

The CLI (`pipeline.cli`) installs `on_signal` for SIGINT and SIGTERM in its main thread; `ray.init`
replaces the SIGTERM handler with its own (`sys.exit(15)`), so `pipeline.engine.cluster` installs
ours again after it (`reinstall`).

A signal stops the command where it is, as kill -9 would, but tidily: every process the command
started (a local Ray cluster's daemons, its workers and actors) is killed, then the output's lock
is released (pipeline.storage.lock), the line is printed, and the process exits with 128 + the
signal. The lock's heartbeat uses the same path (an interrupt of the main thread) to stop a run
whose lock another run took over, with exit status 1. Unwinding through `ray.shutdown` instead was measured to be unreliable: Ray Data's threads,
still running, touch Ray after it is down, which logs tracebacks ("Ray is not initialized"),
starts a new local Ray from a thread ("SIGTERM handler is not set ..."), or has Ray's core worker
end the process with exit status 1. Nothing committed is lost: a file is committed by one atomic
rename or PUT, and what was in flight (`_tmp.*`, `_pieces/`) is cleared by the rerun, which
resumes. On a cluster the command joined (`ray job submit`), only the driver's own processes are
killed; Ray ends the job's actors when its driver is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

PROG = "embedpipe"
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"installed": False, "stopping": False}


def install() -> None:
    """Our handlers for SIGINT and SIGTERM (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _state["installed"] = True
    for signum in SIGNALS:
        signal.signal(signum, on_signal)


# Where the stop line goes: the terminal's stderr, also while --quiet passes fd 2 through a filter thread
# (pipeline.engine.cluster), which an exit from a signal handler would not wait for.
STDERR = {"fd": 2}


def reinstall() -> None:
    """After `ray.init`, which sets a SIGTERM handler of its own: ours again, if the CLI installed them."""
    if _state["installed"]:
        install()


def stop_line(signum: int) -> str:
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return f"{PROG}: {what}; rerun the same command to resume"


def on_signal(signum: int, frame) -> None:
    if _state["stopping"]:  # a second signal while stopping: out at once
        os._exit(128 + signum)
    _state["stopping"] = True
    code = 128 + signum
    try:  # nothing may escape into the code the signal interrupted (a write to stderr, say)
        logging.disable(logging.CRITICAL)
        from pipeline.storage import lock

        if lock.LOST:  # not a signal from outside: the lock's heartbeat found another run holding it
            line, code = f"{PROG}: error: {lock.LOST[0]}", 1
        else:
            line = stop_line(signum)
        kill_descendants()  # first: nothing of this run may write once the lock is gone
        lock.release_held()
        os.write(STDERR["fd"], (line + "\n").encode())
    except BaseException:  # noqa: BLE001
        pass
    os._exit(code)


def kill_descendants() -> None:
    """SIGKILL every process this one started, children first listed last (psutil, which Ray needs)."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001
        return
    for child in reversed(children):
        try:
            child.kill()
        except Exception:  # noqa: BLE001 - gone already
            continue
