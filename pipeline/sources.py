"""Input discovery and reading: files, directories, globs and s3:// URIs.

Each input file is a *shard*. Rows are normalised to `id` + `text` (+ kept
columns); without `--id-field` the id is "<relative shard path>:<row>", so a
rerun gives the same ids. A shard is cut into *chunks* of `rows_per_file`
rows; each chunk becomes one output file, which is the unit of commit and
resume.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.errors import InputError
from pipeline.storage import get_fs

log = logging.getLogger(__name__)

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")
READ_BATCH_ROWS = 8192


@dataclass(frozen=True)
class Shard:
    path: str  # path inside the filesystem
    key: str  # path relative to the input root; used in ids and output names
    format: str
    size: int


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
        shards.append(Shard(path=p, key=key, format=fmt, size=int(fs.info(p).get("size") or 0)))
    if skipped:
        log.warning("skipping %d file(s) of unsupported type, e.g. %s", len(skipped), skipped[0])
    if not shards:
        raise InputError(
            f"--input {input_path}: no files of a supported type ({', '.join(sorted(FORMATS))})"
        )
    return shards


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
        with fs.open(state, "r") as f:
            files = [d["filename"] for d in json.load(f).get("_data_files", [])]
        return [posixpath.join(path, name) for name in files]
    dataset_dict = posixpath.join(path, "dataset_dict.json")
    if fs.isfile(dataset_dict):
        with fs.open(dataset_dict, "r") as f:
            splits = json.load(f).get("splits", [])
        out: list[str] = []
        for split in splits:
            out += _hf_dataset_files(fs, posixpath.join(path, split)) or []
        return out
    return None


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


def read_shard(shard: Shard, spec: ReadSpec) -> Iterator[pa.Table]:
    """Normalised tables of a shard, in row order: id, text, _valid, _row, kept columns."""
    fs, _ = get_fs(_uri(shard, spec), spec.storage_options)
    reader = {
        "txt": _read_txt,
        "jsonl": _read_jsonl,
        "json": _read_json,
        "csv": _read_arrow_batches,
        "parquet": _read_arrow_batches,
        "arrow": _read_arrow_batches,
    }[shard.format]
    row = 0
    for table in reader(fs, shard, spec):
        n = table.num_rows
        if n == 0:
            continue
        yield _normalise(table, shard, spec, row)
        row += n


def _uri(shard: Shard, spec: ReadSpec) -> str:
    return shard.path


def _read_txt(fs, shard: Shard, spec: ReadSpec) -> Iterator[pa.Table]:
    lines: list[str] = []
    for lineno, raw in enumerate(_binary_lines(fs, shard)):
        lines.append(_decode(raw, shard, lineno, spec).rstrip("\r\n"))
        if len(lines) >= READ_BATCH_ROWS:
            yield pa.table({spec.text_field: pa.array(lines, pa.string())})
            lines = []
    if lines:
        yield pa.table({spec.text_field: pa.array(lines, pa.string())})


def _binary_lines(fs, shard: Shard) -> Iterator[bytes]:
    with fs.open(shard.path, "rb", compression="infer") as f:
        yield from f


def _decode(raw: bytes, shard: Shard, lineno: int, spec: ReadSpec) -> str:
    try:
        return raw.decode("utf-8", errors=spec.encoding_errors)
    except UnicodeDecodeError:
        raise InputError(
            f"{shard.key}: line {lineno + 1} is not valid UTF-8 "
            "(use --encoding-errors replace to embed it with replacement characters)"
        ) from None


def _records_to_table(records: list[dict], shard: Shard, spec: ReadSpec, first_line: int) -> pa.Table:
    columns = {spec.text_field: []}
    if spec.id_field:
        columns[spec.id_field] = []
    for col in spec.keep_columns:
        columns.setdefault(col, [])
    for i, rec in enumerate(records):
        where = f"{shard.key}: record {first_line + i + 1}"
        if not isinstance(rec, dict):
            raise InputError(f"{where} is a JSON {type(rec).__name__}, expected an object")
        for col, values in columns.items():
            if col not in rec:
                if col == spec.text_field:
                    raise InputError(f"{where} has no field {col!r} (set --text-field)")
                raise InputError(f"{where} has no field {col!r}")
            values.append(rec[col])
    table = {}
    for col, values in columns.items():
        if col == spec.text_field:
            for i, v in enumerate(values):
                if v is not None and not isinstance(v, str):
                    raise InputError(
                        f"{shard.key}: record {first_line + i + 1} field {col!r} is a "
                        f"{type(v).__name__}, expected a string"
                    )
            table[col] = pa.array(values, pa.string())
        else:
            try:
                table[col] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                table[col] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    return pa.table(table)


def _read_jsonl(fs, shard: Shard, spec: ReadSpec) -> Iterator[pa.Table]:
    records: list[dict] = []
    first = 0
    count = 0
    for lineno, raw in enumerate(_binary_lines(fs, shard)):
        line = _decode(raw, shard, lineno, spec).strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{shard.key}: line {lineno + 1} is not valid JSON ({exc.msg})") from None
        count += 1
        if len(records) >= READ_BATCH_ROWS:
            yield _records_to_table(records, shard, spec, first)
            first, records = count, []
    if records:
        yield _records_to_table(records, shard, spec, first)


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
    except UnicodeDecodeError:
        raise InputError(f"{shard.key}: not valid UTF-8 (use --encoding-errors replace)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{shard.key}: line {exc.lineno} is not valid JSON ({exc.msg})") from None
    for start in range(0, len(records), READ_BATCH_ROWS):
        yield _records_to_table(records[start : start + READ_BATCH_ROWS], shard, spec, start)


def _read_arrow_batches(fs, shard: Shard, spec: ReadSpec) -> Iterator[pa.Table]:
    wanted = [spec.text_field] + ([spec.id_field] if spec.id_field else []) + list(spec.keep_columns)
    wanted = list(dict.fromkeys(wanted))
    try:
        with fs.open(shard.path, "rb", compression="infer" if shard.format == "csv" else None) as f:
            for batch in _arrow_batches(f, shard, wanted):
                missing = [c for c in wanted if c not in batch.schema.names]
                if missing:
                    hint = " (set --text-field)" if spec.text_field in missing else ""
                    raise InputError(
                        f"{shard.key}: no column {missing[0]!r}{hint}; columns are {batch.schema.names}"
                    )
                table = pa.Table.from_batches([batch]).select(wanted)
                text = table[spec.text_field]
                if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type) or pa.types.is_null(text.type)):
                    raise InputError(
                        f"{shard.key}: column {spec.text_field!r} has type {text.type}, expected strings"
                    )
                yield table
    except InputError:
        raise
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        if isinstance(exc, UnicodeDecodeError) or "UTF8" in str(exc) or "utf-8" in str(exc).lower():
            raise InputError(f"{shard.key}: not valid UTF-8 ({_describe_os_error(exc)})") from None
        raise InputError(f"{shard.key}: cannot read {shard.format} ({_describe_os_error(exc)})") from None


def _arrow_batches(f, shard: Shard, wanted: Sequence[str]) -> Iterator[pa.RecordBatch]:
    if shard.format == "parquet":
        pf = pq.ParquetFile(f)
        present = [c for c in wanted if c in pf.schema_arrow.names]
        yield from pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=present or None)
        if not present:
            return
    elif shard.format == "csv":
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(block_size=4 << 20),
            convert_options=pacsv.ConvertOptions(
                column_types={wanted[0]: pa.string()}, strings_can_be_null=False
            ),
        )
        yield from reader
    else:  # arrow: `datasets` save_to_disk writes the IPC stream format
        data = f.read()
        try:
            reader = pa.ipc.open_stream(data)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(data)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


def _normalise(table: pa.Table, shard: Shard, spec: ReadSpec, first_row: int) -> pa.Table:
    n = table.num_rows
    rows = pa.array(range(first_row, first_row + n), pa.int64())
    texts = table[spec.text_field].cast(pa.string()).combine_chunks()

    valid = pc.fill_null(pc.invert(pc.match_substring_regex(texts, r"^\s*$")), False)
    if spec.id_field:
        ids = table[spec.id_field]
        if ids.null_count:
            raise InputError(f"{shard.key}: a row has no value in --id-field {spec.id_field!r}")
        ids = ids.cast(pa.string())
    else:
        ids = pa.array([f"{shard.key}:{r}" for r in range(first_row, first_row + n)], pa.string())
    columns = {"id": ids, "text": pc.fill_null(texts, ""), "_valid": valid, "_row": rows}
    for col in spec.keep_columns:
        if col != spec.text_field:  # the text travels as "text"; the sink restores its name
            columns[col] = table[col]
    return pa.table(columns)


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
