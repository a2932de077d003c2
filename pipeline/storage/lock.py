"""One run per output at a time: `_lock.json` in the output directory (hidden from readers).

A run takes the lock before it reads or changes anything in the output, and removes it when it
ends, whether it succeeded or not. The lock holds its owner: command, user, host, pid, start time,
a token, and a heartbeat that a daemon thread renews every HEARTBEAT_S seconds.

Taking it is one atomic create that fails when the file exists: on a local or shared filesystem
a complete temporary file hard-linked to the lock's name (`link` fails if the name exists, also
on NFS); on S3 a conditional PUT (`If-None-Match: *`). A second run finds the lock and is refused
with one line naming the owner, unless the lock is stale:

- its owner ran on this host and its pid is gone (a run killed with kill -9, or that crashed), or
- its heartbeat is older than STALE_AFTER_S seconds (a run on a lost node, or killed on another
  host; the hosts' clocks are assumed to agree within a minute).

A stale lock is removed (only if it is still the same lock) and the new run takes its place,
saying so in a warning. `--overwrite` takes the same lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from pipeline.errors import PipelineError, UsageError
from pipeline.storage.filesystems import is_local, write_bytes_atomic

log = logging.getLogger(__name__)

LOCK_FILE = "_lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_HELD: dict[str, tuple] = {}  # token -> (fs, path): what release_held removes when a signal stops the process


@contextlib.contextmanager
def output_lock(fs, root: str, output: str, command: str) -> Iterator[dict]:
    """Hold the output's lock for the duration of the block (see the module's docstring)."""
    path = posixpath.join(root, LOCK_FILE)
    mine = _take(fs, path, output, command)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(fs, path, mine, stop), name="embedpipe-lock", daemon=True)
    beat.start()
    _HELD[mine["token"]] = (fs, path, stop)
    try:
        yield mine
    finally:
        _HELD.pop(mine["token"], None)
        stop.set()
        beat.join(timeout=5)
        _remove_if_ours(fs, path, mine["token"])
    if LOST:
        raise PipelineError(LOST[0])


def release_held() -> None:
    """Remove the locks this process holds (pipeline.engine.interrupts, as a signal stops it)."""
    for token, (fs, path, stop) in list(_HELD.items()):
        stop.set()
        _remove_if_ours(fs, path, token)


def _take(fs, path: str, output: str, command: str) -> dict:
    for _ in range(3):
        mine = _document(command)
        if _create(fs, path, json.dumps(mine, indent=2).encode()):
            if is_local(fs) or (read_lock(fs, path) or {}).get("token") == mine["token"]:
                return mine
            continue  # on S3 a stale-lock takeover by another run raced ours: look again
        holder = read_lock(fs, path)
        if holder is None:  # removed in between: try again
            continue
        why = stale_reason(holder)
        if why is None:
            raise UsageError(
                f"--output {output} is in use by {describe(holder)}; one run per output at a time: wait for "
                f"it to end (a lock left by a run that died is taken over once stale: its pid gone on the "
                f"same host, or no heartbeat for {STALE_AFTER_S / 60:g} min)"
            )
        log.warning("--output %s: taking over the lock of %s: %s", output, describe(holder), why)
        _remove_stale(fs, path, holder.get("token"))
    raise UsageError(f"--output {output}: another run keeps taking its lock ({LOCK_FILE}); try again")


def _document(command: str) -> dict[str, Any]:
    now = time.time()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = str(os.getuid())
    return {
        "command": f"embedpipe {command}", "user": user, "host": socket.gethostname(), "pid": os.getpid(),
        "machine": _machine(), "started": _iso(now), "heartbeat": _iso(now), "heartbeat_unix": now,
        "token": uuid.uuid4().hex,
    }


def _machine() -> str:
    """This boot of this machine and this process namespace: two containers sharing a host name (or a
    pid) differ here, so neither mistakes the other's live run for a dead one."""
    parts = []
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            parts.append(f.read().strip())
    except OSError:
        pass
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return ":".join(parts)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def _create(fs, path: str, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists, atomically; False if it exists."""
    if is_local(fs):
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f"_tmp.{LOCK_FILE}.{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except (FileExistsError, FileNotFoundError):  # taken; or a run holding it cleared our temporary file
            return False
        except OSError:  # no hard links here (vfat, some FUSE and CIFS mounts): an exclusive create instead
            return _create_exclusive(path, data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except (FileExistsError, OSError) as exc:  # 412 Precondition Failed: the object exists
        if fs.exists(path):
            return False
        raise UsageError(f"{path}: cannot create the output's lock ({exc})") from None


def _create_exclusive(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def read_lock(fs, path: str) -> dict | None:
    """The lock at `path`; None if there is none. One that cannot be read is reported as an unknown owner."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(data)
        return holder if isinstance(holder, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def stale_reason(holder: dict, now: float | None = None) -> str | None:
    """Why the lock `holder` no longer protects a live run, or None if it may."""
    now = time.time() if now is None else now
    here = holder.get("host") == socket.gethostname() and holder.get("machine", _machine()) == _machine()
    if here and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
        return f"its process (pid {holder['pid']}) is gone"
    beat = holder.get("heartbeat_unix")
    if not isinstance(beat, (int, float)):
        return "it is unreadable" if not holder else None
    if now - beat > STALE_AFTER_S:
        return f"no heartbeat for {(now - beat) / 60:.0f} min"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def describe(holder: dict) -> str:
    if not holder:
        return "a run whose lock cannot be read"
    seen = holder.get("heartbeat_unix")
    ago = f", last seen {time.time() - seen:.0f} s ago" if isinstance(seen, (int, float)) else ""
    return (f"{holder.get('command', 'embedpipe')} (pid {holder.get('pid')} on {holder.get('host')}, "
            f"user {holder.get('user')}, started {holder.get('started')}{ago})")


def _heartbeat(fs, path: str, mine: dict, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            held = read_lock(fs, path)
            if not held or held.get("token") != mine["token"]:
                _lost(f"another run took over the output's lock ({path}) after this one stopped beating for "
                      f"{STALE_AFTER_S / 60:g} min: {describe(held or {})}; this run stops and leaves the output to it")
                return
            now = time.time()
            mine.update(heartbeat=_iso(now), heartbeat_unix=now)
            write_bytes_atomic(fs, path, json.dumps(mine, indent=2).encode(), durable=False)
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat must not end the run
            log.debug("lock heartbeat failed: %s", exc)


LOST: list[str] = []  # why this process lost its lock, once it has


def _lost(message: str) -> None:
    """The run must stop: interrupt the main thread (the CLI's handler prints LOST[0] and exits 1)."""
    import _thread

    LOST.append(message)
    log.error("%s", message)
    _thread.interrupt_main()


def _remove_stale(fs, path: str, token: str | None) -> None:
    """Remove the stale lock `token`, never another: locally it is first renamed aside (atomic), then
    checked, and put back if a new lock had replaced it in between; on S3, read then removed."""
    if not is_local(fs):
        _remove_if_ours(fs, path, token)
        return
    aside = f"{path}.stale.{uuid.uuid4().hex}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    held = read_lock(fs, aside)
    if held is not None and held.get("token") != token:  # a new lock came between: give it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(aside)


def _remove_if_ours(fs, path: str, token: str | None) -> None:
    held = read_lock(fs, path)
    if held is not None and held.get("token") == token:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
