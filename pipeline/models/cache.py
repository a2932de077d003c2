"""What embedpipe derives from a model once and keeps: `$EMBEDPIPE_CACHE`, else `~/.cache/embedpipe`.

Two kinds of entries: the int8 ONNX graph (pipeline.models.quantize) and the model's
description with its tokenizer spec (pipeline.models.describe). Entries are written
atomically; a cache that cannot be written only costs the next run the work
again.
"""

from __future__ import annotations

import hashlib
import logging
import os

log = logging.getLogger(__name__)


def cache_dir() -> str:
    return os.environ.get("EMBEDPIPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "embedpipe")


def entry_path(kind: str, key: str, suffix: str) -> str:
    """Where the entry of `kind` for `key` (any string; it is hashed) lives."""
    return os.path.join(cache_dir(), kind, hashlib.sha256(key.encode()).hexdigest()[:32] + suffix)


def read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def write(path: str, data: bytes) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home only costs the next run the work again
        log.warning("could not write the cache entry %s: %s", path, exc)


def versions_and_code(libraries: tuple[str, ...], modules: tuple[str, ...]) -> dict:
    """The installed versions of `libraries` and a hash of embedpipe's own `modules` (file names in
    pipeline/models/): part of an entry's key, so that an upgrade or an edited checkout derives it anew."""
    from importlib import metadata

    versions = {}
    for name in libraries:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    code = hashlib.sha256()
    for name in modules:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            code.update(f.read())
    return {"versions": versions, "code": code.hexdigest()}


def directory_signature(path: str) -> str:
    """Names, sizes and modification times of a directory's files: changes whenever a file does,
    without reading them (a model's weights are hundreds of MiB)."""
    parts = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            parts.append(f"{os.path.relpath(full, path)}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)
