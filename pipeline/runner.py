"""Builds and runs the Ray Data chain for `embedpipe embed`.

    read shards -> TokenizeStage (CPU actors) -> EncodeStage (GPU/CPU actors, which also write Parquet)

Resources are decided here, from the cluster's, never inside a stage. The
driver only sees one small summary row per file written; it merges chunks
that Ray split across blocks, then writes `_manifest.json` last.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from pipeline.cluster import prepare_output, ray_session_for
from pipeline.config import EmbedConfig
from pipeline.errors import EmbedpipeError, InputError, PipelineError, UsageError
from pipeline.describe import ModelFacts
from pipeline.manifest import write as write_manifest
from pipeline.identity import (
    RUN_FILE, FileFacts, check_against, check_resumable, file_metadata, read_all_facts, read_manifest, read_run, run_document,
    run_identity, write_run,
)
from pipeline.model import ModelInfo, check_model
from pipeline.output import clear_leftovers, clear_staging, finish_swap, staging_uri, swap_in
from pipeline.sink import SinkSpec, merge_pieces, read_file_stats
from pipeline.sources import ReadSpec, Shard, ShardDatasource, discover_shards, output_stem
from pipeline.watchdog import ProgressBoard

log = logging.getLogger(__name__)

READ_CPUS = 0.25  # read and commit tasks are I/O bound; small reservations keep them schedulable
COMMIT_CPUS = 0.25  # the tasks that join a file's pieces
# Rows per block: the unit handed to a tokenizer or encoder call, and balanced over the actors.
# Ray Data hands an actor a whole block (of at least batch_size rows) per task, and a shard's rows
# arrive longest first, so a block's cost follows its rows' lengths: with 1,024-row blocks the first
# block of 10,000 fortunes held 153,562 tokens (3.7x an average one) and took one encoder 89 s of a
# 164 s run while the other finished the rest and waited. 256-row blocks bound the costliest to a
# quarter of that, it comes first, and tokenising the next block overlaps encoding this one.
# A GPU takes larger ones.
CPU_BLOCK_ROWS = 256
GPU_BLOCK_ROWS = 8192
TOKENIZERS_PER_GPU = 8
OBJECT_STORE_BUDGET = 256 << 20  # bytes of blocks Ray Data may hold in the object store at once
ENCODER_CALLS_ON_GPU = 2  # one block encoding, one writing (see _encoder_pool)
TASKS_IN_FLIGHT_PER_ACTOR = 2  # one running, one queued: no gap between blocks, little imbalance at the end
# A CPU encoder takes its next block only when it is free: a block queued behind a long one would
# wait there while the other encoders run dry (the gap between two calls is about 0.1 s).
CPU_ENCODER_TASKS_IN_FLIGHT = 1
TEXT_ROW_BYTES = 256  # a short document with its id and bookkeeping columns, for sizing blocks
MIN_BLOCK_BYTES = 64 << 10
STOP_WAIT_S = 60  # how long a failed run waits for Ray Data's executor to wind down


@dataclass(frozen=True)
class Plan:
    """Actor pools and their reservations for one run."""

    device: str
    num_tokenizers: int
    tokenizer_cpus: float
    num_encoders: int
    encoder_cpus: float
    encoder_gpus: float
    encoder_threads: int | None
    block_rows: int = CPU_BLOCK_ROWS

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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

    @property
    def docs_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        return (
            f"embedded {self.embedded:,} documents ({self.tokens:,} tokens, {self.truncated:,} truncated, "
            f"{self.invalid:,} empty skipped, {self.files_skipped} file(s) already done) in "
            f"{self.seconds:.1f}s: {self.docs_per_second:,.0f} docs/s -> {self.output}"
        )


def plan_resources(config: EmbedConfig, resources: dict[str, float], nodes: int) -> Plan:
    """Pool sizes and reservations that fit the cluster, leaving room for read/write tasks.

    A chain whose actors reserve so many CPUs that read and commit tasks
    cannot be scheduled hangs without an error, so the plan always keeps
    READ_CPUS + COMMIT_CPUS free and refuses what cannot fit.
    """
    cpus = float(resources.get("CPU", 0))
    gpus = float(resources.get("GPU", 0))
    nodes = max(1, nodes)
    device = config.device
    if device == "auto":
        device = "cuda" if gpus >= 1 else "cpu"
    if device == "cuda" and gpus < 1:
        raise UsageError("--device cuda: the Ray cluster has no GPUs")
    if device == "cuda" and config.dtype == "int8":
        raise UsageError("--dtype int8 is the CPU path, and this cluster has GPUs; add --device cpu, or use float16")
    if device == "cuda" and config.backend == "onnx":
        raise UsageError("--backend onnx is the CPU path, and this cluster has GPUs; add --device cpu")
    if cpus < 1:
        raise UsageError(f"the Ray cluster has {cpus:g} CPUs; embedpipe needs at least 1")
    headroom = READ_CPUS + COMMIT_CPUS
    if device == "cuda":
        encoders = config.num_encoders or int(gpus)
        if encoders > gpus:
            raise UsageError(f"--num-encoders {encoders}: the cluster has only {gpus:g} GPUs")
        # One tokenizer keeps up with roughly a tenth of what an H100 encodes (BENCHMARKS.md, GPU):
        # a GPU takes up to TOKENIZERS_PER_GPU of them, as many as the spare cores allow.
        tokenizers = config.num_tokenizers or max(1, min(TOKENIZERS_PER_GPU * encoders, int(cpus - encoders - headroom)))
        tok_cpus, enc_cpus, threads = 1.0, 1.0, None
    else:
        # Single-threaded encoders, one per core, beat one encoder using every core:
        # small GEMMs scale poorly over threads (BENCHMARKS.md, "layout"). On nodes of
        # more than 2 cores one core is left to the tokenizer and to reading and writing.
        # With --encoders-per-node, each replica takes its share of the node's cores as threads, so
        # that its CPU reservation makes Ray spread the replicas evenly over the nodes.
        node_cpus = cpus / nodes
        usable = node_cpus - (1 if node_cpus > 2 else 0)
        if config.encoders_per_node and not config.encoder_threads:
            threads = max(1, int(usable // config.encoders_per_node))
        else:
            threads = config.encoder_threads or 1
        per_node = config.encoders_per_node or max(1, int(usable // threads))
        encoders = config.num_encoders or per_node * nodes
        tokenizers = config.num_tokenizers or nodes
        tok_cpus = 0.5
        enc_cpus = min(float(threads), (cpus - tokenizers * tok_cpus - headroom) / encoders)
    needed = encoders * enc_cpus + tokenizers * tok_cpus + headroom
    if enc_cpus < 0.1 or needed > cpus + 1e-9:
        raise UsageError(
            f"{encoders} encoder(s) and {tokenizers} tokenizer(s) do not fit the cluster's {cpus:g} CPUs; "
            "lower --num-encoders or --num-tokenizers"
        )
    return Plan(
        device, tokenizers, tok_cpus, encoders, round(enc_cpus, 3), 1.0 if device == "cuda" else 0.0, threads,
        GPU_BLOCK_ROWS if device == "cuda" else CPU_BLOCK_ROWS,
    )


def committed_files(fs, root: str) -> dict[str, str]:
    """Final output files already in `root`: {name: path}, from a fresh listing (never s3fs's cache)."""
    try:
        entries = fs.ls(root, detail=False, refresh=True)
    except FileNotFoundError:
        return {}
    out = {}
    for path in entries:
        name = posixpath.basename(path.rstrip("/"))
        if name.endswith(".parquet") and not name.startswith(("_", ".")):
            out[name] = path
    return out


COMPAT_KEYS = ("fingerprint", "kind", "pooling", "normalize", "max_seq_length", "prompt")


def check_compatible(previous: dict | None, info: ModelInfo, config: EmbedConfig) -> None:
    """An output of an earlier embedpipe (a manifest, no `_run.json`): a resume must not mix vectors
    of different models or settings in it. Newer outputs are checked against their `_run.json`."""
    if not previous:
        return
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
        if key in old_config and old_value != getattr(config, key):
            raise UsageError(
                f"--output {config.output} was written with {key}={old_value!r}, this run has "
                f"{getattr(config, key)!r}; use another output or --overwrite"
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


def planned_dtype(config: EmbedConfig, plan: Plan | None) -> str | None:
    """The dtype the encoders will compute in, or None where no plan tells the device."""
    from pipeline.encode import compute_dtype

    device = plan.device if plan is not None else config.device
    if device == "auto":
        return None if config.dtype == "auto" else config.dtype
    return compute_dtype(config.dtype, device)


def _earlier_output(fs, root: str) -> tuple[dict | None, dict | None, dict[str, FileFacts]]:
    """What earlier runs left in `root`: its `_run.json`, its manifest, and its committed files' footers."""
    return read_run(fs, root), read_manifest(fs, root), read_all_facts(fs, committed_files(fs, root))


def run_embed(config: EmbedConfig) -> RunResult:
    """Embed `config.input` into `config.output`; resume unless `config.overwrite`."""
    started = time.time()
    shards = discover_shards(config.input, config.storage_options)
    check_model(config)  # a wrong model, or an option its kind refuses, is refused before anything starts
    # The model is described by a child process while Ray starts (see pipeline.describe).
    # Until the model is known and a resume is found compatible, the output is only read.
    describing = ModelFacts(config)
    with describing, _output_removed_on_error(config.output):
        fs, root = prepare_output(config.output, config.storage_options)
        if finish_swap(fs, root):
            log.warning("finished replacing %s, which an --overwrite run had left half-swapped", config.output)
        run, previous, facts = (None, None, {}) if config.overwrite else _earlier_output(fs, root)
        committed = frozenset(facts)
        todo = [s for s in shards if f"{output_stem(s.key)}.parquet" not in committed]
        if facts and not config.overwrite:  # a resume with other settings is refused before a cluster starts
            info, _, _ = describing.result()
            check_resume(config, info, run_identity(config, info, planned_dtype(config, None)), run, previous, facts)
        with ray_session_for(config.ray_address, config.quiet) if todo else contextlib.nullcontext():
            info, vectors, tokenizer_spec = describing.result()
            plan = _plan_from_cluster(config) if todo else None
            identity = run_identity(config, info, planned_dtype(config, plan))
            if config.overwrite:
                target, target_uri = clear_staging(fs, root), staging_uri(config.output)
            else:
                check_resume(config, info, identity, run, previous, facts)
                clear_staging(fs, root)
                target, target_uri = root, config.output
            clear_leftovers(fs, target)
            if todo and (run is None or not facts):  # before the first commit; a resume keeps its own
                write_run(fs, target, identity)
            sink = SinkSpec(target_uri, config.text_field, config.keep_columns, config.output_dtype,
                            config.storage_options, file_metadata(identity))
            written: dict[str, dict] = {}
            stage_times: dict[str, dict] = {}
            replicas: list[dict] = []
            if todo:
                graph = _onnx_graph(config, plan, info)
                chain_started = time.time()
                written, stage_times, replicas = _execute(config, plan, todo, committed, sink, graph, tokenizer_spec)
                stage_times = {"chain_started_s": round(chain_started - started, 3), **stage_times}
    if todo:
        clear_leftovers(fs, target)  # every chunk has been joined; only empty folders remain

    stats = dict(written)
    if not config.overwrite:
        shard_keys = {s.key for s in shards}
        for name, path in committed_files(fs, root).items():
            file_stats = None if name in stats else (facts[name].stats if name in facts else read_file_stats(fs, path))
            if file_stats is not None and file_stats.get("shard") in shard_keys:
                stats[name] = file_stats
    finished = time.time()
    manifest = _manifest(
        config, info, plan, shards, stats, started, finished, fs, target, stage_times, replicas, vectors, identity
    )
    if config.overwrite:
        swap_in(fs, root, manifest, committed_files(fs, root), run_document(identity))
    else:
        write_manifest(fs, root, manifest)
    totals = manifest["rows"]
    return RunResult(
        output=config.output,
        documents=totals["documents"],
        embedded=sum(s["embedded"] for s in written.values()),
        invalid=totals["invalid"],
        truncated=totals["truncated"],
        tokens=sum(s["tokens"] for s in written.values()),
        seconds=finished - started,
        files_written=len(written),
        files_skipped=len(stats) - len(written),
        manifest=manifest,
    )


def cpu_encoder_path(config: EmbedConfig, kind: str = "dense") -> str:
    """What a CPU encoder runs for this config and kind of model: "onnx" (the float32 graph),
    "int8" (the quantised graph) or "torch". Under --backend auto a graph that fails its check
    still falls back to torch when it is built (_onnx_graph)."""
    if config.backend == "torch" or kind != "dense":
        return "torch"
    if config.dtype == "int8":
        return "int8"
    if config.dtype not in ("auto", "float32"):
        return "torch"  # bfloat16 on CPU
    if config.trust_remote_code and config.backend == "auto":
        # A model's own code may branch in Python on its inputs (or do more than compute), which a
        # trace freezes and probe texts cannot all reach: auto leaves it on PyTorch.
        return "torch"
    return "onnx"


def _onnx_graph(config: EmbedConfig, plan: Plan, info):
    """The model's checked ONNX graph in the object store, for CPU encoders (every node gets the
    same graph without a shared disk); None where PyTorch runs the model."""
    if config.backend == "onnx" and info.kind != "dense":
        raise UsageError(f"--backend onnx: model {config.model} is a {info.kind} model; onnx is for dense models")
    path = cpu_encoder_path(config, info.kind)
    if plan.device != "cpu" or path == "torch":
        return None
    from pipeline.onnx_export import graph_for

    graph = graph_for(config, info.fingerprint, required=config.backend == "onnx" or path == "int8")
    if graph is None:
        return None
    import ray

    return ray.put(graph)


def _encoder_pool(plan: Plan):
    """A fixed pool of encoders. On GPUs each takes two calls at once, so that writing one
    block's Parquet overlaps encoding the next (EncodeStage holds a lock around encoding);
    on CPUs the cores are already busy encoding."""
    from ray.data import ActorPoolStrategy

    if plan.device != "cuda":
        return ActorPoolStrategy(size=plan.num_encoders, max_tasks_in_flight_per_actor=CPU_ENCODER_TASKS_IN_FLIGHT)
    return ActorPoolStrategy(
        size=plan.num_encoders, max_tasks_in_flight_per_actor=ENCODER_CALLS_ON_GPU + 1,
        max_concurrent_calls_per_actor=ENCODER_CALLS_ON_GPU, enable_true_multi_threading=True,
    )


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


def _plan_from_cluster(config: EmbedConfig) -> Plan:
    import ray

    return plan_resources(config, ray.cluster_resources(), _alive_nodes())


def _alive_nodes() -> int:
    """Nodes of the cluster in use that have CPUs (the nodes a CPU plan spreads over)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)


def _execute(
    config: EmbedConfig, plan: Plan, shards: list[Shard], committed: frozenset, sink: SinkSpec, graph=None,
    tokenizer_spec=None,
) -> tuple[dict[str, dict], dict[str, dict], list[dict]]:
    """Run the chain; returns the files written, where the time went stage by stage, and where each actor ran."""
    from ray.data import DataContext

    multi_node = _alive_nodes() > 1
    # Small blocks, of about plan.block_rows short documents: one large shard is spread over
    # every encoder instead of going to one, tokenising the next block overlaps encoding this
    # one, and a file commits as soon as its last block is encoded. The encoder gathers blocks
    # into calls of plan.block_rows rows (its batch size), whatever their size in bytes.
    default_block = DataContext.get_current().target_max_block_size or DataContext().target_max_block_size
    settings = ray_data_settings(
        config.quiet,
        target_max_block_size=min(default_block, max(MIN_BLOCK_BYTES, min(config.rows_per_file, plan.block_rows) * TEXT_ROW_BYTES)),
        # Blocks are small, so a small object-store budget keeps every stage fed; Ray Data's default
        # lets buffered blocks grow with the run, and the touched shared memory with them.
        object_store_memory=OBJECT_STORE_BUDGET,
        # On a multi-node cluster every replica is up before data flows, so that no node sits idle and
        # the manifest's placement lists the whole pool (a small run could end before a slow one starts).
        wait_for_min_actors_s=(int(config.stall_timeout) or -1) if multi_node else None,
    )
    with settings:
        return _run_chain(config, plan, shards, committed, sink, graph, tokenizer_spec, multi_node)


def _run_chain(config, plan, shards, committed, sink, graph, tokenizer_spec, multi_node):
    """read -> TokenizeStage -> EncodeStage (which commits the files), consumed by the driver."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from pipeline.encode import EncodeStage
    from pipeline.tokenize import TokenizeStage

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    spec = ReadSpec(
        config.text_field, config.id_field, config.keep_columns, config.encoding_errors, config.storage_options,
        config.on_invalid,
    )
    ds = ray.data.read_datasource(
        ShardDatasource(shards, spec, config.rows_per_file, committed),
        num_cpus=READ_CPUS,
        override_num_blocks=len(shards),  # one read task per shard; no splitting of its chunks
        # One shard read in flight per tokenizer keeps each fed; more only adds worker processes
        # (~95 MiB each) that outlive their reads: the peak memory of a long run (BENCHMARKS.md).
        compute=TaskPoolStrategy(size=plan.num_tokenizers),
    )
    ds = ds.map_batches(
        TokenizeStage,
        fn_constructor_args=(config, board, tokenizer_spec),
        batch_size=plan.block_rows,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=plan.num_tokenizers, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR),
        num_cpus=plan.tokenizer_cpus,
    )
    ds = ds.map_batches(
        EncodeStage,
        fn_constructor_args=(config, plan.device, plan.encoder_threads, board, graph, sink),
        batch_size=plan.block_rows,
        batch_format="pyarrow",
        compute=_encoder_pool(plan),
        num_cpus=plan.encoder_cpus,
        num_gpus=plan.encoder_gpus,
    )

    files = _FileTracker(sink, spread=multi_node)
    try:
        for batch in _watched(ds.iter_batches(batch_size=None, batch_format="pyarrow"), board, config.stall_timeout):
            for row in batch.to_pylist():
                files.add(row)
        written = files.finish()
        return written, ray.get(board.timings.remote()), ray.get(board.placements.remote())
    except Exception as exc:  # noqa: BLE001 - turned into one clear message below
        raise _explain(exc) from None
    finally:
        files.close()
        ray.kill(board)


@contextlib.contextmanager
def ray_data_settings(quiet: bool, object_store_memory: int | None = None, **settings: Any) -> Iterator[None]:
    """Ray Data's settings for one run of a chain, and the console kept free of its tracebacks
    (`_keep_tracebacks_off_the_console`, unless EMBEDPIPE_DEBUG=1); all restored afterwards, so that a
    second run in the same process, or the caller's own Ray Data work, starts from the caller's.
    `settings` are DataContext attributes (None: leave as is)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    wanted = {"max_errored_blocks": 0, "enable_progress_bars": not quiet, "print_on_execution_start": not quiet,
              **{k: v for k, v in settings.items() if v is not None}}
    saved = {name: getattr(ctx, name) for name in wanted}
    saved_limits = ctx.execution_options.resource_limits
    data_logger = logging.getLogger("ray.data")
    saved_level, saved_factory = data_logger.level, logging.getLogRecordFactory()
    try:
        for name, value in wanted.items():
            setattr(ctx, name, value)
        if object_store_memory is not None:
            ctx.execution_options.resource_limits = saved_limits.copy(object_store_memory=object_store_memory)
        if quiet:
            data_logger.setLevel(logging.WARNING)
        if os.environ.get("EMBEDPIPE_DEBUG") != "1":
            _keep_tracebacks_off_the_console()
        yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)
        ctx.execution_options.resource_limits = saved_limits
        data_logger.setLevel(saved_level)
        logging.setLogRecordFactory(saved_factory)


class _FileTracker:
    """The driver's view of the sink: files committed, and chunks whose pieces are being joined.

    Pieces are counted by their first row, so a block written twice (redone
    after a worker died) is counted once. A chunk is joined as soon as all
    its rows have arrived, and any chunk still in pieces when the stream
    ends is joined then (the join itself checks that no row is missing).
    """

    def __init__(self, sink: SinkSpec, spread: bool):
        self.sink = sink
        self._threads = None
        if spread:  # joins are spread over the cluster's nodes, as Ray tasks
            import ray

            self._join = ray.remote(num_cpus=COMMIT_CPUS)(merge_pieces).remote
            self._result = ray.get
        else:  # one node: a thread of the driver, with no worker process to start (seconds on a small machine)
            self._threads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedpipe-join")
            self._join = functools.partial(self._threads.submit, merge_pieces)
            self._result = concurrent.futures.Future.result
        self.written: dict[str, dict] = {}
        self.pieces: dict[str, dict[int, int]] = {}
        self.chunk_rows: dict[str, int] = {}
        self.merges: dict[str, Any] = {}

    def add(self, row: dict) -> None:
        name = row["file"]
        if row["kind"] == "file":
            self.written[name] = _stats(row)
            return
        self.chunk_rows[name] = row["chunk_rows"]
        self.pieces.setdefault(name, {})[row["first_row"]] = row["rows"]
        if name not in self.merges and sum(self.pieces[name].values()) == row["chunk_rows"]:
            self.merges[name] = self._join(self.sink, name, row["chunk_rows"])

    def finish(self) -> dict[str, dict]:
        for name in self.pieces:
            if name not in self.merges and name not in self.written:
                self.merges[name] = self._join(self.sink, name, self.chunk_rows[name])
        for name, pending in self.merges.items():
            self.written[name] = self._result(pending)
        return self.written

    def close(self) -> None:
        """After a failure, joins not yet started are dropped: those files are not committed, and a rerun redoes them."""
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)


def _watched(batches: Iterator, board, stall_timeout: float) -> Iterator:
    """Yield from `batches` (consumed on a helper thread), ending the run if no stage progresses.

    Past `stall_timeout` seconds without any report on the board, the stage
    actors are killed (so the streaming executor stops) and a PipelineError
    names the stage that stalled. 0 disables the watchdog.
    """
    import queue
    import threading

    import ray

    from pipeline.watchdog import stall_message

    items: queue.Queue = queue.Queue()
    done = object()

    def pump() -> None:
        try:
            for item in batches:
                items.put((item, None))
            items.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread
            items.put((None, exc))

    # The consumer thread must be gone before Ray shuts down, or Ray Data's executor,
    # still winding down, logs tracebacks and may even start a new local Ray.
    pumping = threading.Thread(target=pump, name="embedpipe-results", daemon=True)
    pumping.start()
    poll = min(5.0, stall_timeout / 4) if stall_timeout else 5.0
    while True:
        try:
            item, error = items.get(timeout=poll)
        except queue.Empty:
            if not stall_timeout:
                continue
            status = ray.get(board.status.remote())
            if status.idle < stall_timeout:
                continue
            for actor in ray.get(board.registered_actors.remote()):
                ray.kill(actor, no_restart=True)
            pumping.join(STOP_WAIT_S)  # the executor fails on the dead actors and stops
            raise PipelineError(stall_message(status, stall_timeout)) from None
        if error is not None:
            pumping.join(STOP_WAIT_S)
            raise error
        if item is done:
            pumping.join(STOP_WAIT_S)
            return
        yield item


def _keep_tracebacks_off_the_console() -> None:
    """Ray Data logs a failing task's traceback to stderr; we report the cause in one line instead.

    Ray Data rebuilds its handlers whenever a dataset starts (on its own
    thread), so a filter on them can come too late. Instead, every ERROR
    record of a `ray.data` logger is made at birth with `hide = True`, which
    Ray Data's console filter honours; its session log file still gets the
    full record. `--debug` leaves the console as it is.
    """
    base = logging.getLogRecordFactory()
    if getattr(base, "_embedpipe", False):
        return

    def factory(name, level, *args, **kwargs):
        record = base(name, level, *args, **kwargs)
        if level >= logging.ERROR and name.startswith("ray.data"):
            record.__class__ = _hidden(type(record))
        return record

    factory._embedpipe = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


@functools.lru_cache(maxsize=None)
def _hidden(record_class: type) -> type:
    # A class attribute, not an instance one: Ray Data may still pass extra={"hide": ...} itself.
    return type("HiddenRecord", (record_class,), {"hide": True})


def _stats(row: dict) -> dict:
    return {k: row[k] for k in ("file", "shard", "rows", "embedded", "invalid", "truncated", "tokens")}


def _explain(exc: BaseException) -> EmbedpipeError:
    """The EmbedpipeError behind a Ray failure, or a PipelineError naming the cause."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, EmbedpipeError) and type(e).__module__ == "pipeline.errors":
            return e  # not Ray's dynamic RayTaskError(InputError) wrapper, whose text is a traceback
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    text = str(exc).strip().splitlines()
    for line in reversed(text):  # an actor that failed to start carries its cause as text only
        found = _OUR_ERROR_LINE.search(line)
        if found:
            return _ERROR_CLASSES[found.group(1)](found.group(2).strip())
    for line in reversed(text):  # Ray puts the user's exception last
        if line.strip() and not line.startswith(" "):
            return PipelineError(f"the run failed: {line.strip()[:500]}")
    return PipelineError(f"the run failed: {exc.__class__.__name__}")


_ERROR_CLASSES = {"UsageError": UsageError, "InputError": InputError, "PipelineError": PipelineError}
_OUR_ERROR_LINE = re.compile(r"pipeline\.errors\.(UsageError|InputError|PipelineError): (.+)$")


def _manifest(
    config, info, plan, shards, stats, started, finished, fs, root, stage_times=None, replicas=(), vectors=None,
    identity=None,
) -> dict[str, Any]:
    """The output's `_manifest.json` (pipeline.manifest). `vectors`: kind ('dense' or 'sparse'), and for
    sparse outputs the vocabulary size (their dimension) and the terms kept per document."""
    from pipeline import manifest

    files = sorted(stats.values(), key=lambda s: s["file"])
    per_shard: dict[str, dict] = {s.key: {"shard": s.key, "files": [], "rows": 0, "embedded": 0} for s in shards}
    for s in files:
        entry = per_shard.get(s["shard"])
        if entry is not None:
            entry["files"].append(s["file"])
            entry["rows"] += s["rows"]
            entry["embedded"] += s["embedded"]
    totals = {k: sum(s[k] for s in files) for k in ("embedded", "invalid", "truncated", "tokens")}
    totals["documents"] = sum(s["rows"] for s in files)
    vectors = dict(vectors or {"kind": "dense"})
    kind = vectors.pop("kind")
    return manifest.build(
        kind, rows=totals, files=files, config=config, started=started, finished=finished, model=info.as_dict(),
        # per stage and step kind: count, busy seconds, first start and last end (seconds after
        # the Ray chain started, itself chain_started_s after the run started)
        timings={"stages": stage_times or {}},
        identity={"hash": identity["hash"], "settings": identity["settings"]} if identity else None,
        dim=vectors["vocab_size"] if kind == "sparse" else _dimension(fs, root, files),
        **vectors,
        pooling=info.pooling,
        normalize=info.normalize,
        max_seq_length=info.max_seq_length,
        dtype=_compute_dtype(config, plan, replicas),
        backend=_backend(replicas),
        output_dtype=config.output_dtype,
        shards=list(per_shard.values()),
        resources=plan.as_dict() if plan else None,
        replicas=_replicas(replicas),
    )


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


def _dimension(fs, root: str, files: list[dict]) -> int | None:
    import pyarrow.parquet as pq

    for s in files:
        with fs.open(posixpath.join(root, s["file"]), "rb") as f:
            return pq.read_schema(f).field("embedding").type.list_size
    return None
