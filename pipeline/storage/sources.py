"""Input sources for Ray Data: a group of shards' rows cut into chunks, one read task per group.

A group (`packing`: one large shard, or many small ones packed together) is cut into *chunks* of
at most `rows_per_file` rows; each chunk becomes one output file, which is the unit of commit and
resume. Discovery is in `discovery`, the groups in `packing`, each format's reader in `formats`,
ids and row normalisation in `rows`; their public names are importable from here too.
"""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.stages.columns import CHUNK_ROWS, FILE, LAST
from pipeline.engine.watchdog import Progress
from pipeline.errors import InputError
from pipeline.storage.discovery import Shard, check_fields, discover_shards, output_stem
from pipeline.storage.filesystems import get_fs, is_local
from pipeline.storage.formats import ReadSpec
from pipeline.storage.packing import Group, as_group, group_done
from pipeline.storage.rows import Part, joined, normalise, read_raw, read_shard

PREFETCH_SHARDS = 64  # small shards of a packed group fetched at once from a remote store (one request each, concurrent)

__all__ = [  # with the names of discovery, formats and rows that other modules import from here
    "Group",
    "ReadSpec",
    "Shard",
    "ShardDatasource",
    "check_fields",
    "discover_shards",
    "group_done",
    "output_stem",
    "read_chunks",
    "read_shard",
]


class ShardDatasource(Datasource):
    """One read task per group of shards; each yields whole chunks of at most `rows_per_file` rows.

    Every row carries its chunk's output file name (`_file`), row count (`_chunk_rows`) and whether
    that file is its group's last (`_last`), so the sink can commit a chunk once all its rows are
    embedded and a resume can tell a group is done. Chunks whose file is already committed are not
    yielded. Many small shards are read by one task: no Ray task or object per input file.
    """

    def __init__(
        self, groups: list[Group], spec: ReadSpec, rows_per_file: int, committed: frozenset[str], board=None,
    ):
        super().__init__()
        self._board = board
        self._groups = [as_group(g) for g in groups]
        self._spec = spec
        self._rows_per_file = rows_per_file
        self._committed = committed

    def get_name(self) -> str:
        return "ReadShards"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(g.size for g in self._groups) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        tasks = []
        progress = Progress(self._board, "read")
        for group in self._groups:
            spec, rows, committed = self._spec, self._rows_per_file, self._committed
            files = [group.key] if not group.packed else [group.key, group.last_key]
            meta = BlockMetadata(num_rows=None, size_bytes=group.size or None, input_files=files, exec_stats=None)
            tasks.append(ReadTask(lambda g=group: progress.timed("reading", read_chunks(g, spec, rows, committed)), meta))
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


def read_chunks(group: Group | Shard, spec: ReadSpec, rows_per_file: int, committed: frozenset[str]) -> Iterator[pa.Table]:
    """Chunks of a group as tables tagged with _shard, _file, _chunk_rows and _last; `_row` counts
    the group's rows. A group of one shard is cut every `rows_per_file` rows as it streams; a packed
    group's small shards are read whole and a cut falls between two of them where it can."""
    group = as_group(group)
    chunk, multi = 0, False
    for table, last in (_packed(group, spec, rows_per_file) if group.packed else _streamed(group, spec, rows_per_file)):
        multi = multi or not last
        name = group.file_name(chunk, multi)
        chunk += 1
        if name in committed:
            continue
        table = _longest_first(table)
        n = table.num_rows
        yield table.append_column(FILE, pa.array([name] * n, pa.string())).append_column(
            CHUNK_ROWS, pa.array([n] * n, pa.int64())).append_column(LAST, pa.array([last] * n, pa.bool_()))


def _streamed(group: Group, spec: ReadSpec, rows_per_file: int) -> Iterator[tuple[pa.Table, bool]]:
    """(rows of one file, whether it is the last) of a group of one shard, cut every `rows_per_file`
    rows as the shard is read."""
    (shard,) = group.shards
    buffer: list[pa.Table] = []
    buffered = 0
    for table in read_shard(shard, spec):
        buffer.append(table)
        buffered += table.num_rows
        while buffered > rows_per_file:  # more rows follow this chunk
            whole = joined(buffer, group.key, group.last_key)
            yield whole.slice(0, rows_per_file), False
            buffer, buffered = [whole.slice(rows_per_file)], buffered - rows_per_file
    if not buffered:
        raise InputError(f"{shard.key}: the file is empty (no rows)")
    yield joined(buffer, group.key, group.last_key), True


def _packed(group: Group, spec: ReadSpec, rows_per_file: int) -> Iterator[tuple[pa.Table, bool]]:
    """(rows of one file, whether it is the last) of a packed group: whole small shards, a cut between
    two of them once the next would pass `rows_per_file` (a shard of more rows is cut inside itself).
    The shards' rows are normalised together, a file's worth at a time (storage.rows.normalise)."""
    parts: list[Part] = []  # read, not yet normalised
    done: list[pa.Table] = []  # normalised rest of a shard cut inside itself
    buffered = offset = 0

    def rows() -> pa.Table:
        return joined(done + ([normalise(parts, spec)] if parts else []), group.key, group.last_key)

    for shard, raw in _shard_tables(group, spec):
        n = sum(t.num_rows for t in raw)
        if n == 0:
            raise InputError(f"{shard.key}: the file is empty (no rows)")
        if buffered and buffered + n > rows_per_file:  # a cut between two shards
            yield rows(), False
            parts, done, buffered = [], [], 0
        first = 0
        for table in raw:  # each table as read: a shard's batches may infer other types (JSON)
            parts.append(Part(shard, table, first, offset + first))
            first += table.num_rows
        offset, buffered = offset + n, buffered + n
        while buffered > rows_per_file:  # a small shard of many rows: cut inside it
            whole = rows()
            yield whole.slice(0, rows_per_file), False
            parts, done, buffered = [], [whole.slice(rows_per_file)], buffered - rows_per_file
    yield rows(), True


def _shard_tables(group: Group, spec: ReadSpec) -> Iterator[tuple[Shard, list[pa.Table]]]:
    """(shard, its tables as read, not normalised) for each shard of a packed group, in order. On a
    remote store the small shards' bytes are fetched PREFETCH_SHARDS at a time, concurrently."""
    fs, _ = get_fs(group.shards[0].path, spec.storage_options)
    if is_local(fs):
        for shard in group.shards:
            yield shard, list(read_raw(shard, spec, fs))
        return
    for start in range(0, len(group.shards), PREFETCH_SHARDS):
        batch = group.shards[start:start + PREFETCH_SHARDS]
        fetched = _Fetched(fs, fs.cat([s.path for s in batch], on_error="return"))
        for shard in batch:
            yield shard, list(read_raw(shard, spec, fetched))


class _Fetched:
    """A filesystem whose `open` serves bytes already fetched (`fs.cat`), decompressing as asked;
    a file whose fetch failed is opened from `fs`, which then reports the failure as it would."""

    def __init__(self, fs, data: dict):
        self._fs = fs
        self._data = {fs._strip_protocol(path): value for path, value in data.items()}

    def open(self, path: str, mode: str = "rb", compression: str | None = None, **kwargs):
        data = self._data.get(self._fs._strip_protocol(path))
        if not isinstance(data, bytes):
            return self._fs.open(path, mode, compression=compression, **kwargs)
        from fsspec.compression import compr
        from fsspec.utils import infer_compression

        if compression == "infer":
            compression = infer_compression(path)
        raw = io.BytesIO(data)
        return compr[compression](raw, mode="rb") if compression else raw

    def __getattr__(self, name: str):
        return getattr(self._fs, name)
