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
# --document-per-file: these files (and files without a suffix: METADATA, copyright) are one document each
DOCUMENT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".html", ".htm", "")
DATASET_FILES = ("state.json", "dataset_dict.json")  # a `datasets` directory written by save_to_disk


@dataclass(frozen=True)
class Shard:
    path: str  # local path, or the full URI (s3://...) of a remote file
    key: str  # path relative to the input root; used in ids and output names
    format: str
    size: int
    version: str = ""  # what the listing says of its content: S3's ETag, a local file's mtime ('' unknown)


def compression_of(path: str) -> str | None:
    name = path.lower()
    return next((ext for ext in COMPRESSIONS if name.endswith(ext)), None)


def _suffix(path: str) -> str:
    """A file name's suffix under its compression (`a.JSONL.gz` -> `.jsonl`), '' for none."""
    name = posixpath.basename(path).lower()
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return posixpath.splitext(name)[1]


def shard_format(path: str) -> str | None:
    return FORMATS.get(_suffix(path))


def document_format(path: str) -> str | None:
    """'document' for a text file read whole as one document (--document-per-file), else None."""
    return "document" if _suffix(path) in DOCUMENT_SUFFIXES else None


def output_stem(key: str) -> str:
    """Flat, deterministic output file stem for a shard key: `/` becomes `__`, and a name that would
    start with `_` or `.` (which Parquet and Arrow readers skip as hidden) starts with `+` instead."""
    stem = key.replace("/", "__")
    return "+" + stem if stem.startswith(("_", ".")) else stem


def discover_shards(
    input_path: str, storage_options: Mapping[str, Any] | None = None, documents: bool = False,
) -> list[Shard]:
    """Every shard under `input_path`, sorted by key. Raises InputError if none.

    The input is listed once (fsspec `find`/`glob` with sizes: paginated listings on S3, no request
    per file). `documents` (--document-per-file): every text file (`DOCUMENT_SUFFIXES`, or no suffix)
    is one document, and may be empty."""
    try:
        fs, path = get_fs(input_path, storage_options)
    except (ImportError, ValueError) as exc:
        raise InputError(f"--input {input_path}: {exc}") from None
    path = path.rstrip("/") or path
    check_bucket(fs, path, f"--input {input_path}")
    try:
        root, sizes, explicit = _listing(fs, path, input_path, documents)
    except (PermissionError, FileNotFoundError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"--input {input_path}: {describe_os_error(exc)}") from None

    kind = document_format if documents else shard_format
    shards, skipped = [], []
    for p in sorted(sizes):
        fmt = kind(p)
        if fmt is None:
            if explicit and len(sizes) == 1:
                expected = "text files (.txt, .md, .rst, .html, or no suffix)" if documents else ", ".join(sorted(FORMATS))
                raise InputError(f"--input {p}: unsupported file type (expected {expected})")
            skipped.append(p)
            continue
        key = posixpath.relpath(p, root) if root else p
        shards.append(_checked_shard(fs, p, key, fmt, *sizes[p]))
    if skipped:
        log.warning("skipping %d file(s) of unsupported type, e.g. %s", len(skipped), skipped[0])
    if not shards:
        raise InputError(
            f"--input {input_path}: no files of a supported type ({', '.join(sorted(FORMATS))})"
            if not documents else f"--input {input_path}: no text files (.txt, .md, .rst, .html, or no suffix)"
        )
    return shards


def check_fields(shards: list[Shard], id_field: str | None, keep_columns, text_field: str) -> None:
    """InputError if a plain text shard (one row a line, a single column) is asked for other fields."""
    wanted = ([f"--id-field {id_field}"] if id_field else []) + [
        f"--keep-columns {col}" for col in keep_columns if col != text_field]
    plain = next((s for s in shards if s.format == "txt"), None)
    if wanted and plain is not None:
        raise InputError(f"{plain.key}: a plain text file has no fields, only its lines, so {wanted[0]} cannot be "
                         f"read from it (use JSONL, CSV or Parquet for ids and other columns)")


def _listing(fs, path: str, input_path: str, documents: bool) -> tuple[str, dict[str, tuple[int, str]], bool]:
    """(the root keys are relative to, {file: (bytes, version)}, whether the files were named explicitly).
    With --document-per-file a folder is documents, never a `datasets` directory."""
    if any(ch in path for ch in "*?["):
        root = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
        found = fs.glob(path, detail=True)
        sizes = _files(found)
        if not sizes:
            raise InputError(f"--input {input_path}: the glob matches no files")
        return root, sizes, True
    if fs.isdir(path):
        files = None if documents else _hf_dataset_files(fs, path)
        if files is not None:
            return path, _sizes_of(fs, path, files), True
        return path, _walk(fs, path, documents), False
    if fs.isfile(path):
        return posixpath.dirname(path), {path: _facts(fs.info(path))}, True
    raise InputError(f"--input {input_path}: no such file or directory")


def _facts(info: Mapping[str, Any]) -> tuple[int, str]:
    """(bytes, version) of a listed file: the version changes when its content does (ETag, mtime)."""
    version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
    return int(info.get("size") or 0), str(version).strip('"')


def _files(listing: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[int, str]]:
    """The files of a listing: not folders, nor S3's folder markers (`name/`, or an empty object
    whose name is a folder of other listed keys)."""
    folders = {posixpath.dirname(p) for p in listing}
    return {p: _facts(info) for p, info in listing.items()
            if info.get("type", "file") == "file" and not p.endswith("/")
            and not (p in folders and not int(info.get("size") or 0))}


def _checked_shard(fs, path: str, key: str, fmt: str, size: int, version: str = "") -> Shard:
    """The shard at `path`, refused now if it cannot hold a row or cannot be decompressed here."""
    if size == 0 and fmt != "document":  # an empty document is counted, not embedded
        raise InputError(f"{key}: the file is empty (0 bytes)")
    codec = compression_of(path)
    if codec is not None and infer_compression(path) is None:  # fsspec knows .zst only with zstandard
        raise InputError(f"{key}: no {codec} codec installed (for .zst: pip install zstandard)")
    uri = path if is_local(fs) else fs.unstrip_protocol(path)  # read tasks rebuild the filesystem from it
    return Shard(path=uri, key=key, format=fmt, size=size, version=version)


def _walk(fs, root: str, documents: bool = False) -> dict[str, tuple[int, str]]:
    """{file: bytes} under `root` from one recursive listing, skipping hidden files and folders
    (names starting with `.` or `_`); a `datasets` directory contributes its Arrow files."""
    listing = fs.find(root, detail=True, withdirs=False)
    sizes = {p: facts for p, facts in _files(listing).items() if not _hidden(posixpath.relpath(p, root))}
    datasets: list[str] = []
    for p in sorted(sizes) if not documents else ():
        directory = posixpath.dirname(p)
        if posixpath.basename(p) in DATASET_FILES and not any(_under(directory, d) for d in datasets):
            datasets.append(directory)
    for directory in datasets:
        files = _hf_dataset_files(fs, directory) or []
        sizes = {p: facts for p, facts in sizes.items() if not _under(p, directory)}
        sizes.update(_sizes_of(fs, directory, files, listing))
    return sizes


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _sizes_of(fs, directory: str, files: list[str],
              listing: Mapping[str, Any] | None = None) -> dict[str, tuple[int, str]]:
    """Sizes of a `datasets` directory's Arrow files: from `listing`, else one listing of the directory."""
    if listing is None:
        listing = fs.find(directory, detail=True, withdirs=False)
    return {p: _facts(listing[p]) if p in listing else _facts(fs.info(p)) for p in files}


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
