"""Input sources for Ray Data: a shard's rows cut into chunks, one read task per shard.

A shard is cut into *chunks* of `rows_per_file` rows; each chunk becomes one
output file, which is the unit of commit and resume. Discovery is in
`discovery`, each format's reader in `formats`, ids and row normalisation in
`rows`; their public names are importable from here too.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.stages.columns import CHUNK_ROWS, FILE, SHARD
from pipeline.engine.watchdog import Progress
from pipeline.errors import InputError
from pipeline.storage.discovery import Shard, discover_shards, output_stem
from pipeline.storage.formats import ReadSpec
from pipeline.storage.rows import read_shard

__all__ = [  # with the names of discovery, formats and rows that other modules import from here
    "ReadSpec",
    "Shard",
    "ShardDatasource",
    "chunk_file_name",
    "discover_shards",
    "output_stem",
    "read_chunks",
    "read_shard",
    "shard_done",
]


class ShardDatasource(Datasource):
    """One read task per shard; each yields whole chunks of `rows_per_file` rows.

    Every row carries its chunk's output file name (`_file`) and row count
    (`_chunk_rows`), so the sink can commit a chunk once all its rows are
    embedded. Chunks whose file is already committed are not yielded.
    """

    def __init__(
        self, shards: list[Shard], spec: ReadSpec, rows_per_file: int, committed: frozenset[str], board=None,
    ):
        super().__init__()
        self._board = board
        self._shards = shards
        self._spec = spec
        self._rows_per_file = rows_per_file
        self._committed = committed

    def get_name(self) -> str:
        return "ReadShards"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(s.size for s in self._shards) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        tasks = []
        progress = Progress(self._board, "read")
        for shard in self._shards:
            spec, rows, committed = self._spec, self._rows_per_file, self._committed
            meta = BlockMetadata(num_rows=None, size_bytes=shard.size or None, input_files=[shard.key], exec_stats=None)
            tasks.append(ReadTask(lambda s=shard: progress.timed("reading", read_chunks(s, spec, rows, committed)), meta))
        return tasks


def _longest_first(table: pa.Table) -> pa.Table:
    """A chunk's rows by text length, longest first (the sink restores row order).

    Ray cuts a chunk into small blocks; sorted, each block holds texts of similar
    length, so the encoder's micro-batches carry little padding even though each
    block is sorted only on its own. Measured: unsorted 667-row blocks cost about a
    third more encoding time than one 10,000-row sorted block (BENCHMARKS.md).
    """
    lengths = pc.fill_null(pc.utf8_length(table["text"]), 0).to_numpy(zero_copy_only=False)
    return table.take(pa.array(np.argsort(-lengths, kind="stable")))


def chunk_file_name(shard: Shard, chunk: int, multi: bool) -> str:
    stem = output_stem(shard.key)
    return f"{stem}-{chunk:05d}.parquet" if multi else f"{stem}.parquet"


def shard_done(shard: Shard, committed: Mapping[str, Any], rows_per_file: int) -> bool:
    """Whether every file of `shard` is committed, judged from the output alone, without reading the shard.

    `committed`: {file name: its statistics (a dict with `rows`) or None}. A shard of one file is done
    when that file is there. A shard cut into several files is done when files 0..K are all there
    and file K holds fewer than `rows_per_file` rows: only a shard's last file can be short. A shard
    whose last file is exactly full cannot be told apart from one with more rows to come; it is read
    again, its committed files skipped as it goes (and so is a shard whose files have no statistics).
    """
    stem = output_stem(shard.key)
    if f"{stem}.parquet" in committed:
        return True
    k = 0
    while f"{stem}-{k:05d}.parquet" in committed:
        k += 1
    if k == 0:
        return False
    stats = committed[f"{stem}-{k - 1:05d}.parquet"]
    rows = stats.get("rows") if isinstance(stats, dict) else None
    return isinstance(rows, int) and rows < rows_per_file


def read_chunks(shard: Shard, spec: ReadSpec, rows_per_file: int, committed: frozenset[str]) -> Iterator[pa.Table]:
    """Chunks of a shard as tables tagged with _shard, _file and _chunk_rows."""
    buffer: list[pa.Table] = []
    buffered = 0
    chunk = 0
    multi = False

    def emit(table: pa.Table) -> Iterator[pa.Table]:
        name = chunk_file_name(shard, chunk, multi)
        if name in committed:
            return
        table = _longest_first(table)
        n = table.num_rows
        yield table.append_column(SHARD, pa.array([shard.key] * n, pa.string())).append_column(
            FILE, pa.array([name] * n, pa.string())
        ).append_column(CHUNK_ROWS, pa.array([n] * n, pa.int64()))

    for table in read_shard(shard, spec):
        buffer.append(table)
        buffered += table.num_rows
        while buffered > rows_per_file:  # more rows follow this chunk
            multi = True
            whole = pa.concat_tables(buffer)
            yield from emit(whole.slice(0, rows_per_file))
            rest = whole.slice(rows_per_file)
            buffer, buffered = [rest], rest.num_rows
            chunk += 1
    if chunk == 0 and not buffered:
        raise InputError(f"{shard.key}: the file is empty (no rows)")
    if buffered:
        yield from emit(pa.concat_tables(buffer))
