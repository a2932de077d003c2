"""Reading each input format into Arrow tables of the wanted columns, in row order.

txt (one row a line), jsonl, json (an array, or JSON lines), csv, parquet and
the Arrow files of a `datasets` directory; compressed text (.gz, .bz2, .zst,
.xz) through fsspec. Tables come in batches of at most READ_BATCH_ROWS rows;
the line-based readers add each row's 1-based line (LINE) for messages.

Bad input is an `InputError` naming the shard and where in it: "row N"
counts from 0 as in the ids, "line N" and "record N" count from 1 as an
editor does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.stages.columns import LINE
from pipeline.errors import InputError
from pipeline.storage.discovery import Shard, compression_of, describe_os_error
from pipeline.storage.filesystems import is_local

READ_BATCH_ROWS = 8192


@dataclass(frozen=True)
class ReadSpec:
    """What a read task needs to know, picklable and free of secrets in repr."""

    text_field: str
    id_field: str | None
    keep_columns: tuple[str, ...]
    encoding_errors: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    on_invalid: str = "skip"


_UTF8_HINT = "use --encoding-errors replace to embed it with replacement characters"


def read_format(fs, shard: Shard, spec: ReadSpec) -> Iterator[pa.Table]:
    """Tables of a shard's wanted columns, in row order, read as its format says."""
    reader = {
        "txt": _read_txt,
        "jsonl": _read_jsonl,
        "json": _read_json,
        "csv": _read_columnar,
        "parquet": _read_columnar,
        "arrow": _read_columnar,
        "document": _read_document,
    }[shard.format]
    return reader(fs, shard, spec)


def open_text_file(fs, shard: Shard):
    """A text shard opened for reading bytes, decompressed as its name says. A plain local file is
    opened by Python itself: a tenth of fsspec's cost, which counts over 100,000 small files."""
    if is_local(fs) and compression_of(shard.path) is None:
        return open(shard.path, "rb")
    return fs.open(shard.path, "rb", compression="infer")


def _read_txt(fs, shard: Shard, spec: ReadSpec) -> Iterator[pa.Table]:
    lines: list[str] = []
    first = 1
    for lineno, raw in enumerate(_binary_lines(fs, shard), 1):
        lines.append(_decode(raw, shard, lineno, spec).rstrip("\r\n"))
        if len(lines) >= READ_BATCH_ROWS:
            yield _lines_table(spec, lines, first)
            first, lines = lineno + 1, []
    if lines:
        yield _lines_table(spec, lines, first)


def _read_document(fs, shard: Shard, spec: ReadSpec) -> Iterator[pa.Table]:
    """--document-per-file: the whole file, decoded, as one row (an empty file is one empty row)."""
    with open_text_file(fs, shard) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8", errors=spec.encoding_errors)
    except UnicodeDecodeError as exc:
        raise InputError(f"{shard.key}: byte {exc.start} is not valid UTF-8 ({_UTF8_HINT})") from None
    yield pa.table({spec.text_field: pa.array([text], pa.string())})


def _lines_table(spec: ReadSpec, lines: list[str], first_line: int) -> pa.Table:
    line_numbers = pa.array(range(first_line, first_line + len(lines)), pa.int64())
    return pa.table({spec.text_field: pa.array(lines, pa.string()), LINE: line_numbers})


def _binary_lines(fs, shard: Shard) -> Iterator[bytes]:
    with open_text_file(fs, shard) as f:
        yield from f


def _decode(raw: bytes, shard: Shard, lineno: int, spec: ReadSpec) -> str:
    try:
        return raw.decode("utf-8", errors=spec.encoding_errors)
    except UnicodeDecodeError:
        raise InputError(f"{shard.key}: line {lineno} is not valid UTF-8 ({_UTF8_HINT})") from None


def _records_to_table(records: list, shard: Shard, spec: ReadSpec, positions: Sequence[int], unit: str) -> pa.Table:
    """A table of JSON objects; `positions` are their 1-based line (jsonl) or record (json) numbers."""
    columns: dict[str, list] = {spec.text_field: []}
    if spec.id_field:
        columns[spec.id_field] = []
    for col in spec.keep_columns:
        columns.setdefault(col, [])
    for rec, pos in zip(records, positions):
        where = f"{shard.key}: {unit} {pos}"
        if not isinstance(rec, dict):
            raise InputError(f"{where} is a JSON {type(rec).__name__}, expected an object")
        for col, values in columns.items():
            if col not in rec:
                raise InputError(f"{where} has no field {col!r}{_flag_hint(col, spec)}")
            values.append(rec[col])
    table = {}
    for col, values in columns.items():
        if col == spec.text_field:
            for v, pos in zip(values, positions):
                if v is not None and not isinstance(v, str):
                    raise InputError(
                        f"{shard.key}: {unit} {pos} field {col!r} is a {type(v).__name__}, expected a string"
                    )
            table[col] = pa.array(values, pa.string())
        else:
            try:
                table[col] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                table[col] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    if unit == "line":
        table[LINE] = pa.array(positions, pa.int64())
    return pa.table(table)


def _flag_hint(column: str, spec: ReadSpec) -> str:
    """Which flag asked for `column`, so the message says what to change."""
    if column == spec.text_field:
        return " (set --text-field)"
    if column == spec.id_field:
        return " (set --id-field)"
    return " (see --keep-columns)"


def _read_jsonl(fs, shard: Shard, spec: ReadSpec) -> Iterator[pa.Table]:
    records: list = []
    lines: list[int] = []
    for lineno, raw in enumerate(_binary_lines(fs, shard), 1):
        line = _decode(raw, shard, lineno, spec).strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{shard.key}: line {lineno} is not valid JSON ({exc.msg})") from None
        lines.append(lineno)
        if len(records) >= READ_BATCH_ROWS:
            yield _records_to_table(records, shard, spec, lines, "line")
            records, lines = [], []
    if records:
        yield _records_to_table(records, shard, spec, lines, "line")


def _read_json(fs, shard: Shard, spec: ReadSpec) -> Iterator[pa.Table]:
    with open_text_file(fs, shard) as f:
        head = f.read(4096)
    if head.lstrip()[:1] != b"[":
        yield from _read_jsonl(fs, shard, spec)
        return
    with open_text_file(fs, shard) as f:
        data = f.read()
    try:
        records = json.loads(data.decode("utf-8", errors=spec.encoding_errors))
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{shard.key}: line {line} is not valid UTF-8 ({_UTF8_HINT})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{shard.key}: line {exc.lineno} is not valid JSON ({exc.msg})") from None
    for start in range(0, len(records), READ_BATCH_ROWS):
        batch = records[start : start + READ_BATCH_ROWS]
        yield _records_to_table(batch, shard, spec, range(start + 1, start + len(batch) + 1), "record")


def _read_columnar(fs, shard: Shard, spec: ReadSpec) -> Iterator[pa.Table]:
    """CSV, Parquet and Arrow shards: the wanted columns, checked against the schema first."""
    wanted = [spec.text_field] + ([spec.id_field] if spec.id_field else []) + list(spec.keep_columns)
    wanted = list(dict.fromkeys(wanted))
    row = 0
    try:
        with fs.open(shard.path, "rb", compression="infer" if shard.format == "csv" else None) as f:
            schema, batches = _open_columnar(f, shard, wanted)
            _check_columns(schema, wanted, shard, spec)
            for batch in batches:
                table = _utf8_checked(pa.Table.from_batches([batch]).select(wanted), shard, spec, row)
                row += table.num_rows
                yield table
    except InputError:
        raise
    except (pa.ArrowException, OSError, EOFError, UnicodeDecodeError) as exc:
        if isinstance(exc, UnicodeDecodeError) or "utf8" in str(exc).lower() or "utf-8" in str(exc).lower():
            raise InputError(f"{shard.key}: not valid UTF-8 ({describe_os_error(exc)}); {_UTF8_HINT}") from None
        raise InputError(f"{shard.key}: cannot read {shard.format} ({describe_os_error(exc)})") from None


def _open_columnar(f, shard: Shard, wanted: Sequence[str]) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """(schema, record batches) of an open CSV, Parquet or Arrow file; batches are read lazily."""
    if shard.format == "parquet":
        pf = pq.ParquetFile(f)
        present = [c for c in wanted if c in pf.schema_arrow.names]
        return pf.schema_arrow, pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=present)
    if shard.format == "csv":
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(block_size=4 << 20),
            convert_options=pacsv.ConvertOptions(
                column_types={wanted[0]: pa.string()}, strings_can_be_null=False, check_utf8=False
            ),
        )
        return reader.schema, iter(reader)
    data = f.read()  # arrow: `datasets` save_to_disk writes the IPC stream format
    try:
        stream = pa.ipc.open_stream(data)
        return stream.schema, iter(stream)
    except pa.ArrowInvalid:
        ipc_file = pa.ipc.open_file(data)
        return ipc_file.schema, (ipc_file.get_batch(i) for i in range(ipc_file.num_record_batches))


def _check_columns(schema: pa.Schema, wanted: Sequence[str], shard: Shard, spec: ReadSpec) -> None:
    missing = [c for c in wanted if c not in schema.names]
    if missing:
        names = schema.names if len(schema.names) <= 12 else schema.names[:12] + ["..."]
        raise InputError(f"{shard.key}: no column {missing[0]!r}{_flag_hint(missing[0], spec)}; columns are {names}")
    text = schema.field(spec.text_field).type
    if not (pa.types.is_string(text) or pa.types.is_large_string(text) or pa.types.is_null(text)):
        raise InputError(f"{shard.key}: column {spec.text_field!r} has type {text}, expected strings")


def _utf8_checked(table: pa.Table, shard: Shard, spec: ReadSpec, first_row: int) -> pa.Table:
    """String columns as valid UTF-8: bad bytes are an error naming the row, or replaced if asked.

    CSV is read without pyarrow's own check and Parquet/Arrow never check, so
    this is the one place invalid text is caught before it reaches a worker.
    """
    for i, name in enumerate(table.column_names):
        column = table[name].combine_chunks()
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        raw = column.cast(pa.binary() if pa.types.is_string(column.type) else pa.large_binary()).to_pylist()
        if spec.encoding_errors != "replace":
            bad = next(r for r, value in enumerate(raw) if value is not None and not _is_utf8(value))
            raise InputError(
                f"{shard.key}: row {first_row + bad}, column {name!r}, is not valid UTF-8 ({_UTF8_HINT})"
            )
        fixed = [None if v is None else v.decode("utf-8", errors="replace") for v in raw]
        table = table.set_column(i, name, pa.array(fixed, column.type))
    return table


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
