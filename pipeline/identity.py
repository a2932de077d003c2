"""A run's identity: every setting that changes the vectors or the files, fixed before the first commit.

An output holds the vectors of one model under one set of settings, or it is
wrong without a word. So before a run commits its first file it writes
`_run.json` (hidden from readers, like `_manifest.json`), and every file it
commits carries the same settings in its Parquet key-value metadata
(`embedpipe.settings`). A resume compares itself against both, whether or not
a manifest exists; `embedpipe info`, `read_embeddings` and `mine` check that an
output's files agree with each other.

Outputs written before this existed (a manifest, no `_run.json`, no file
metadata) still resume: the manifest is their identity, and the files it or
embedpipe's own statistics vouch for are trusted.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import pyarrow.parquet as pq

from pipeline.errors import InputError, UsageError
from pipeline.manifest import read as read_manifest
from pipeline.storage.sink import SETTINGS_KEY, STATS_KEY
from pipeline.storage.filesystems import write_bytes_atomic

if TYPE_CHECKING:
    from pipeline.config import EmbedConfig
    from pipeline.models.loading import ModelInfo

log = logging.getLogger(__name__)

RUN_FILE = "_run.json"
RUN_FORMAT = "embedpipe/run"
RUN_FORMAT_VERSION = 1

# The settings compared on resume, in the order a refusal reports them. A later feature adds its
# setting here and, in ASSUMED, the value an identity written before it implies (e.g. a precision
# setting would assume "float32"), so that older outputs still resume.
IDENTITY_KEYS = (
    "model", "kind", "pooling", "normalize", "max_seq_length", "prompt", "dtype", "precision", "truncate_dim",
    "dim", "quantization", "sparse_top_k", "chunking", "rows_per_file", "text_field", "id_field", "document_per_file",
    "format",
)
ASSUMED: dict[str, Any] = {"truncate_dim": None, "quantization": None, "chunking": None, "document_per_file": False,
                           "format": "parquet"}
RENAMED = {"precision": "output_dtype"}  # a setting's name in identities written before it was renamed
READ_THREADS = 16  # footers read at once: one or two small requests each on S3


def run_identity(config, info, dtype: str | None, vectors=None, source: dict | None = None) -> dict[str, Any]:
    """This run's settings as plain JSON data. `dtype` is the compute dtype (float32, float16,
    bfloat16, int8); None when it cannot be known (no cluster was needed), and then not compared.
    `vectors` (pipeline.quantization.VectorFormat): what is stored; int8/uint8 ranges not yet
    computed are not compared. `source`: how those ranges were obtained (kept in `_run.json`)."""
    settings = {
        "model": info.fingerprint,
        "kind": info.kind,
        "pooling": info.pooling,
        "normalize": info.normalize,
        "max_seq_length": info.max_seq_length,
        "prompt": info.prompt,
        "dtype": dtype,
        "precision": config.precision,
        "truncate_dim": vectors.truncate_dim if vectors else None,
        "dim": vectors.dim if vectors else None,
        "quantization": {"ranges": [list(r) for r in vectors.ranges]} if vectors and vectors.ranges else None,
        "sparse_top_k": config.sparse_top_k,
        "chunking": {"tokens": config.chunk_tokens, "overlap": config.chunk_overlap} if config.chunk_tokens else None,
        "rows_per_file": config.rows_per_file,
        "text_field": config.text_field,
        "id_field": config.id_field,
        "document_per_file": config.document_per_file,
        "format": config.format,
    }
    if dtype is None:
        del settings["dtype"]
    if settings["dim"] is None:
        del settings["dim"]
    if config.precision in ("int8", "uint8") and settings["quantization"] is None:
        del settings["quantization"]  # computed once the cluster runs
    identity = {"settings": settings, "hash": settings_hash(settings), "model_name": info.name}
    if source:
        identity["quantization_source"] = source
    return identity


def settings_hash(settings: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def file_metadata(identity: dict[str, Any]) -> bytes:
    """What each committed file carries under SETTINGS_KEY."""
    return json.dumps(identity, sort_keys=True).encode()


# --------------------------------------------------------------------------- _run.json


def read_run(fs, root: str) -> dict | None:
    """The `_run.json` in `root`, or None. One that cannot be read is an error: it may guard vectors."""
    path = posixpath.join(root, RUN_FILE)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        run = json.loads(data)
        run["settings"]  # noqa: B018 - the one key every reader needs
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise UsageError(f"{path}: unreadable; it records the settings of the vectors beside it; "
                         "use --overwrite to embed again") from None
    if run.get("format_version", 1) > RUN_FORMAT_VERSION:
        raise UsageError(f"{path}: written by a newer embedpipe (format version {run['format_version']}); "
                         "upgrade embedpipe or use another output")
    return run


def run_document(identity: dict[str, Any]) -> dict[str, Any]:
    from pipeline import __version__

    return {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        **identity,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        "embedpipe": __version__,
    }


def write_run(fs, root: str, identity: dict[str, Any]) -> None:
    write_bytes_atomic(fs, posixpath.join(root, RUN_FILE), json.dumps(run_document(identity), indent=2).encode())


# --------------------------------------------------------------------------- comparing


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, old value, new value) for every compared setting that differs. A setting
    missing from `new` is unknown here and not compared; one missing from `old` takes ASSUMED's value."""
    out = []
    for key in IDENTITY_KEYS:
        if key not in new and RENAMED.get(key) in new:
            new = {**new, key: new[RENAMED[key]]}  # `new` may be a file of an earlier version too
        if key not in new:
            continue
        if key in old:
            before = old[key]
        elif RENAMED.get(key) in old:
            before = old[RENAMED[key]]
        elif key in ASSUMED:
            before = ASSUMED[key]
        else:
            continue
        if _plain(before) != _plain(new[key]):
            out.append((key, before, new[key]))
    return out


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples and lists alike, as JSON stores them


def describe_difference(key: str, old: Any, new: Any, old_model: str | None, new_model: str | None) -> str:
    """'<what the vectors were made with>, this run has <...>' for one setting."""
    if key == "model":
        return (f"vectors of another model ({old_model or 'unnamed'}, {old}), this run's is "
                f"{new_model or 'unnamed'} ({new})")
    if key == "quantization":
        return ("int8/uint8 vectors quantised with other ranges than this run's (--calibration); a resume "
                "reuses the output's own ranges: drop --calibration")
    if key == "dtype" and "int8" in (old, new):
        return (f"vectors computed with dtype={old!r}, this run has {new!r}; int8 and floating-point "
                "vectors are not mixed in one output")
    if key == "chunking":
        return f"vectors of {_chunking(old)}, this run embeds {_chunking(new)}"
    if key == "format":
        return f"a {old} output (--format {old}), this run writes --format {new}; one output holds one format"
    return f"vectors made with {key}={old!r}, this run has {new!r}"


def _chunking(value: dict | None) -> str:
    if not value:
        return "whole documents (no --chunk-tokens)"
    return f"chunks of at most {value['tokens']} tokens sharing {value['overlap']} (--chunk-tokens/--chunk-overlap)"


def check_against(stored: dict[str, Any], identity: dict[str, Any], where: str) -> None:
    """Refuse (UsageError) when `stored` (a `_run.json` or a file's metadata) differs from this run."""
    found = differences(stored["settings"], identity["settings"])
    if found:
        key, old, new = found[0]
        what = describe_difference(key, old, new, stored.get("model_name"), identity.get("model_name"))
        raise UsageError(f"{where} holds {what}; use another output or --overwrite")


# --------------------------------------------------------------------------- the files of an output


@dataclass(frozen=True)
class FileFacts:
    """What a committed file's footer says: embedpipe's row statistics and the settings it was made with."""

    stats: dict | None
    identity: dict | None


def read_facts(fs, path: str) -> FileFacts:
    with fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    stats, identity = meta.get(STATS_KEY), meta.get(SETTINGS_KEY)
    return FileFacts(json.loads(stats) if stats else None, json.loads(identity) if identity else None)


def read_all_facts(fs, paths: dict[str, str]) -> dict[str, FileFacts]:
    """{name: FileFacts} of the files `paths` ({name: path}), footers read a few at a time."""
    if not paths:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(READ_THREADS, len(paths))) as pool:
        facts = pool.map(lambda p: read_facts(fs, p), paths.values())
        return dict(zip(paths, facts))


def listed_files(manifest: dict | None) -> frozenset[str] | None:
    """The files a manifest lists (read once per output, not per file), or None without a manifest."""
    if not manifest:
        return None
    return frozenset(entry.get("file") for entry in manifest.get("files", []) if isinstance(entry, dict))


def trusted_without_metadata(name: str, facts: FileFacts, run: dict | None, listed: frozenset[str] | None) -> bool:
    """A file from before file metadata existed: written by embedpipe (it has our statistics), in an
    output whose manifest vouches for it (`listed`: it lists the file, or there is no `_run.json` yet)."""
    if facts.stats is None or listed is None:
        return False
    return name in listed or run is None


def check_resumable(where: str, facts: dict[str, FileFacts], identity: dict, run: dict | None,
                    manifest: dict | None) -> None:
    """Refuse a resume onto files that are not this run's: other settings, or no metadata to tell."""
    unknown, listed = [], listed_files(manifest)
    for name in sorted(facts):
        if facts[name].identity is not None:
            check_against(facts[name].identity, identity, f"{where}: {name}")
        elif not trusted_without_metadata(name, facts[name], run, listed):
            unknown.append(name)
    if not unknown:
        return
    listed = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
    if run is None and not manifest:
        raise UsageError(
            f"{where} holds {len(unknown)} Parquet file(s) ({listed}) and no {RUN_FILE} or _manifest.json "
            "saying what made them (an older embedpipe, or not embedpipe); use --overwrite to embed "
            "everything again, or another output"
        )
    raise UsageError(
        f"{where} holds {listed}, which this output's runs did not write (no embedpipe settings in "
        "the file); move it out, or use --overwrite"
    )


def consistency_problems(fs, root: str, paths: dict[str, str]) -> list[str]:
    """For readers: one line per file of the output in `root` that does not belong with the others.

    The reference is the output's `_run.json`, else the first file that carries settings. A file
    without settings must at least be embedpipe's (carry its statistics); where the output has
    settings to compare with, its manifest must vouch for it too (`trusted_without_metadata`).
    A folder of Parquet files that embedpipe did not write at all (no `_run.json`, no manifest,
    no file of ours) is somebody else's: nothing to check.
    """
    try:
        run = read_run(fs, root)
    except UsageError as exc:
        return [str(exc)]
    manifest = read_manifest(fs, root)
    facts = read_all_facts(fs, paths)
    if run is None and manifest is None and all(f.stats is None and f.identity is None for f in facts.values()):
        return []
    reference = run
    if reference is None:
        reference = next((facts[n].identity for n in sorted(facts) if facts[n].identity is not None), None)
    problems, listed = [], listed_files(manifest)
    for name in sorted(facts):
        own = facts[name].identity
        if own is None:
            if facts[name].stats is None:
                problems.append(f"{name}: not written by embedpipe (no embedpipe metadata in the file)")
            elif reference is not None and not trusted_without_metadata(name, facts[name], run, listed):
                problems.append(f"{name}: not written with this output's settings (no embedpipe settings in the file)")
            continue
        found = differences(reference["settings"], own["settings"])
        if found:
            key, ref_value, value = found[0]
            if key == "model":
                problems.append(f"{name}: made with model {own.get('model_name')} ({value}), the rest of the "
                                f"output with model {reference.get('model_name')} ({ref_value})")
            elif key == "quantization":
                problems.append(f"{name}: int8/uint8 vectors quantised with other ranges than the rest of the output")
            else:
                problems.append(f"{name}: made with {key}={value!r}, the rest of the output with {key}={ref_value!r}")
    return problems


def check_consistent(fs, root: str, paths: dict[str, str], where: str) -> None:
    """InputError naming the first file that does not belong with the others (see consistency_problems)."""
    problems = consistency_problems(fs, root, paths)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{where}: {problems[0]}{more}; files of different settings are not read together")


def names_to_paths(paths: Iterable[str]) -> dict[str, str]:
    return {posixpath.basename(p.rstrip("/")): p for p in paths}


# --------------------------------------------------------------------------- a resume


COMPAT_KEYS = ("fingerprint", "kind", "pooling", "normalize", "max_seq_length", "prompt")


def check_compatible(previous: dict | None, info: ModelInfo, config: EmbedConfig) -> None:
    """An output of an earlier embedpipe (a manifest, no `_run.json`): a resume must not mix vectors
    of different models or settings in it. Newer outputs are checked against their `_run.json`."""
    if not previous:
        return
    if config.format != "parquet":  # such an output is Parquet: embedpipe wrote nothing else then
        raise UsageError(f"--output {config.output} holds {describe_difference('format', 'parquet', config.format, None, None)}; "
                         "use another output or --overwrite")
    old = previous.get("model", {})
    for key in COMPAT_KEYS:
        if key in old and old[key] != getattr(info, key):
            raise UsageError(
                f"--output {config.output} holds vectors made with {key}={old[key]!r}, this run has "
                f"{getattr(info, key)!r}; use another output or --overwrite"
            )
    if (previous.get("dtype") == "int8") != (config.dtype == "int8"):
        raise UsageError(
            f"--output {config.output} holds vectors computed with dtype={previous.get('dtype')!r}, this run has "
            f"{config.dtype!r}; int8 and floating-point vectors are not mixed in one output; use another output or --overwrite"
        )
    for key in ("rows_per_file", "output_dtype", "text_field", "id_field", "sparse_top_k"):
        old_config = previous.get("config", {})
        old_value = old_config.get(key)
        new_value = config.precision if key == "output_dtype" else getattr(config, key)
        if key == "output_dtype" and old_value is None:  # written by a version that records precision instead
            old_value = old_config.get("precision", new_value)
        if key in old_config and old_value != new_value:
            raise UsageError(
                f"--output {config.output} was written with {key}={old_value!r}, this run has "
                f"{new_value!r}; use another output or --overwrite"
            )


def check_resume(config: EmbedConfig, info: ModelInfo, identity: dict, run: dict | None, manifest: dict | None,
                 facts: dict[str, FileFacts]) -> None:
    """Refuse to resume onto vectors of other settings: against the output's `_run.json` (or, for an
    output of an earlier embedpipe, its manifest), then against every committed file's own settings.
    An output with no committed file binds nothing: a run killed before its first commit may be
    restarted with other settings."""
    if not facts:
        return
    where = f"--output {config.output}"
    if run is not None:
        check_against(run, identity, where)
    else:
        check_compatible(manifest, info, config)
    check_resumable(where, facts, identity, run, manifest)
