"""Parquet sink: one file per chunk of a group of shards (storage.packing), committed atomically.

A block reaching the sink holds rows of one or more chunks. A chunk wholly
inside the block is written straight to its final name (unless the sink is
`separate`: then every chunk goes out as pieces). A chunk that Ray
Data split across blocks is written as *pieces* under `_pieces/`: only the
columns the file needs, as uncompressed Arrow IPC (a copy of the block's
buffers, no encoding, no fsync: the encoder's process does almost nothing
here). Once all its rows have arrived the driver (pipeline.engine.chain)
joins them, in a thread of its own or a task on another node, and only then is
the Parquet built and written. Names starting with `_` or `.` are skipped by
pyarrow, duckdb and Spark readers, so nothing incomplete is ever picked up.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.quantization import VectorFormat, from_column
from pipeline.storage.filesystems import get_fs, write_bytes_atomic
from pipeline.engine.watchdog import Progress
from pipeline.stages.columns import (
    CHUNK, CHUNK_COLUMNS, CHUNK_ROWS, FILE, LAST, N_CHUNKS, N_TOKENS, ROW, SHARD, TRUNCATED, VALID,
)

PIECES_DIR = "_pieces"
PIECE_SUFFIX = ".arrow"
MANIFEST = "_manifest.json"
STATS_KEY = b"embedpipe.stats"  # a committed file's row statistics (JSON), in its Parquet key-value metadata
SETTINGS_KEY = b"embedpipe.settings"  # the settings of the run that made it (pipeline.identity)
SUMMARY_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("shard", pa.string()),  # the first shard of the file's rows
        ("last_shard", pa.string()),  # and the last: a file holds a part of one shard or whole shards of a group
        ("shards", pa.int64()),  # how many shards it holds rows of
        ("last", pa.bool_()),  # the last file of its group of shards (storage.packing)
        ("kind", pa.string()),  # "file": committed; "piece": part of a chunk
        ("rows", pa.int64()),
        ("chunk_rows", pa.int64()),
        ("first_row", pa.int64()),  # a piece's lowest row: names it, so a retried block is counted once
        ("docs", pa.int64()),  # documents whose first chunk is among the rows (= rows without chunking)
        ("doc_chunks", pa.int64()),  # the chunks those documents have in all (= rows without chunking)
        ("chunks", pa.int64()),  # chunks embedded (= embedded without chunking)
        ("max_chunks", pa.int64()),  # the most chunks of one document
        ("embedded", pa.int64()),
        ("invalid", pa.int64()),
        ("truncated", pa.int64()),
        ("tokens", pa.int64()),
    ]
)


@dataclass(frozen=True)
class SinkSpec:
    output: str
    text_field: str
    keep_columns: tuple[str, ...]
    vectors: VectorFormat = VectorFormat()
    """What is stored of each vector (precision, truncation, ranges): applied as the file is built."""
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    identity: bytes | None = None
    """The run's settings (pipeline.identity.file_metadata), stored in every file it commits."""
    format: str = "parquet"
    """parquet: one file per chunk; lance: one fragment of a Lance dataset per chunk (pipeline.storage.lance_sink)."""
    separate: bool = False
    """Every chunk goes out as pieces, even one wholly inside a block: the encoder's process builds no file
    (--writer separate, the default on GPUs)."""


def commit_block(batch: pa.Table, sink: SinkSpec, board=None) -> pa.Table:
    """Write the chunks in `batch`; return one summary row per file or piece written."""
    with Progress(board, "write").step(f"writing {batch.num_rows} rows"):
        return _commit_block(batch, sink)


def _commit_block(batch: pa.Table, sink: SinkSpec) -> pa.Table:
    fs, root = get_fs(sink.output, sink.storage_options)
    summaries = []
    files = batch[FILE]
    for name in pc.unique(files).to_pylist():
        rows = batch.filter(pc.equal(files, name))
        chunk_rows = int(rows[CHUNK_ROWS][0].as_py())
        docs, doc_chunks = document_counts(rows)
        if not sink.separate and docs == chunk_rows and rows.num_rows == doc_chunks:  # every document, whole
            stats = write_chunk(fs, root, name, rows, sink)
            summaries.append({**stats, "kind": "file", "chunk_rows": chunk_rows, "first_row": None,
                              "docs": docs, "doc_chunks": doc_chunks})
        else:
            first = int(pc.min(rows[ROW]).as_py())
            piece = posixpath.join(root, PIECES_DIR, name, f"{first:012d}{PIECE_SUFFIX}")
            write_bytes_atomic(fs, piece, ipc_bytes(rows.select(_piece_columns(rows, sink))), durable=False,
                               shown=f"{sink.output.rstrip('/')}/{name} (a part of it)")
            summaries.append({**chunk_stats(rows, name), "kind": "piece", "chunk_rows": chunk_rows, "first_row": first,
                              "rows": rows.num_rows, "docs": docs, "doc_chunks": doc_chunks})
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


def merge_pieces(sink: SinkSpec, name: str, chunk_rows: int, board=None) -> dict:
    """Join the pieces of chunk `name` into its final file; remove the pieces.

    A row that arrives twice (a block redone after a worker died) is kept
    once; a chunk that still lacks rows is an error, never a short file.
    """
    with Progress(board, "write").step(f"joining {chunk_rows} rows"):
        return _merge_pieces(sink, name, chunk_rows)


def _merge_pieces(sink: SinkSpec, name: str, chunk_rows: int) -> dict:
    fs, root = get_fs(sink.output, sink.storage_options)
    directory = posixpath.join(root, PIECES_DIR, name)
    paths = sorted(p for p in fs.ls(directory, detail=False, refresh=True) if p.endswith(PIECE_SUFFIX))
    tables = []
    for p in paths:
        with fs.open(p, "rb") as f:
            tables.append(pa.ipc.open_stream(f.read()).read_all())
    rows = pa.concat_tables(tables, promote_options="default")
    row_ids = np.asarray(rows[ROW].to_numpy(zero_copy_only=False))
    order = np.argsort(row_ids, kind="stable")
    first = np.ones(len(order), bool)
    first[1:] = row_ids[order[1:]] != row_ids[order[:-1]]
    keep = order[first]  # each row once, in row order
    docs, doc_chunks = document_counts(rows.take(pa.array(keep)))
    if docs != chunk_rows or len(keep) != doc_chunks:
        chunks = f" ({len(keep)} of their {doc_chunks} chunks)" if N_CHUNKS in rows.column_names else ""
        raise PipelineError(f"{name}: {docs} of {chunk_rows} rows{chunks} reached the sink; rerun to redo this file")
    stats = _write_rows(fs, root, name, rows, keep, sink)
    fs.rm(directory, recursive=True)
    return stats


def document_counts(rows: pa.Table) -> tuple[int, int]:
    """(documents whose first chunk is in `rows`, the chunks those documents have): a file is whole
    when the first is its number of documents and the second its number of rows."""
    if N_CHUNKS not in rows.column_names:
        return rows.num_rows, rows.num_rows
    first = np.asarray(rows[CHUNK].to_numpy(zero_copy_only=False)) == 0
    return int(first.sum()), int(np.asarray(rows[N_CHUNKS].to_numpy(zero_copy_only=False), np.int64)[first].sum())


def chunk_stats(rows: pa.Table, name: str) -> dict:
    """A file's statistics: `rows`, `embedded` and `invalid` count documents; `chunks` the rows embedded."""
    valid = np.asarray(rows[VALID].to_numpy(zero_copy_only=False), bool)
    chunked = N_CHUNKS in rows.column_names
    last = bool(rows[LAST][0].as_py()) if LAST in rows.column_names and rows.num_rows else None
    first = np.asarray(rows[CHUNK].to_numpy(zero_copy_only=False)) == 0 if chunked else np.ones(len(valid), bool)
    n_chunks = np.asarray(rows[N_CHUNKS].to_numpy(zero_copy_only=False)) if chunked else np.ones(len(valid), np.int32)
    return {
        "file": name,
        "shard": rows[SHARD][0].as_py() if rows.num_rows else "",
        "last_shard": rows[SHARD][-1].as_py() if rows.num_rows else "",
        "shards": pc.count_distinct(rows[SHARD]).as_py() if rows.num_rows else 0,
        "last": last,
        "rows": int(first.sum()),
        "embedded": int((valid & first).sum()),
        "invalid": int((~valid & first).sum()),
        "truncated": int(pc.sum(rows[TRUNCATED]).as_py() or 0),
        "tokens": int(pc.sum(rows[N_TOKENS]).as_py() or 0),
        "chunks": int(valid.sum()),
        "max_chunks": int(n_chunks[valid].max()) if valid.any() else 0,
    }


def write_chunk(fs, root: str, name: str, rows: pa.Table, sink: SinkSpec) -> dict:
    """Write a complete chunk to `root/name` atomically; return its stats."""
    order = np.argsort(np.asarray(rows[ROW].to_numpy(zero_copy_only=False)), kind="stable")
    return _write_rows(fs, root, name, rows, order, sink)


def _write_rows(fs, root: str, name: str, rows: pa.Table, keep: np.ndarray, sink: SinkSpec) -> dict:
    """Write rows `keep` of `rows` (the whole chunk, in row order) to `root/name`, its valid rows
    only, taken once; return the chunk's stats."""
    bookkeeping = rows.select([c for c in (VALID, SHARD, LAST, TRUNCATED, N_TOKENS, CHUNK, N_CHUNKS) if c in rows.column_names])
    stats = chunk_stats(bookkeeping.take(pa.array(keep)), name)
    valid = np.asarray(rows[VALID].to_numpy(zero_copy_only=False), bool)
    rows = rows.take(pa.array(keep[valid[keep]]))
    columns = {"id": rows["id"]}
    if N_CHUNKS in rows.column_names:
        columns.update((c, rows[c]) for c in CHUNK_COLUMNS)
    if "embedding" in rows.column_names:
        columns["embedding"] = _stored(rows["embedding"], sink.vectors)
    else:  # a sparse model's terms
        values = rows["values"]
        if sink.vectors.precision == "float16":
            values = values.cast(pa.list_(pa.float16()))
        columns.update(indices=rows["indices"], values=values)
    for col in sink.keep_columns:
        columns[col] = rows["text"] if col == sink.text_field else rows[col]
    table = pa.table(columns)
    metadata = {**(table.schema.metadata or {}), STATS_KEY: json.dumps(stats).encode()}
    if sink.identity is not None:
        metadata[SETTINGS_KEY] = sink.identity
    table = table.replace_schema_metadata(metadata)
    if sink.format == "lance":  # the same unit, as a Lance fragment committed by the driver
        from pipeline.storage.lance_sink import write_unit

        return write_unit(fs, root, name, table, stats, sink.identity, sink.storage_options)
    write_bytes_atomic(fs, posixpath.join(root, name), parquet_bytes(table))
    return stats


def _stored(embedding: pa.ChunkedArray, vectors: VectorFormat) -> pa.Array:
    """The model's float32 vectors as stored: truncated, normalised again, quantised (pipeline.quantization)."""
    if vectors.precision == "float32" and vectors.truncate_dim is None:
        return embedding
    if vectors.precision == "float16" and vectors.truncate_dim is None:
        return embedding.cast(pa.list_(pa.float16(), embedding.type.list_size))
    return vectors.stored(from_column(embedding))


def _piece_columns(rows: pa.Table, sink: SinkSpec) -> list[str]:
    """What a piece keeps of a block: what write_chunk and chunk_stats read."""
    wanted = {"id", "embedding", "indices", "values", "text", ROW, VALID, SHARD, LAST, N_TOKENS, TRUNCATED, N_CHUNKS,
              *CHUNK_COLUMNS, *sink.keep_columns}
    return [c for c in rows.column_names if c in wanted]


def ipc_bytes(table: pa.Table) -> bytes:
    """An Arrow IPC stream of `table`, uncompressed: the buffers as they are."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


VECTOR_COLUMNS = ("embedding", "values")  # floats that never repeat: dictionary encoding only costs


def parquet_bytes(table: pa.Table) -> bytes:
    """zstd Parquet; vector columns skip dictionary encoding, which halves the time to write
    a block of float32 vectors and makes the file smaller (BENCHMARKS.md, GPU)."""
    buf = io.BytesIO()
    dictionary = [c for c in table.column_names if c not in VECTOR_COLUMNS]
    pq.write_table(table, buf, compression="zstd", use_dictionary=dictionary)
    return buf.getvalue()


def read_file_stats(fs, path: str) -> dict | None:
    """Stats stored in a committed file's footer, or None if it is not ours."""
    with fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    raw = meta.get(STATS_KEY)
    return json.loads(raw) if raw else None
