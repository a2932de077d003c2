"""`embedpipe embed`: documents in, Parquet files of at most --rows-per-file rows out, exactly once, `_manifest.json` last.

    discover shards -> describe the model -> check a resume (pipeline.identity) -> group the shards
      (pipeline.storage.packing) -> plan (pipeline.engine.plan) -> run the chain (pipeline.engine.chain)
      -> manifest (pipeline.manifest), or swap in an --overwrite
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline.config import EmbedConfig
from pipeline.engine.calibration import calibrate, quantization_source, vector_format
from pipeline.engine.chain import run_chain
from pipeline.engine.cluster import prepare_output, ray_session_for
from pipeline.engine.plan import Plan, cpu_encoder_path, plan_from_cluster, planned_dtype
from pipeline.errors import UsageError
from pipeline.identity import (
    RUN_FILE, FileFacts, check_resume, file_metadata, read_all_facts, read_manifest, read_run, run_document,
    run_identity, write_run,
)
from pipeline.manifest import write as write_manifest
from pipeline.models.describe import ModelFacts
from pipeline.models.loading import check_model
from pipeline.quantization import NEEDS_RANGES, VectorFormat, dim_of_width
from pipeline.storage.output import (
    clear_leftovers, clear_staging, committed_files, finish_swap, staging_uri, swap_in,
)
from pipeline.storage.lance_sink import open_dataset, unit_facts
from pipeline.storage.lock import output_lock
from pipeline.storage.packing import Group, describe as describe_groups, group_done, planned_groups, write_plan
from pipeline.storage.sink import SinkSpec, read_file_stats
from pipeline.storage.sources import check_fields, discover_shards

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output: str
    documents: int
    embedded: int
    invalid: int
    truncated: int
    tokens: int
    seconds: float
    files_written: int
    files_skipped: int
    manifest: dict[str, Any] = field(repr=False)
    chunks: int | None = None
    """With --chunk-tokens: the chunks embedded (rows of the output); None without."""
    mined: Any = None
    """The MineResult of `embed --mine` (pipeline.embed with mine=True), else None."""

    @property
    def docs_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        return (
            f"embedded {self.embedded:,} documents{self._as_chunks()} ({self.tokens:,} tokens, {self.truncated:,} truncated, "
            f"{self.invalid:,} empty skipped, {self.files_skipped} file(s) already done) in "
            f"{self.seconds:.1f}s: {self.docs_per_second:,.0f} docs/s -> {self.output}"
        )


    def _as_chunks(self) -> str:
        return "" if self.chunks is None else f" as {self.chunks:,} chunks"


def run_embed(config: EmbedConfig) -> RunResult:
    """Embed `config.input` into `config.output`; resume unless `config.overwrite`."""
    started = time.time()
    shards = discover_shards(config.input, config.storage_options, config.document_per_file)
    check_fields(shards, config.id_field, config.keep_columns, config.text_field)
    check_model(config)  # a wrong model, or an option its kind refuses, is refused before anything starts
    # The model is described by a child process while Ray starts (see pipeline.models.describe).
    # Until the model is known and a resume is found compatible, the output is only read.
    describing = ModelFacts(config)
    with describing, _output_removed_on_error(config.output):
        fs, root = prepare_output(config.output, config.storage_options)
        with output_lock(fs, root, config.output, "embed"):  # one run per output (pipeline.storage.lock)
            return _run_locked(config, started, shards, describing, fs, root)


def _run_locked(config: EmbedConfig, started: float, shards, describing: ModelFacts, fs, root: str) -> RunResult:
    if finish_swap(fs, root):
        log.warning("finished replacing %s, which an --overwrite run had left half-swapped", config.output)
    earlier = Earlier() if config.overwrite else _earlier_output(fs, root, config.storage_options)
    # the output's plan of groups is kept once a file is committed (pipeline.storage.packing);
    # groups with every file committed are not read at all
    done = {name: facts.stats for name, facts in earlier.facts.items()}
    groups, new_plan = planned_groups(fs, root, shards, config.rows_per_file, done, config.pack_files)
    todo = [g for g in groups if not group_done(g, done, config.rows_per_file)]
    fmt = None
    if earlier.facts:  # a resume with other settings is refused before a cluster starts
        info, vectors = describing.result()[:2]
        fmt = vector_format(config, info, vectors, earlier.run)
        check_resume(config, info, run_identity(config, info, planned_dtype(config, None), fmt), *earlier)
    with ray_session_for(config.ray_address, config.quiet) if todo else contextlib.nullcontext():
        info, vectors, tokenizer_spec = describing.result()
        check_chunking(config, info, tokenizer_spec)
        plan = plan_from_cluster(config, vectors.get("vocab_size"), info.weights_per_token) if todo else None
        fmt, source = _vector_format(config, info, vectors, earlier, shards, plan, fmt)
        identity = run_identity(config, info, planned_dtype(config, plan), fmt, source)
        target, target_uri = _target(config, fs, root, info, identity, earlier, bool(todo))
        if todo and new_plan:  # before the first commit
            write_plan(fs, target, groups, config.rows_per_file)
        sink = SinkSpec(target_uri, config.text_field, config.keep_columns, fmt,
                        config.storage_options, file_metadata(identity), config.format,
                        plan is not None and plan.writer == "separate")
        written, stage_times, replicas = {}, {}, []
        if todo:
            graph = _onnx_graph(config, plan, info)
            chain_started = time.time()
            written, stage_times, replicas = run_chain(config, plan, todo, frozenset(earlier.facts), sink, graph,
                                                       tokenizer_spec)
            stage_times = {"chain_started_s": round(chain_started - started, 3), **stage_times}
    if todo:
        clear_leftovers(fs, target, config.storage_options)  # every chunk has been joined; only empty folders remain
    stats = _file_stats(config, fs, root, groups, written, earlier.facts)
    finished = time.time()
    manifest = _manifest(
        config, info, plan, groups, stats, started, finished, fs, target, stage_times, replicas, vectors, identity,
        fmt, source, sum(len(g.shards) for g in todo),
    )
    if config.overwrite:
        swap_in(fs, root, manifest, committed_files(fs, root), run_document(identity))
    else:
        write_manifest(fs, root, manifest)
    return RunResult(
        output=config.output, documents=manifest["rows"]["documents"],
        embedded=sum(s["embedded"] for s in written.values()), invalid=manifest["rows"]["invalid"],
        truncated=manifest["rows"]["truncated"], tokens=sum(s["tokens"] for s in written.values()),
        seconds=finished - started, files_written=len(written), files_skipped=len(stats) - len(written),
        manifest=manifest, chunks=sum(s.get("chunks", 0) for s in written.values()) if config.chunk_tokens else None,
    )


@dataclass(frozen=True)
class Earlier:
    """What earlier runs left in the output: its `_run.json`, its manifest, and its committed files' footers."""

    run: dict | None = None
    manifest: dict | None = None
    facts: dict[str, FileFacts] = field(default_factory=dict)

    def __iter__(self):  # check_resume(config, info, identity, run, manifest, facts)
        return iter((self.run, self.manifest, self.facts))


def _vector_format(config: EmbedConfig, info, vectors: dict, earlier: Earlier, shards, plan: Plan | None,
                   fmt: VectorFormat | None = None):
    """(what the run stores, how its int8/uint8 ranges were obtained): a file's or the resumed run's
    ranges, else ranges computed now from sampled documents (pipeline.engine.calibration). `fmt`: the
    format a resume already worked out before the cluster started (its --calibration file read once)."""
    bound = earlier.run if earlier.facts else None  # a run that committed nothing binds nothing
    fmt = fmt or vector_format(config, info, vectors, bound)
    source = quantization_source(config, bound)
    if fmt.precision in NEEDS_RANGES and fmt.ranges is None and plan is not None:
        fmt, source = calibrate(config, fmt, shards, plan.device)
    return fmt, source


def _earlier_output(fs, root: str, storage_options=None) -> Earlier:
    """`facts`: the committed Parquet files' footers and a Lance output's committed units' markers."""
    facts = {**read_all_facts(fs, committed_files(fs, root)), **unit_facts(fs, root, storage_options)}
    return Earlier(read_run(fs, root), read_manifest(fs, root), facts)


def _target(config: EmbedConfig, fs, root: str, info, identity: dict, earlier: Earlier, work: bool) -> tuple[str, str]:
    """Where this run commits (path, URI): the output itself on a resume (checked once more, now with
    the planned dtype), `_overwrite/` for --overwrite. Leftovers of killed runs are cleared, and the
    run's identity is written there before the first commit (a resume keeps the first run's)."""
    if config.overwrite:
        target, target_uri = clear_staging(fs, root), staging_uri(config.output)
    else:
        check_resume(config, info, identity, *earlier)
        clear_staging(fs, root)
        target, target_uri = root, config.output
    clear_leftovers(fs, target, config.storage_options)
    if work and (earlier.run is None or not earlier.facts):
        write_run(fs, target, identity)
    return target, target_uri


def _file_stats(config: EmbedConfig, fs, root: str, groups, written: dict, facts: dict[str, FileFacts]) -> dict:
    """The statistics of every file of the output for the manifest: this run's, and on a resume
    those of earlier files of the planned shards (read from their footers at the start)."""
    stats = dict(written)
    if config.overwrite:
        return stats
    shard_keys = {s.key for g in groups for s in g.shards}
    for name, path in {**committed_files(fs, root), **dict.fromkeys(facts)}.items():  # Lance units: no path
        file_stats = None if name in stats else (facts[name].stats if name in facts else read_file_stats(fs, path))
        if file_stats is not None and file_stats.get("shard") in shard_keys:
            stats[name] = file_stats
    return stats


def check_chunking(config: EmbedConfig, info, spec) -> None:
    """--chunk-tokens needs the model's fast tokenizer (its offsets place the cuts) and must leave
    room in the model's window for its special tokens and prompt."""
    if not config.chunk_tokens:
        return
    if spec is None:
        raise UsageError(f"--chunk-tokens: model {info.name} has no fast (Rust) tokenizer for plain text, whose "
                         "character offsets embedpipe cuts by")
    from pipeline.models.fast_tokenizer import PlainTokenizer

    overhead = int(PlainTokenizer(spec).encode([""])[1][0])  # special tokens and the prompt
    room = spec.max_len - overhead if spec.max_len else None
    if room is not None and config.chunk_tokens > room:
        raise UsageError(f"--chunk-tokens {config.chunk_tokens}: model {info.name} reads {spec.max_len} tokens, "
                         f"{overhead} of them special tokens and prompt; at most {room}")


def _onnx_graph(config: EmbedConfig, plan: Plan, info):
    """The model's checked ONNX graph in the object store, for CPU encoders (every node gets the
    same graph without a shared disk); None where PyTorch runs the model."""
    if config.backend == "onnx" and info.kind != "dense":
        raise UsageError(f"--backend onnx: model {config.model} is a {info.kind} model; onnx is for dense models")
    path = cpu_encoder_path(config, info.kind)
    if plan.device != "cpu" or path == "torch":
        return None
    from pipeline.models.onnx_graph import graph_for

    graph = graph_for(config, info.fingerprint, required=config.backend == "onnx" or path == "int8")
    if graph is None:
        return None
    import ray

    return ray.put(graph)


@contextlib.contextmanager
def _output_removed_on_error(output: str) -> Iterator[None]:
    """A local output directory this run created is removed again if the run fails before
    writing anything into it (a refused model option leaves no trace)."""
    fresh = "://" not in output and not os.path.exists(output)
    try:
        yield
    except BaseException:
        if fresh and os.path.isdir(output) and set(os.listdir(output)) <= {RUN_FILE}:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output, RUN_FILE))  # it guards no committed file
            os.rmdir(output)
        raise


def _manifest(
    config, info, plan, groups: list[Group], stats, started, finished, fs, root, stage_times=None, replicas=(), vectors=None,
    identity=None, fmt: VectorFormat | None = None, source: dict | None = None, shards_read: int = 0,
) -> dict[str, Any]:
    """The output's `_manifest.json` (pipeline.manifest). `vectors`: kind ('dense' or 'sparse'), and for
    sparse outputs the vocabulary size (their dimension) and the terms kept per document."""
    from pipeline import manifest

    files = sorted(stats.values(), key=lambda s: s["file"])
    per_group = _per_group(groups, files)
    totals = {k: sum(s[k] for s in files) for k in ("embedded", "invalid", "truncated", "tokens")}
    totals["documents"] = sum(s["rows"] for s in files)
    if config.chunk_tokens:
        totals["chunks"] = sum(s.get("chunks", 0) for s in files)
        totals["chunks_per_document"] = {
            "mean": round(totals["chunks"] / totals["embedded"], 3) if totals["embedded"] else 0.0,
            "max": max((s.get("max_chunks", 0) for s in files), default=0),
        }
    vectors = dict(vectors or {"kind": "dense"})
    kind = vectors.pop("kind")
    return manifest.build(
        kind, rows=totals, files=files, config=config, started=started, finished=finished, model=info.as_dict(),
        # per stage and step kind: count, busy seconds, first start and last end (seconds after
        # the Ray chain started, itself chain_started_s after the run started)
        timings={"stages": stage_times or {}},
        identity={"hash": identity["hash"], "settings": identity["settings"]} if identity else None,
        dim=vectors["vocab_size"] if kind == "sparse" else (fmt and fmt.dim) or _dimension(fs, root, files, config),
        table_format=config.format,
        **{k: v for k, v in vectors.items() if k in ("vocab_size", "sparse_top_k")},
        **_stored_vectors(config, kind, fmt, source),
        chunking={"tokens": config.chunk_tokens, "overlap": config.chunk_overlap} if config.chunk_tokens else None,
        pooling=info.pooling,
        normalize=info.normalize,
        max_seq_length=info.max_seq_length,
        dtype=_compute_dtype(config, plan, replicas),
        backend=_backend(replicas),
        input=describe_groups(groups),
        shards=per_group,
        shards_read=shards_read,
        resources=plan.as_dict() if plan else None,
        replicas=_replicas(replicas),
    )


def _per_group(groups: list[Group], files: list[dict]) -> list[dict]:
    """The manifest's `shards`: per group (one shard, or a range of small shards packed together), its
    files and rows; a file belongs to the group of its first shard. Compact for 100,000 small shards."""
    entries, where = [], {}
    for group in groups:
        entry = {"shard": group.key, "files": [], "rows": 0, "embedded": 0}
        if group.packed:
            entry.update(last_shard=group.last_key, count=len(group.shards))
        entries.append(entry)
        where.update((s.key, entry) for s in group.shards)
    for s in files:
        entry = where.get(s["shard"])
        if entry is not None:
            entry["files"].append(s["file"])
            entry["rows"] += s["rows"]
            entry["embedded"] += s["embedded"]
    return entries


def _stored_vectors(config: EmbedConfig, kind: str, fmt: VectorFormat | None, source: dict | None) -> dict[str, Any]:
    """The manifest's keys on what is stored of each vector."""
    fmt = fmt or VectorFormat(config.precision)
    out: dict[str, Any] = {"precision": fmt.precision, "output_dtype": fmt.precision}
    if kind == "dense":
        out.update(truncate_dim=fmt.truncate_dim, bytes_per_vector=fmt.bytes_per_vector, quantization=None)
        if fmt.ranges is not None:
            out["quantization"] = {"precision": fmt.precision, "ranges": [list(r) for r in fmt.ranges], "source": source}
    return out


def _compute_dtype(config: EmbedConfig, plan: Plan | None, replicas) -> str:
    used = {r["dtype"] for r in replicas if r.get("stage") == "encode" and r.get("dtype")}
    if len(used) == 1:
        return used.pop()
    if config.dtype != "auto":
        return config.dtype
    return "float16" if plan and plan.device == "cuda" else "float32"


def _backend(replicas) -> str | None:
    """What ran the model in this run's encoders: 'onnxruntime' or 'torch' ('+'-joined should they differ),
    or None when nothing was encoded."""
    used = sorted({r["backend"] for r in replicas if r.get("stage") == "encode" and r.get("backend")})
    return "+".join(used) or None


def _replicas(replicas) -> dict[str, Any]:
    """Where this run's stage actors ran: per stage, one entry per actor (node, IP, GPUs, device),
    and how many ran on each node."""
    out: dict[str, Any] = {}
    for stage in ("tokenize", "encode"):
        entries = sorted((r for r in replicas if r.get("stage") == stage), key=lambda r: (r["node_ip"], r["node_id"]))
        per_node: dict[str, int] = {}
        for r in entries:
            per_node[r["node_id"]] = per_node.get(r["node_id"], 0) + 1
        out[stage] = {"actors": [{k: v for k, v in r.items() if k != "stage"} for r in entries], "per_node": per_node}
    return out


def _dimension(fs, root: str, files: list[dict], config: EmbedConfig) -> int | None:
    """The vectors' dimension from the first file's schema (where the model declared none)."""
    import pyarrow.parquet as pq

    precision = config.precision
    if config.format == "lance":
        dataset = open_dataset(fs, root)
        return dim_of_width(precision, dataset.schema.field("embedding").type.list_size) if dataset else None
    for s in files:
        with fs.open(posixpath.join(root, s["file"]), "rb") as f:
            return dim_of_width(precision, pq.read_schema(f).field("embedding").type.list_size)
    return None
