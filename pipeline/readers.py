"""Reading embeddings back: `read_embeddings(path) -> (ids, float32 matrix)`."""

from __future__ import annotations

import posixpath
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.storage import get_fs


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


def read_embeddings(
    path: str, storage_options: Mapping[str, Any] | None = None, columns: list[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """All ids and vectors under `path`, in file order, as (list of str, float32 array [N, dim])."""
    fs, _ = get_fs(path, storage_options)
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    dim = None
    for file in embedding_files(path, storage_options):
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


def _read_vectors(fs, file: str) -> pa.Table:
    """The id and embedding columns of one file; InputError naming the file if it has none."""
    try:
        with fs.open(file, "rb") as f:
            return pq.read_table(f, columns=["id", "embedding"])
    except (pa.ArrowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise InputError(f"{file}: not an embeddings file with id and embedding columns ({first})") from None
