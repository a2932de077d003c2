"""A shard's rows, normalised: `id`, `text`, `_valid`, `_row` and the kept columns.

Without `--id-field` the id is "<shard key>:<row>", so a rerun gives the same
ids; `_row` counts from 0 across the whole shard. A row whose text is empty,
blank or null is marked `_valid = False` (skipped and counted), or refused
with `--on-invalid error`.
"""

from __future__ import annotations

import lzma
import zlib
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stages.columns import ID, ROW, TEXT, VALID
from pipeline.errors import InputError
from pipeline.storage.discovery import Shard, compression_of, describe_os_error
from pipeline.storage.filesystems import get_fs
from pipeline.storage.formats import LINE, ReadSpec, read_format


def read_shard(shard: Shard, spec: ReadSpec) -> Iterator[pa.Table]:
    """Normalised tables of a shard, in row order: id, text, _valid, _row, kept columns."""
    fs, _ = get_fs(_uri(shard, spec), spec.storage_options)
    row = 0
    try:
        for table in read_format(fs, shard, spec):
            n = table.num_rows
            if n == 0:
                continue
            yield _normalise(table, shard, spec, row)
            row += n
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        if not _is_bad_file(exc, shard):
            raise
        raise InputError(f"{shard.key}: cannot read ({describe_os_error(exc)})") from None


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


def _normalise(table: pa.Table, shard: Shard, spec: ReadSpec, first_row: int) -> pa.Table:
    n = table.num_rows
    rows = pa.array(range(first_row, first_row + n), pa.int64())
    texts = table[spec.text_field].cast(pa.string()).combine_chunks()

    valid = embeddable(texts)
    if spec.on_invalid == "error" and not pc.all(valid).as_py():
        _refuse_invalid(table, texts, valid, shard, first_row)
    if spec.id_field:
        ids = table[spec.id_field].combine_chunks()
        if ids.null_count:
            row = first_row + pc.index(pc.is_null(ids), True).as_py()
            raise InputError(f"{shard.key}: row {row} has no value in --id-field {spec.id_field!r}")
        ids = ids.cast(pa.string())
    else:
        ids = pa.array([f"{shard.key}:{r}" for r in range(first_row, first_row + n)], pa.string())
    columns = {ID: ids, TEXT: pc.fill_null(texts, ""), VALID: valid, ROW: rows}
    for col in spec.keep_columns:
        if col != spec.text_field:  # the text travels as "text"; the sink restores its name
            columns[col] = table[col]
    return pa.table(columns)


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
