"""Input discovery: files, directories, globs, `datasets` directories and s3:// URIs.

Each input file is a *shard*, named by its key (its path relative to the
input root), which ids and output file names are built from. Files that are
empty (0 bytes) or need a codec that is not installed are refused here,
before any worker starts.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any, Mapping

from fsspec.utils import infer_compression

from pipeline.errors import InputError
from pipeline.storage.filesystems import check_bucket, get_fs, is_local

log = logging.getLogger(__name__)

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")


@dataclass(frozen=True)
class Shard:
    path: str  # local path, or the full URI (s3://...) of a remote file
    key: str  # path relative to the input root; used in ids and output names
    format: str
    size: int


def compression_of(path: str) -> str | None:
    name = path.lower()
    return next((ext for ext in COMPRESSIONS if name.endswith(ext)), None)


def shard_format(path: str) -> str | None:
    name = path.lower()
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return FORMATS.get(posixpath.splitext(name)[1])


def output_stem(key: str) -> str:
    """Flat, deterministic output file stem for a shard key."""
    return key.replace("/", "__")


def discover_shards(input_path: str, storage_options: Mapping[str, Any] | None = None) -> list[Shard]:
    """Every shard under `input_path`, sorted by key. Raises InputError if none."""
    try:
        fs, path = get_fs(input_path, storage_options)
    except (ImportError, ValueError) as exc:
        raise InputError(f"--input {input_path}: {exc}") from None
    path = path.rstrip("/") or path
    check_bucket(fs, path, f"--input {input_path}")
    try:
        if any(ch in path for ch in "*?["):
            root = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
            files = [p for p in fs.glob(path) if fs.isfile(p)]
            if not files:
                raise InputError(f"--input {input_path}: the glob matches no files")
            explicit = True
        elif fs.isdir(path):
            root = path
            files = _hf_dataset_files(fs, path)
            explicit = files is not None
            if files is None:
                files = _walk(fs, path)
        elif fs.isfile(path):
            root = posixpath.dirname(path)
            files = [path]
            explicit = True
        else:
            raise InputError(f"--input {input_path}: no such file or directory")
    except (PermissionError, FileNotFoundError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"--input {input_path}: {describe_os_error(exc)}") from None

    shards, skipped = [], []
    for p in sorted(files):
        fmt = shard_format(p)
        if fmt is None:
            if explicit and fs.isfile(p) and len(files) == 1:
                raise InputError(
                    f"--input {p}: unsupported file type (expected {', '.join(sorted(FORMATS))})"
                )
            skipped.append(p)
            continue
        key = posixpath.relpath(p, root) if root else p
        shards.append(_checked_shard(fs, p, key, fmt))
    if skipped:
        log.warning("skipping %d file(s) of unsupported type, e.g. %s", len(skipped), skipped[0])
    if not shards:
        raise InputError(
            f"--input {input_path}: no files of a supported type ({', '.join(sorted(FORMATS))})"
        )
    return shards


def _checked_shard(fs, path: str, key: str, fmt: str) -> Shard:
    """The shard at `path`, refused now if it cannot hold a row or cannot be decompressed here."""
    size = int(fs.info(path).get("size") or 0)
    if size == 0:
        raise InputError(f"{key}: the file is empty (0 bytes)")
    codec = compression_of(path)
    if codec is not None and infer_compression(path) is None:  # fsspec knows .zst only with zstandard
        raise InputError(f"{key}: no {codec} codec installed (for .zst: pip install zstandard)")
    uri = path if is_local(fs) else fs.unstrip_protocol(path)  # read tasks rebuild the filesystem from it
    return Shard(path=uri, key=key, format=fmt, size=size)


def _walk(fs, root: str) -> list[str]:
    """Files under `root`, skipping hidden ones; a `datasets` directory contributes its Arrow files."""
    out: list[str] = []
    for directory, dirs, files in fs.walk(root):
        rel = posixpath.relpath(directory, root)
        if rel != "." and _hidden(rel):
            dirs.clear()
            continue
        hf = _hf_dataset_files(fs, directory) if directory != root else None
        if hf is not None:
            out += hf
            dirs.clear()
            continue
        out += [posixpath.join(directory, f) for f in files if not f.startswith((".", "_"))]
    return out


def _hidden(relpath: str) -> bool:
    return any(part.startswith((".", "_")) for part in relpath.split("/"))


def describe_os_error(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return text.splitlines()[0]


def _hf_dataset_files(fs, path: str) -> list[str] | None:
    """Arrow files of a `datasets` directory written by save_to_disk, else None."""
    state = posixpath.join(path, "state.json")
    if fs.isfile(state):
        files = _dataset_json(fs, state, lambda d: [entry["filename"] for entry in d.get("_data_files", [])])
        return [posixpath.join(path, name) for name in files]
    dataset_dict = posixpath.join(path, "dataset_dict.json")
    if fs.isfile(dataset_dict):
        splits = _dataset_json(fs, dataset_dict, lambda d: [str(split) for split in d.get("splits", [])])
        out: list[str] = []
        for split in splits:
            out += _hf_dataset_files(fs, posixpath.join(path, split)) or []
        return out
    return None


def _dataset_json(fs, path: str, extract) -> list[str]:
    """`extract(parsed JSON)` of a `datasets` metadata file; InputError naming the file if it is malformed."""
    try:
        with fs.open(path, "rb") as f:
            return extract(json.load(f))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a valid `datasets` metadata file ({exc.__class__.__name__}: {exc})") from None
