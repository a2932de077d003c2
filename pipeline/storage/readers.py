"""Reading embeddings back: `read_embeddings(path) -> (ids, matrix)` (float32, or the stored
int8/uint8/binary/ubinary values), for a sparse model's output `read_sparse_embeddings(path) ->
(ids, scipy.sparse.csr_matrix)`, and `quantize_queries(vectors, path)`: queries stored as the run
stored its documents, for searching an index built on the output."""

from __future__ import annotations

import json
import posixpath
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.identity import check_consistent, names_to_paths, read_run
from pipeline.quantization import VectorFormat, from_column, normalized
from pipeline.storage import lance_sink
from pipeline.storage.filesystems import get_fs
from pipeline.storage.lance_sink import is_lance
from pipeline.storage.sink import SETTINGS_KEY


class NotParquet(InputError):
    """An embeddings output that is a Lance dataset (embed --format lance), where Parquet files are read."""


def embedding_files(path: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Committed Parquet files of an output directory (or the file itself), sorted."""
    fs, root = get_fs(path, storage_options)
    root = root.rstrip("/") or root
    if fs.isfile(root):
        return [root]
    if not fs.isdir(root):
        raise InputError(f"{path}: no such file or directory")
    if is_lance(fs, root):
        raise NotParquet(f"{path}: a Lance dataset (embed --format lance); mine, search and rerank read Parquet "
                         "outputs: read it with pipeline.read_embeddings or lance.dataset(), or embed with --format parquet")
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
    allow_mixed: bool = False, dequantize: bool = False,
) -> tuple[list[str], np.ndarray]:
    """All ids and vectors under `path`, in file order, as (list of str, array [N, width]): float32
    for float32/float16 outputs; for int8/uint8/binary/ubinary outputs the stored values (binary:
    dim/8 packed bytes a row), or with `dequantize` float32 [N, dim] (int8/uint8: each bucket's
    centre between the run's ranges; binary: +1/-1), as `embedpipe mine` reads them.

    An output whose files disagree on the model or settings that made them is refused (InputError
    naming the file) unless `allow_mixed`."""
    fs, root = get_fs(path, storage_options)
    if fs.isdir(root) and is_lance(fs, root):  # --format lance (pipeline.storage.lance_sink)
        table = lance_sink.read_vectors(path, storage_options, allow_mixed)
        if table is None or not table.num_rows:
            return [], np.zeros((0, 0), np.float32)
        return table["id"].to_pylist(), output_format(path, storage_options).decode(vectors_of(table["embedding"]),
                                                                                    dequantize)
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    for file in checked_files(path, storage_options, allow_mixed):
        table, fmt = _read_vectors(fs, file)
        blocks.append(fmt.decode(vectors_of(table["embedding"]), dequantize))
        ids += table["id"].to_pylist()
    if not blocks:
        return [], np.zeros((0, 0), np.float32)
    return ids, np.concatenate(blocks)


def vectors_of(column: pa.ChunkedArray) -> np.ndarray:
    """An embedding column (fixed-size or plain lists) as a (rows, width) array of its value type."""
    column = column.combine_chunks()
    if isinstance(column.type, pa.FixedSizeListType):
        return from_column(column)
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(len(column), -1) if len(column) else values.reshape(0, 0)


def file_format(fs, file: str, schema: pa.Schema | None = None) -> VectorFormat:
    """What the vectors of one file are (its `embedpipe.settings` metadata); float32 for a file
    without them (an older embedpipe, or not embedpipe)."""
    if schema is None:
        with fs.open(file, "rb") as f:
            schema = pq.read_schema(f)
    raw = (schema.metadata or {}).get(SETTINGS_KEY)
    settings = json.loads(raw).get("settings") if raw else None
    kind = schema.field("embedding").type if "embedding" in schema.names else None
    width = kind.list_size if isinstance(kind, pa.FixedSizeListType) else None
    return VectorFormat.from_settings(settings, width)


def output_format(path: str, storage_options: Mapping[str, Any] | None = None) -> VectorFormat:
    """What an output's vectors are: its `_run.json`, else its manifest, else its first file's settings."""
    from pipeline.manifest import read

    fs, root = get_fs(path, storage_options)
    root = root.rstrip("/") or root
    run = read_run(fs, root) if fs.isdir(root) else None
    if run is not None:
        return VectorFormat.from_settings(run["settings"])
    manifest = read(fs, root) if fs.isdir(root) else None
    if manifest and (manifest.get("identity") or {}).get("settings"):
        return VectorFormat.from_settings(manifest["identity"]["settings"])
    files = embedding_files(path, storage_options)
    if not files:
        raise InputError(f"{path}: holds no embeddings")
    return file_format(fs, files[0])


def quantize_queries(vectors, path: str, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Query vectors (float, [n, model dim] or [n, dim]) stored exactly as the output at `path` stored
    its documents: truncated and normalised again as the run did, quantised with its precision and,
    for int8/uint8, the ranges in its manifest. Float outputs get float32 (float16 for float16)."""
    fmt = output_format(path, storage_options)
    vectors = np.atleast_2d(np.asarray(vectors, np.float32))
    width = vectors.shape[1]
    if fmt.dim is not None and width != fmt.dim and not (fmt.truncate_dim is not None and width > fmt.truncate_dim):
        raise InputError(f"{path}: holds {fmt.dim}-dimensional vectors; the queries have {width}")
    if fmt.normalize:  # the run's vectors were unit vectors before any truncation (idempotent on unit vectors)
        vectors = normalized(vectors)
    return fmt.quantize(fmt.finish(vectors))


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


def _read_vectors(fs, file: str) -> tuple[pa.Table, VectorFormat]:
    """The id and embedding columns of one file and what its vectors are; InputError naming the file
    if it has none."""
    with fs.open(file, "rb") as f:
        schema = pq.read_schema(f)
    if "embedding" not in schema.names and {"indices", "values"} <= set(schema.names):
        raise InputError(f"{file}: holds sparse vectors (indices, values); read them with read_sparse_embeddings")
    table = _read_columns(fs, file, ["id", "embedding"], "an embeddings file with id and embedding columns")
    return table, file_format(fs, file, schema)


def _read_columns(fs, file: str, columns: list[str], what: str) -> pa.Table:
    try:
        with fs.open(file, "rb") as f:
            return pq.read_table(f, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise InputError(f"{file}: not {what} ({first})") from None
