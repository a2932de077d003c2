"""`--format lance`: the output directory is a Lance dataset, each unit of commit one Lance fragment.

The units, their names and their rows are the Parquet sink's (pipeline.storage.sink): one per
chunk of `--rows-per-file` rows of a shard, named as its Parquet file would be (`a.txt.parquet`,
`a.txt-00003.parquet`), now a key. Beside Lance's own `_versions/`, `data/` and `_transactions/`
(which Lance reads; it ignores every other name) live embedpipe's `_run.json`, `_lock.json`,
`_manifest.json` and one small JSON marker per unit. Unit K is committed in four steps:

    1. encoder: its rows become Lance data files under `data/` (`write_fragments`: not committed,
       invisible to every reader);
    2. encoder: `_lance_pending/K.json` names those fragments and holds the unit's statistics and
       the run's settings;
    3. driver (the one committer: the output lock allows one run, and only the driver commits):
       one Lance commit appends the fragments (the first creates the dataset);
    4. driver: the marker moves to `_lance_committed/K.json`.

A resume counts K as committed when its committed marker exists, or its pending marker's data files
are in the dataset's current version (a kill between 3 and 4: step 4 is finished); any other pending
marker is deleted with its data files and K is embedded again. Lance's commit is atomic, so a reader
of a killed run sees a readable dataset of whole units, each once.
"""

from __future__ import annotations

import base64
import json
import logging
import posixpath
import threading
from typing import Any, Mapping

import pyarrow as pa

from pipeline.errors import InputError, PipelineError
from pipeline.storage.filesystems import get_fs, is_local, write_bytes_atomic

log = logging.getLogger(__name__)

PENDING_DIR = "_lance_pending"
COMMITTED_DIR = "_lance_committed"
LANCE_OWN = ("_versions", "data", "_transactions", "_deletions", "_indices")  # what Lance writes in a dataset
LANCE_DIRS = (*LANCE_OWN, COMMITTED_DIR, PENDING_DIR)
MARKER = ".json"


def is_lance(fs, root: str) -> bool:
    """Whether the output at `root` is a Lance output (a dataset, or markers of one)."""
    root = root.rstrip("/")
    return fs.exists(posixpath.join(root, "_versions")) or fs.exists(posixpath.join(root, COMMITTED_DIR))


def dataset_uri(fs, root: str) -> str:
    """What Lance opens: the absolute local path, or the object store URI."""
    return root.rstrip("/") if is_local(fs) else fs.unstrip_protocol(root.rstrip("/"))


def lance_options(storage_options: Mapping[str, Any] | None) -> dict[str, str] | None:
    """fsspec's S3 options as Lance's object store names them (best effort; Lance reads AWS_* too)."""
    if not storage_options:
        return None
    client = dict(storage_options.get("client_kwargs") or {})
    names = {"key": "aws_access_key_id", "secret": "aws_secret_access_key", "token": "aws_session_token",
             "endpoint_url": "aws_endpoint", "region_name": "aws_region"}
    out = {names[k]: str(v) for k, v in {**client, **storage_options}.items() if k in names and v is not None}
    if out.get("aws_endpoint", "").startswith("http://"):
        out["allow_http"] = "true"
    return out or None


def _marker(root: str, where: str, name: str) -> str:
    return posixpath.join(root.rstrip("/"), where, name + MARKER)


def _read_json(fs, path: str) -> dict:
    return json.loads(fs.cat_file(path))


# --------------------------------------------------------------------------- steps 1 and 2 (encoder)


def write_unit(fs, root: str, name: str, table: pa.Table, stats: dict, identity: bytes | None,
               storage_options: Mapping[str, Any] | None = None) -> dict:
    """Write unit `name`'s rows as uncommitted Lance data files and its pending marker; its stats."""
    from lance.fragment import write_fragments

    meta = dict(table.schema.metadata or {})
    meta.pop(b"embedpipe.stats", None)  # per unit: in the marker, not in the dataset's schema
    table = table.replace_schema_metadata(meta or None)
    fragments = []
    if table.num_rows:
        try:
            fragments = write_fragments(table, dataset_uri(fs, root), storage_options=lance_options(storage_options))
        except (OSError, ValueError, RuntimeError) as exc:
            raise PipelineError(f"{name}: writing its Lance data files failed ({_first_line(exc)})") from exc
    marker = {
        "unit": name,
        "fragments": [f.to_json() for f in fragments],
        "schema": base64.b64encode(table.schema.serialize().to_pybytes()).decode(),
        "stats": stats,
        "identity": json.loads(identity) if identity else None,
    }
    write_bytes_atomic(fs, _marker(root, PENDING_DIR, name), json.dumps(marker).encode())
    return stats


def _drop_data(fs, root: str, marker: dict) -> None:
    """Remove the data files of a unit that is not committed (nothing refers to them)."""
    for f in marker["fragments"]:
        for d in f["files"]:
            data = posixpath.join(root.rstrip("/"), "data", d["path"])
            if fs.exists(data):
                fs.rm(data)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]


# --------------------------------------------------------------------------- steps 3 and 4 (driver)


class LanceCommitter:
    """The driver's committer: appends each unit's fragments in one Lance commit, then marks it committed.

    One per run, called from the driver's consumer loop only (the lock guards it all the same).
    """

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None = None):
        self.fs, self.root = get_fs(output, storage_options)
        self.uri = dataset_uri(self.fs, self.root)
        self.options = lance_options(storage_options)
        self._lock = threading.Lock()
        self._dataset = None
        self.done: set[str] = set()

    def __call__(self, name: str) -> None:
        with self._lock:
            try:
                marker = _read_json(self.fs, _marker(self.root, PENDING_DIR, name))
            except FileNotFoundError:
                if name in self.done:  # reported twice, written once: committed already
                    return
                raise PipelineError(f"{name}: its pending Lance marker is missing; rerun to redo it") from None
            if name in self.done or self.fs.exists(_marker(self.root, COMMITTED_DIR, name)):
                _drop_data(self.fs, self.root, marker)  # written again by a redone block: committed once already
                self.fs.rm(_marker(self.root, PENDING_DIR, name))
                return
            if marker["fragments"]:
                self._append(name, marker)
            write_bytes_atomic(self.fs, _marker(self.root, COMMITTED_DIR, name), json.dumps(marker).encode())
            self.fs.rm(_marker(self.root, PENDING_DIR, name))
            self.done.add(name)

    def _append(self, name: str, marker: dict) -> None:
        import lance
        from lance.fragment import FragmentMetadata

        fragments = [FragmentMetadata.from_json(json.dumps(f)) for f in marker["fragments"]]
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(marker["schema"])))
        if self._dataset is None:
            self._dataset = open_dataset(self.fs, self.root, self.options)
        if self._dataset is not None and schema.names != self._dataset.schema.names:
            raise PipelineError(f"{name}: its columns {schema.names} are not the Lance dataset's "
                                f"{self._dataset.schema.names}: a Lance output has one schema; resume with the "
                                "first run's --keep-columns, or use --overwrite")
        try:
            if self._dataset is None:  # the first unit creates the dataset, with the unit's schema
                operation, version = lance.LanceOperation.Overwrite(schema, fragments), None
            else:
                operation, version = lance.LanceOperation.Append(fragments), self._dataset.version
            self._dataset = lance.LanceDataset.commit(
                self.uri, operation, read_version=version, storage_options=self.options,
                commit_message=f"embedpipe: {name}",
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise PipelineError(f"{name}: the Lance commit failed ({_first_line(exc)}); rerun to redo it") from exc


def committer_for(sink) -> LanceCommitter | None:
    """The committer a run's driver calls once a unit's rows are written; None for Parquet."""
    if getattr(sink, "format", "parquet") != "lance":
        return None
    return LanceCommitter(sink.output, sink.storage_options)


# --------------------------------------------------------------------------- the output across runs


def open_dataset(fs, root: str, options: dict | None = None):
    """The Lance dataset at `root`, or None where none was created yet."""
    if not fs.exists(posixpath.join(root.rstrip("/"), "_versions")):
        return None
    import lance

    return lance.dataset(dataset_uri(fs, root), storage_options=options)


def _data_files(dataset) -> set[str]:
    if dataset is None:
        return set()
    return {d.path for fragment in dataset.get_fragments() for d in fragment.data_files()}


def _marker_paths(fs, root: str, where: str) -> dict[str, str]:
    try:
        paths = fs.ls(posixpath.join(root.rstrip("/"), where), detail=False, refresh=True)
    except FileNotFoundError:
        return {}
    return {posixpath.basename(p)[: -len(MARKER)]: p for p in paths
            if p.endswith(MARKER) and not posixpath.basename(p).startswith(("_", "."))}


def _in_dataset(marker: dict, files: set[str]) -> bool:
    """Whether a pending unit's rows are committed: its data files are in the dataset (a unit without
    rows has nothing to commit: its marker is complete)."""
    return all(d["path"] in files for f in marker["fragments"] for d in f["files"])


def committed_units(fs, root: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """{unit: its marker} of every committed unit, read only: committed markers, and pending ones whose
    data files the dataset holds (a run killed between its commit and moving the marker)."""
    markers = {n: _read_json(fs, p) for n, p in _marker_paths(fs, root, COMMITTED_DIR).items()}
    pending = _marker_paths(fs, root, PENDING_DIR)
    if pending:
        files = _data_files(open_dataset(fs, root, lance_options(storage_options)))
        for name, path in pending.items():
            marker = _read_json(fs, path)
            if name not in markers and _in_dataset(marker, files):
                markers[name] = marker
    return markers


def unit_facts(fs, root: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    """{unit: FileFacts} for the resume checks (pipeline.identity), as a Parquet file's footer gives them."""
    from pipeline.identity import FileFacts

    if not is_lance(fs, root) and not fs.exists(posixpath.join(root.rstrip("/"), PENDING_DIR)):
        return {}
    return {n: FileFacts(m.get("stats"), m.get("identity")) for n, m in committed_units(fs, root, storage_options).items()}


def clear_leftovers(fs, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Finish what a killed run left: a pending unit the dataset holds is marked committed (step 4);
    any other pending unit is dropped with its data files, to be embedded again."""
    pending_dir = posixpath.join(root.rstrip("/"), PENDING_DIR)
    if not fs.exists(pending_dir):
        return
    files = _data_files(open_dataset(fs, root, lance_options(storage_options)))
    for name, path in _marker_paths(fs, root, PENDING_DIR).items():
        marker = _read_json(fs, path)
        if _in_dataset(marker, files):
            write_bytes_atomic(fs, _marker(root, COMMITTED_DIR, name), json.dumps(marker).encode())
        else:
            _drop_data(fs, root, marker)
            log.info("%s: not committed by the run that wrote it; it is embedded again", name)
        fs.rm(path)
    fs.rm(pending_dir, recursive=True)


# --------------------------------------------------------------------------- reading


def _unit_order(fs, root: str, dataset, storage_options) -> list:
    """The dataset's fragments, unit after unit in name order (as a Parquet output's files are read),
    then any no marker names."""
    fragments = dataset.get_fragments()
    by_file = {d.path: f for f in fragments for d in f.data_files()}
    ordered, seen = [], set()
    for _, marker in sorted(committed_units(fs, root, storage_options).items()):
        for f in marker["fragments"]:
            fragment = by_file.get(f["files"][0]["path"]) if f["files"] else None
            if fragment is not None and fragment.fragment_id not in seen:
                ordered.append(fragment)
                seen.add(fragment.fragment_id)
    return ordered + [f for f in fragments if f.fragment_id not in seen]


def read_table(path: str, storage_options: Mapping[str, Any] | None = None, columns: list[str] | None = None,
               limit: int | None = None) -> pa.Table | None:
    """The rows of the Lance output at `path` (`columns`, at most `limit`), unit after unit; None if it
    holds no dataset yet."""
    fs, root = get_fs(path, storage_options)
    dataset = open_dataset(fs, root, lance_options(storage_options))
    if dataset is None:
        return None
    missing = [c for c in columns or () if c not in dataset.schema.names]
    if missing:
        raise InputError(f"{path}: the Lance dataset has no {missing[0]!r} column (it has {dataset.schema.names})")
    tables, rows = [], 0
    for fragment in _unit_order(fs, root, dataset, storage_options):
        if limit is not None and rows >= limit:
            break
        tables.append(fragment.to_table(columns=columns))
        rows += tables[-1].num_rows
    table = pa.concat_tables(tables) if tables else dataset.schema.empty_table().select(columns or dataset.schema.names)
    return table.slice(0, limit) if limit is not None else table


def problems(fs, root: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """One line per committed unit whose settings are not the output's (`_run.json`, else the first unit's)."""
    from pipeline.identity import differences, read_run

    units = committed_units(fs, root, storage_options)
    reference = read_run(fs, root.rstrip("/"))
    if reference is None:
        reference = next((units[n]["identity"] for n in sorted(units) if units[n].get("identity")), None)
    out = []
    for name in sorted(units):
        own = units[name].get("identity")
        if own is None or reference is None:
            continue
        found = differences(reference["settings"], own["settings"])
        if found:
            key, ref_value, value = found[0]
            out.append(f"{name}: made with {key}={value!r}, the rest of the output with {key}={ref_value!r}")
    return out


def read_vectors(path: str, storage_options: Mapping[str, Any] | None = None,
                 allow_mixed: bool = False) -> pa.Table | None:
    """`id` and `embedding` of a Lance output, unit after unit, for pipeline.read_embeddings (which
    decodes them as it decodes Parquet files'); None where it holds no dataset yet. Units of other
    settings are refused unless `allow_mixed`, sparse vectors always."""
    fs, root = get_fs(path, storage_options)
    found = [] if allow_mixed else problems(fs, root, storage_options)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise InputError(f"{path}: {found[0]}{more}; units of different settings are not read together")
    dataset = open_dataset(fs, root, lance_options(storage_options))
    if dataset is not None and "embedding" not in dataset.schema.names:
        raise InputError(f"{path}: holds sparse vectors (indices, values); read them with lance.dataset({path!r})")
    return read_table(path, storage_options, ["id", "embedding"])


# --------------------------------------------------------------------------- --overwrite


def swap_plan(fs, root: str, staging: str) -> dict | None:
    """For pipeline.storage.output's swap: the Lance directories to move in from `staging` (a new Lance
    output) and those of an old Lance output in `root` to remove; None where neither is Lance."""
    moves = [d for d in LANCE_DIRS if fs.exists(posixpath.join(staging, d))]
    old = [d for d in LANCE_DIRS if d not in moves and fs.exists(posixpath.join(root, d))] if is_lance(fs, root) else []
    return {"moves": moves, "remove": old} if moves or old else None


def finish_swap(fs, root: str, staging: str, plan: dict | None) -> None:
    """Carry out `swap_plan`'s plan; idempotent (a directory already moved is not moved again)."""
    if not plan:
        return
    for d in plan["remove"]:
        if fs.exists(posixpath.join(root, d)):
            fs.rm(posixpath.join(root, d), recursive=True)
    for d in plan["moves"]:
        source, target = posixpath.join(staging, d), posixpath.join(root, d)
        if fs.exists(source):
            if fs.exists(target):
                fs.rm(target, recursive=True)
            fs.mv(source, target, recursive=True)
