"""Filesystems, in one place: local paths and s3:// URIs through fsspec.

Credentials come from the environment (AWS_* variables, profiles) or from
`storage_options`; they are passed explicitly and never logged.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any, Mapping

import fsspec
from fsspec.core import url_to_fs


def get_fs(path: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    options = dict(storage_options or {})
    if path.startswith("s3://") or path.startswith("s3a://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "client_kwargs" not in options:
            options["endpoint_url"] = endpoint
    fs, inner = url_to_fs(path, **options)
    return fs, inner


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `path` appear complete or not at all.

    Local: write a hidden temporary file in the same directory, fsync, rename.
    Object stores: a single PUT/multipart upload is only visible once complete.
    """
    if is_local(fs):
        directory, name = os.path.split(path)
        os.makedirs(directory or ".", exist_ok=True)
        tmp = os.path.join(directory, f"_tmp.{name}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(directory or ".")
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


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
