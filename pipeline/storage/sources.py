"""Input discovery and reading: files, directories, globs and s3:// URIs.

Each input file is a *shard*. Rows are normalised to `id` + `text` (+ kept
columns); without `--id-field` the id is "<relative shard path>:<row>", so a
rerun gives the same ids. A shard is cut into *chunks* of `rows_per_file`
rows; each chunk becomes one output file, which is the unit of commit and
resume.

Bad input is an `InputError` naming the shard and where in it: "row N"
counts from 0 as in the ids, "line N" and "record N" count from 1 as an
editor does. Files that are empty (0 bytes) or need a codec that is not
installed are refused while discovering, before any worker starts.
"""

from __future__ import annotations

import json
import logging
import lzma
import posixpath
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.utils import infer_compression
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.errors import InputError
from pipeline.storage.filesystems import check_bucket, get_fs, is_local

log = logging.getLogger(__name__)

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")
READ_BATCH_ROWS = 8192


@dataclass(frozen=True)
class Shard:
    path: str  # local path, or the full URI (s3://...) of a remote file
    key: str  # path relative to the input root; used in ids and output names
    format: str
    size: int


def _compression(path: str) -> str | None:
    name = path.lower()
    return next((ext for ext in COMPRESSIONS if name.endswith(ext)), None)


def shard_format(path: str) -> str | None:
    name = path.lower()
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return FORMATS.get(posixpath.splitext(name)[1])


def output_stem(key: str) -> str:
    """Flat, deterministic output file stem for a shard key."""
    return key.replace("/", "__")


def discover_shards(input_path: str, storage_options: Mapping[str, Any] | None = None) -> list[Shard]:
    """Every shard under `input_path`, sorted by key. Raises InputError if none."""
    try:
        fs, path = get_fs(input_path, storage_options)
    except (ImportError, ValueError) as exc:
        raise InputError(f"--input {input_path}: {exc}") from None
    path = path.rstrip("/") or path
    check_bucket(fs, path, f"--input {input_path}")
    try:
        if any(ch in path for ch in "*?["):
            root = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
            files = [p for p in fs.glob(path) if fs.isfile(p)]
            if not files:
                raise InputError(f"--input {input_path}: the glob matches no files")
            explicit = True
        elif fs.isdir(path):
            root = path
            files = _hf_dataset_files(fs, path)
            explicit = files is not None
            if files is None:
                files = _walk(fs, path)
        elif fs.isfile(path):
            root = posixpath.dirname(path)
            files = [path]
            explicit = True
        else:
            raise InputError(f"--input {input_path}: no such file or directory")
    except (PermissionError, FileNotFoundError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"--input {input_path}: {_describe_os_error(exc)}") from None

    shards, skipped = [], []
    for p in sorted(files):
        fmt = shard_format(p)
        if fmt is None:
            if explicit and fs.isfile(p) and len(files) == 1:
                raise InputError(
                    f"--input {p}: unsupported file type (expected {', '.join(sorted(FORMATS))})"
                )
            skipped.append(p)
            continue
        key = posixpath.relpath(p, root) if root else p
        shards.append(_checked_shard(fs, p, key, fmt))
    if skipped:
        log.warning("skipping %d file(s) of unsupported type, e.g. %s", len(skipped), skipped[0])
    if not shards:
        raise InputError(
            f"--input {input_path}: no files of a supported type ({', '.join(sorted(FORMATS))})"
        )
    return shards


def _checked_shard(fs, path: str, key: str, fmt: str) -> Shard:
    """The shard at `path`, refused now if it cannot hold a row or cannot be decompressed here."""
    size = int(fs.info(path).get("size") or 0)
    if size == 0:
        raise InputError(f"{key}: the file is empty (0 bytes)")
    codec = _compression(path)
    if codec is not None and infer_compression(path) is None:  # fsspec knows .zst only with zstandard
        raise InputError(f"{key}: no {codec} codec installed (for .zst: pip install zstandard)")
    uri = path if is_local(fs) else fs.unstrip_protocol(path)  # read tasks rebuild the filesystem from it
    return Shard(path=uri, key=key, format=fmt, size=size)


def _walk(fs, root: str) -> list[str]:
    """Files under `root`, skipping hidden ones; a `datasets` directory contributes its Arrow files."""
    out: list[str] = []
    for directory, dirs, files in fs.walk(root):
        rel = posixpath.relpath(directory, root)
        if rel != "." and _hidden(rel):
            dirs.clear()
            continue
        hf = _hf_dataset_files(fs, directory) if directory != root else None
        if hf is not None:
            out += hf
            dirs.clear()
            continue
        out += [posixpath.join(directory, f) for f in files if not f.startswith((".", "_"))]
    return out


def _hidden(relpath: str) -> bool:
    return any(part.startswith((".", "_")) for part in relpath.split("/"))


def _describe_os_error(exc: BaseException) -> str:
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


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ReadSpec:
    """What a read task needs to know, picklable and free of secrets in repr."""

    text_field: str
    id_field: str | None
    keep_columns: tuple[str, ...]
    encoding_errors: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    on_invalid: str = "skip"


LINE = "_line"  # 1-based line of each row, added by the line-based readers for messages
_UTF8_HINT = "use --encoding-errors replace to embed it with replacement characters"


def read_shard(shard: Shard, spec: ReadSpec) -> Iterator[pa.Table]:
    """Normalised tables of a shard, in row order: id, text, _valid, _row, kept columns."""
    fs, _ = get_fs(_uri(shard, spec), spec.storage_options)
    reader = {
        "txt": _read_txt,
        "jsonl": _read_jsonl,
        "json": _read_json,
        "csv": _read_columnar,
        "parquet": _read_columnar,
        "arrow": _read_columnar,
    }[shard.format]
    row = 0
    try:
        for table in reader(fs, shard, spec):
            n = table.num_rows
            if n == 0:
                continue
            yield _normalise(table, shard, spec, row)
            row += n
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        if not _is_bad_file(exc, shard):
            raise
        raise InputError(f"{shard.key}: cannot read ({_describe_os_error(exc)})") from None


def _is_bad_file(exc: BaseException, shard: Shard) -> bool:
    """A corrupt or truncated (compressed) file, or one we may not read; not a passing I/O hiccup."""
    if isinstance(exc, (EOFError, zlib.error, lzma.LZMAError, PermissionError, IsADirectoryError)):
        return True
    return _compression(shard.path) is not None  # bz2/gzip report bad data as a plain OSError


def _uri(shard: Shard, spec: ReadSpec) -> str:
    return shard.path


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


def _lines_table(spec: ReadSpec, lines: list[str], first_line: int) -> pa.Table:
    line_numbers = pa.array(range(first_line, first_line + len(lines)), pa.int64())
    return pa.table({spec.text_field: pa.array(lines, pa.string()), LINE: line_numbers})


def _binary_lines(fs, shard: Shard) -> Iterator[bytes]:
    with fs.open(shard.path, "rb", compression="infer") as f:
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
    with fs.open(shard.path, "rb", compression="infer") as f:
        head = f.read(4096)
    if head.lstrip()[:1] != b"[":
        yield from _read_jsonl(fs, shard, spec)
        return
    with fs.open(shard.path, "rb", compression="infer") as f:
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
            raise InputError(f"{shard.key}: not valid UTF-8 ({_describe_os_error(exc)}); {_UTF8_HINT}") from None
        raise InputError(f"{shard.key}: cannot read {shard.format} ({_describe_os_error(exc)})") from None


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


def _normalise(table: pa.Table, shard: Shard, spec: ReadSpec, first_row: int) -> pa.Table:
    n = table.num_rows
    rows = pa.array(range(first_row, first_row + n), pa.int64())
    texts = table[spec.text_field].cast(pa.string()).combine_chunks()

    valid = pc.fill_null(pc.invert(pc.match_substring_regex(texts, r"^\s*$")), False)
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
    columns = {"id": ids, "text": pc.fill_null(texts, ""), "_valid": valid, "_row": rows}
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


# --------------------------------------------------------------------------- Ray datasource


class ShardDatasource(Datasource):
    """One read task per shard; each yields whole chunks of `rows_per_file` rows.

    Every row carries its chunk's output file name (`_file`) and row count
    (`_chunk_rows`), so the sink can commit a chunk once all its rows are
    embedded. Chunks whose file is already committed are not yielded.
    """

    def __init__(self, shards: list[Shard], spec: ReadSpec, rows_per_file: int, committed: frozenset[str]):
        super().__init__()
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
        for shard in self._shards:
            spec, rows, committed = self._spec, self._rows_per_file, self._committed
            meta = BlockMetadata(num_rows=None, size_bytes=shard.size or None, input_files=[shard.key], exec_stats=None)
            tasks.append(ReadTask(lambda s=shard: read_chunks(s, spec, rows, committed), meta))
        return tasks


def _longest_first(table: pa.Table) -> pa.Table:
    """A chunk's rows by text length, longest first (the sink restores row order).

    Ray cuts a chunk into small blocks; sorted, each block holds texts of similar
    length, so the encoder's micro-batches carry little padding even though each
    block is sorted only on its own. Measured: unsorted 667-row blocks cost about a
    third more encoding time than one 10,000-row sorted block (BENCHMARKS.md).
    """
    import pyarrow.compute as pc

    lengths = pc.fill_null(pc.utf8_length(table["text"]), 0).to_numpy(zero_copy_only=False)
    return table.take(pa.array(np.argsort(-lengths, kind="stable")))


def chunk_file_name(shard: Shard, chunk: int, multi: bool) -> str:
    stem = output_stem(shard.key)
    return f"{stem}-{chunk:05d}.parquet" if multi else f"{stem}.parquet"


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
        yield table.append_column("_shard", pa.array([shard.key] * n, pa.string())).append_column(
            "_file", pa.array([name] * n, pa.string())
        ).append_column("_chunk_rows", pa.array([n] * n, pa.int64()))

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
