"""A shard's rows, normalised: `id`, `text`, `_valid`, `_row`, `_shard` and the kept columns.

Without `--id-field` the id is "<shard key>:<row>" (with --document-per-file the
shard key alone), so a rerun gives the same ids; `_row` counts from 0 across the
shard's group (storage.packing). A row whose text is empty, blank or null is
marked `_valid = False` (skipped and counted), or refused with `--on-invalid error`.
"""

from __future__ import annotations

import lzma
import zlib
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stages.columns import ID, ROW, SHARD, TEXT, VALID
from pipeline.errors import InputError
from pipeline.storage.discovery import Shard, compression_of, describe_os_error
from pipeline.storage.filesystems import get_fs
from pipeline.storage.formats import LINE, ReadSpec, read_format


def read_shard(shard: Shard, spec: ReadSpec, fs=None) -> Iterator[pa.Table]:
    """Normalised tables of a shard, in row order: id, text, _valid, _row, _shard, kept columns. `fs`:
    the filesystem to open it with (storage.sources reads small shards from bytes fetched together)."""
    row = 0
    for table in read_raw(shard, spec, fs):
        yield normalise([Part(shard, table, row, row)], spec)
        row += table.num_rows


def read_raw(shard: Shard, spec: ReadSpec, fs=None) -> Iterator[pa.Table]:
    """A shard's tables as its format reads them (storage.formats), before `normalise`; no empty table."""
    if fs is None:
        fs, _ = get_fs(_uri(shard, spec), spec.storage_options)
    try:
        for table in read_format(fs, shard, spec):
            if table.num_rows:
                yield table
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        if not _is_bad_file(exc, shard):
            raise
        raise InputError(f"{shard.key}: cannot read ({describe_os_error(exc)})") from None


class Part(NamedTuple):
    """Rows of one shard as read (`read_raw`): from its row `first_row`, `_row` = `group_row` onwards."""

    shard: Shard
    table: pa.Table
    first_row: int
    group_row: int


def _is_bad_file(exc: BaseException, shard: Shard) -> bool:
    """A corrupt or truncated (compressed) file, or one we may not read; not a passing I/O hiccup."""
    if isinstance(exc, (EOFError, zlib.error, lzma.LZMAError, PermissionError, IsADirectoryError)):
        return True
    return compression_of(shard.path) is not None  # bz2/gzip report bad data as a plain OSError


def _uri(shard: Shard, spec: ReadSpec) -> str:
    return shard.path


def embeddable(texts: pa.Array) -> pa.Array:
    """Per text: neither empty, blank nor null (an invalid row is counted, not embedded)."""
    return pc.fill_null(pc.invert(pc.match_substring_regex(texts, r"^\s*$")), False)


def normalise(parts: list[Part], spec: ReadSpec) -> pa.Table:
    """The rows of one or more shards' parts as the chain takes them: id, text, _valid, _row, _shard and
    the kept columns, in one table. Many small shards are normalised together: a few Arrow calls for
    all of them, not a few per shard."""
    tables = [_strings(p.table, spec, p.shard) for p in parts]  # id and text as strings, per part
    table = tables[0] if len(tables) == 1 else joined(tables, parts[0].shard.key, parts[-1].shard.key)
    counts = [t.num_rows for t in tables]
    texts = table[spec.text_field].combine_chunks()
    valid = embeddable(texts)
    if spec.on_invalid == "error" and not pc.all(valid).as_py():
        part, _ = _locate(parts, counts, pc.index(valid, False).as_py())
        own = part.table[spec.text_field].cast(pa.string()).combine_chunks()
        _refuse_invalid(part.table, own, embeddable(own), part.shard, part.first_row)
    if spec.id_field:
        ids = table[_IDS].combine_chunks()
        if ids.null_count:
            part, i = _locate(parts, counts, pc.index(pc.is_null(ids), True).as_py())
            raise InputError(f"{part.shard.key}: row {part.first_row + i} has no value in --id-field {spec.id_field!r}")
    else:
        ids = pa.array([_id(p.shard, r) for p, n in zip(parts, counts) for r in range(p.first_row, p.first_row + n)],
                       pa.string())
    rows = np.concatenate([np.arange(p.group_row, p.group_row + n, dtype=np.int64) for p, n in zip(parts, counts)])
    shards = pa.array([p.shard.key for p, n in zip(parts, counts) for _ in range(n)], pa.string())
    columns = {ID: ids, TEXT: pc.fill_null(texts, ""), VALID: valid, ROW: pa.array(rows), SHARD: shards}
    for col in spec.keep_columns:
        if col != spec.text_field:  # the text travels as "text"; the sink restores its name
            columns[col] = table[col]
    return pa.table(columns)


def _strings(table: pa.Table, spec: ReadSpec, shard: Shard) -> pa.Table:
    """The text as strings, and the --id-field's values as strings in a column of their own (ids of
    numbers become their digits; the field itself stays as it is when it is also kept)."""
    text = spec.text_field
    if text in table.column_names and table.schema.field(text).type != pa.string():
        table = table.set_column(table.schema.get_field_index(text), text, table[text].cast(pa.string()))
    if spec.id_field and spec.id_field in table.column_names:
        table = table.append_column(_IDS, table[spec.id_field].cast(pa.string()))
        if spec.id_field not in spec.keep_columns:
            table = table.drop_columns([spec.id_field])
    return table


_IDS = "_ids"  # the --id-field's values as strings, while parts are joined


def joined(tables: list[pa.Table], first: str, last: str) -> pa.Table:
    """Rows of the shards `first` .. `last` in one table; kept columns of types that do not go together
    (Arrow promotes what it can) are refused naming the shards."""
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        where = first if first == last else f"the shards {first} .. {last}"
        raise InputError(f"{where}: a kept column has types that do not go together in one file "
                         f"({str(exc).splitlines()[0]}); give it one type, or use --no-pack-files to keep every "
                         "input file in files of its own") from None


def _id(shard: Shard, row: int) -> str:
    """A row's id without --id-field: "<shard key>:<row>"; with --document-per-file the key alone."""
    return shard.key if shard.format == "document" else f"{shard.key}:{row}"


def _locate(parts: list[Part], counts: list[int], index: int) -> tuple[Part, int]:
    """The part holding row `index` of the parts' rows together, and the row's place in it."""
    for part, n in zip(parts, counts):
        if index < n:
            return part, index
        index -= n
    raise IndexError(index)


def _refuse_invalid(table: pa.Table, texts: pa.Array, valid: pa.Array, shard: Shard, first_row: int) -> None:
    """--on-invalid error: name the first row whose text is empty, blank or null."""
    i = pc.index(valid, False).as_py()
    value = texts[i].as_py()
    kind = "null" if value is None else "empty" if value == "" else "blank"
    where = f"row {first_row + i}"
    if LINE in table.column_names:
        where += f" (line {table[LINE][i].as_py()})"
    raise InputError(
        f"{shard.key}: {where} has {kind} text; use --on-invalid skip to skip such rows and count them"
    )
