"""Filesystems, in one place: local paths and s3:// URIs through fsspec.

Credentials come from the environment (AWS_* variables, profiles) or from
`storage_options`; they are passed explicitly and never logged. The
endpoint in `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` is passed on
explicitly too, because not every S3 client honours it.

Object stores have no directories and no rename: a file is committed by a
single PUT (or a completed multipart upload), which is only visible once
whole. Listings are never served from a stale cache: `get_fs` clears the
listing cache of the (process-wide, shared) S3 filesystem it returns, so a
decision such as "which files are committed?" sees what is there now.
"""

from __future__ import annotations

import errno
import os
import posixpath
import uuid
from typing import Any, Mapping

import fsspec
from fsspec.core import url_to_fs

from pipeline.errors import InputError, PipelineError

GLOB_CHARS = "*?["


def get_fs(path: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URI, with a fresh listing cache."""
    options = dict(storage_options or {})
    if path.startswith("s3://") or path.startswith("s3a://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "client_kwargs" not in options:
            options["endpoint_url"] = endpoint
        region = os.environ.get("AWS_REGION")  # not every botocore reads it; AWS_DEFAULT_REGION it does
        if region and not os.environ.get("AWS_DEFAULT_REGION"):
            client_kwargs = dict(options.get("client_kwargs") or {})
            client_kwargs.setdefault("region_name", region)
            options["client_kwargs"] = client_kwargs
    fs, inner = url_to_fs(path, **options)
    if not is_local(fs):
        fs.invalidate_cache()  # fsspec shares one instance per process and options; its listings may be old
    return fs, inner


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return hasattr(fs, "call_s3") and hasattr(fs, "split_path")


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def check_bucket(fs: fsspec.AbstractFileSystem, path: str, where: str) -> None:
    """On S3: the bucket of `path` exists and the credentials may list it, else InputError naming it.

    Nothing is created (s3fs's `mkdirs` would create a missing bucket).
    `where` starts the message, e.g. "--output s3://bucket/vectors".
    Local paths and other filesystems pass unchecked.
    """
    if not is_s3(fs):
        return
    from botocore.exceptions import BotoCoreError

    bucket, key, _ = fs.split_path(path)
    prefix = key[: min([key.index(c) for c in GLOB_CHARS if c in key] or [len(key)])]
    try:
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except FileNotFoundError:
        raise InputError(f"{where}: bucket {bucket!r} does not exist (embedpipe never creates buckets)") from None
    except PermissionError as exc:
        raise InputError(
            f"{where}: access to bucket {bucket!r} denied ({first_line(exc)}); check the credentials "
            "(AWS_* variables, profile, or --storage-options key/secret)"
        ) from None
    except (OSError, BotoCoreError, ValueError) as exc:
        raise InputError(f"{where}: cannot access bucket {bucket!r} ({exc.__class__.__name__}: {first_line(exc)})") from None


def check_local_dir_writable(directory: str, where: str) -> None:
    """Create `directory` if needed and prove it writable by writing a hidden probe file, else InputError.

    `os.access` is not enough: for root it says yes even where every write
    fails (/proc, read-only mounts).
    """
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        blocker = _file_in_the_way(directory)
        if blocker:
            raise InputError(f"{where}: {blocker} is a file, expected a directory") from None
        raise InputError(f"{where}: cannot create the directory ({_strerror(exc)})") from None
    probe = os.path.join(directory, f"_tmp.probe.{uuid.uuid4().hex}")
    try:
        with open(probe, "wb"):
            pass
    except OSError as exc:
        raise InputError(f"{where}: not writable ({_strerror(exc)})") from None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def _file_in_the_way(directory: str) -> str | None:
    """The nearest existing ancestor of `directory` (or itself) if it is not a directory."""
    path = os.path.abspath(directory)
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path if os.path.exists(path) and not os.path.isdir(path) else None


def _strerror(exc: OSError) -> str:
    return exc.strerror or first_line(exc)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, durable: bool = True,
                       shown: str | None = None) -> None:
    """Make `path` appear complete or not at all.

    Local: write a hidden temporary file in the same directory, fsync, rename.
    Object stores: one PUT (or a multipart upload, aborted on failure), which
    is only visible once complete. `durable=False` skips the fsyncs: for scratch
    files (a file's pieces) that a crash makes useless anyway. An error that
    retrying cannot heal (a full disk, a read-only file system, a denied write)
    is a PipelineError naming the condition and the path (`shown`, if given, instead of `path`).
    """
    try:
        _write_atomic(fs, path, data, durable)
    except OSError as exc:
        raise PipelineError(write_failure(exc, shown or (path if is_local(fs) else fs.unstrip_protocol(path)))) from exc


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, durable: bool) -> None:
    if is_local(fs):
        directory, name = os.path.split(path)
        os.makedirs(directory or ".", exist_ok=True)
        tmp = os.path.join(directory, f"_tmp.{name}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if durable:
            _fsync_dir(directory or ".")
    else:
        fs.pipe_file(path, data)


# OS errors on write that no retry heals: (what to call it, what to do), by errno
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space, then rerun to resume"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota, then rerun to resume"),
    errno.EROFS: ("read-only file system", "make the output writable, then rerun to resume"),
    errno.EACCES: ("permission denied", "fix the output's permissions (on S3: the credentials' right to write), "
                                        "then rerun to resume"),
    errno.EPERM: ("operation not permitted", "fix the output's permissions, then rerun to resume"),
}


def write_failure(exc: OSError, path: str) -> str:
    """'no space left on device writing out/x.parquet: free space, then rerun to resume', and the like."""
    code = exc.errno if isinstance(exc.errno, int) else (errno.EACCES if isinstance(exc, PermissionError) else None)
    what, todo = _WRITE_ERRORS.get(code, (None, "then rerun to resume"))
    if what is None:
        what = (exc.strerror or first_line(exc)).lower()
    return f"{what} writing {path}: {todo}"


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
