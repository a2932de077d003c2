"""Reading embeddings back: `read_embeddings(path) -> (ids, float32 matrix)`, and for a sparse
model's output `read_sparse_embeddings(path) -> (ids, scipy.sparse.csr_matrix)`."""

from __future__ import annotations

import posixpath
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.identity import check_consistent, names_to_paths
from pipeline.storage.filesystems import get_fs


def embedding_files(path: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Committed Parquet files of an output directory (or the file itself), sorted."""
    fs, root = get_fs(path, storage_options)
    root = root.rstrip("/") or root
    if fs.isfile(root):
        return [root]
    if not fs.isdir(root):
        raise InputError(f"{path}: no such file or directory")
    files = [
        p
        for p in fs.ls(root, detail=False)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", "."))
    ]
    return sorted(files)


def checked_files(path: str, storage_options: Mapping[str, Any] | None = None, allow_mixed: bool = False) -> list[str]:
    """`embedding_files`, refusing (InputError naming the file) an output whose files were made with
    different models or settings, or that holds a file its runs did not write (pipeline.identity);
    `allow_mixed` reads them all the same."""
    files = embedding_files(path, storage_options)
    fs, root = get_fs(path, storage_options)
    root = root.rstrip("/") or root
    if not allow_mixed and not (len(files) == 1 and files[0] == root):  # a directory, not one file
        check_consistent(fs, root, names_to_paths(files), path)
    return files


def read_embeddings(
    path: str, storage_options: Mapping[str, Any] | None = None, columns: list[str] | None = None,
    allow_mixed: bool = False,
) -> tuple[list[str], np.ndarray]:
    """All ids and vectors under `path`, in file order, as (list of str, float32 array [N, dim]).

    An output whose files disagree on the model or settings that made them is refused (InputError
    naming the file) unless `allow_mixed`."""
    fs, _ = get_fs(path, storage_options)
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    dim = None
    for file in checked_files(path, storage_options, allow_mixed):
        table = _read_vectors(fs, file)
        emb = table["embedding"].combine_chunks()
        if isinstance(emb.type, pa.FixedSizeListType):
            dim = emb.type.list_size
        values = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        if dim is None:
            dim = len(values) // max(1, table.num_rows)
        blocks.append(values.reshape(-1, dim))
        ids += table["id"].to_pylist()
    if not blocks:
        return [], np.zeros((0, dim or 0), np.float32)
    return ids, np.concatenate(blocks)


def read_sparse_embeddings(path: str, storage_options: Mapping[str, Any] | None = None, dim: int | None = None,
                           allow_mixed: bool = False):
    """All ids and sparse vectors under `path` (written with a sparse model), in file order, as
    (list of str, float32 scipy.sparse.csr_matrix [N, dim]). `dim` defaults to the manifest's
    vocabulary size. Files of different settings are refused unless `allow_mixed`, as in read_embeddings."""
    import scipy.sparse

    fs, root = get_fs(path, storage_options)
    if dim is None:
        dim = _manifest_dim(fs, root)
    ids: list[str] = []
    cols, vals, sizes = [], [], []
    for file in checked_files(path, storage_options, allow_mixed):
        table = _read_columns(fs, file, ["id", "indices", "values"], "a sparse embeddings file")
        indices, values = table["indices"].combine_chunks(), table["values"].combine_chunks()
        offsets = np.asarray(indices.offsets)
        cols.append(np.asarray(indices.values.to_numpy(zero_copy_only=False))[offsets[0] : offsets[-1]])
        vals.append(np.asarray(values.values.to_numpy(zero_copy_only=False), np.float32)[offsets[0] : offsets[-1]])
        sizes.append(np.diff(offsets))
        ids += table["id"].to_pylist()
    col = np.concatenate(cols) if cols else np.zeros(0, np.int32)
    indptr = np.zeros(len(ids) + 1, np.int64)
    if sizes:
        np.cumsum(np.concatenate(sizes), out=indptr[1:])
    width = dim if dim is not None else int(col.max(initial=-1)) + 1
    data = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    return ids, scipy.sparse.csr_matrix((data, col, indptr), shape=(len(ids), width))


def _manifest_dim(fs, root: str) -> int | None:
    from pipeline.manifest import read

    try:
        manifest = read(fs, root.rstrip("/"))
    except OSError:
        return None
    return (manifest or {}).get("dim")


def _read_vectors(fs, file: str) -> pa.Table:
    """The id and embedding columns of one file; InputError naming the file if it has none."""
    with fs.open(file, "rb") as f:
        names = pq.read_schema(f).names
    if "embedding" not in names and {"indices", "values"} <= set(names):
        raise InputError(f"{file}: holds sparse vectors (indices, values); read them with read_sparse_embeddings")
    return _read_columns(fs, file, ["id", "embedding"], "an embeddings file with id and embedding columns")


def _read_columns(fs, file: str, columns: list[str], what: str) -> pa.Table:
    try:
        with fs.open(file, "rb") as f:
            return pq.read_table(f, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise InputError(f"{file}: not {what} ({first})") from None
