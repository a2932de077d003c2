"""The embed chain on Ray Data, run and consumed by the driver:

    read groups of shards (tasks) -> TokenizeStage (CPU actors) -> EncodeStage (GPU/CPU actors, which also write pieces,
    or on CPU whole Parquet files) -> joins of pieces (driver threads, or tasks on a cluster)

The driver only sees one small summary row per file written (FileTracker); it joins the pieces of
files that Ray split across blocks. Resources come from the plan (pipeline.engine.plan).
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Any

from pipeline.config import EmbedConfig
from pipeline.engine.execution import explain, ray_data_settings, watched
from pipeline.engine.plan import COMMIT_CPUS, READ_CPUS, Plan, alive_nodes
from pipeline.engine.watchdog import ProgressBoard
from pipeline.storage.lance_sink import committer_for
from pipeline.storage.sink import SinkSpec, merge_pieces
from pipeline.storage.sources import Group, ReadSpec, ShardDatasource

OBJECT_STORE_BUDGET = 256 << 20  # bytes of blocks Ray Data may hold in the object store at once
ENCODER_CALLS_ON_GPU = 2  # one block encoding, one writing its pieces (see _encoder_pool)
TASKS_IN_FLIGHT_PER_ACTOR = 2  # one running, one queued: no gap between blocks, little imbalance at the end
# A CPU encoder takes its next block only when it is free: a block queued behind a long one would
# wait there while the other encoders run dry (the gap between two calls is about 0.1 s).
CPU_ENCODER_TASKS_IN_FLIGHT = 1
TEXT_ROW_BYTES = 256  # a short document with its id and bookkeeping columns, for sizing blocks
MIN_BLOCK_BYTES = 64 << 10
JOIN_THREADS = 4  # --writer separate on one node: the driver's threads that build the files (Arrow and zstd release the GIL)


def run_chain(
    config: EmbedConfig, plan: Plan, groups: list[Group], committed: frozenset, sink: SinkSpec, graph=None,
    tokenizer_spec=None,
) -> tuple[dict[str, dict], dict[str, dict], list[dict]]:
    """Run the chain; returns the files written, where the time went stage by stage, and where each actor ran."""
    from ray.data import DataContext

    multi_node = alive_nodes() > 1
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
        return _stream(config, plan, groups, committed, sink, graph, tokenizer_spec, multi_node)


def _stream(config, plan, groups, committed, sink, graph, tokenizer_spec, multi_node):
    """read -> TokenizeStage -> EncodeStage (which commits the files), consumed by the driver."""
    import ray
    from ray.data import TaskPoolStrategy

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    spec = ReadSpec(
        config.text_field, config.id_field, config.keep_columns, config.encoding_errors, config.storage_options,
        config.on_invalid,
    )
    ds = ray.data.read_datasource(
        ShardDatasource(groups, spec, config.rows_per_file, committed, board),
        num_cpus=READ_CPUS,
        override_num_blocks=len(groups),  # one read task per group of shards; no splitting of its chunks
        # One shard read in flight per tokenizer keeps each fed; more only adds worker processes
        # (~95 MiB each) that outlive their reads: the peak memory of a long run (BENCHMARKS.md).
        compute=TaskPoolStrategy(size=max(1, min(plan.num_tokenizers, len(groups)))),
    )
    ds = embed_stages(ds, config, plan, board, tokenizer_spec, graph, sink)

    files = FileTracker(sink, spread=multi_node, board=board)
    try:
        for batch in watched(ds.iter_batches(batch_size=None, batch_format="pyarrow"), board, config.stall_timeout):
            for row in batch.to_pylist():
                files.add(row)
        written = files.finish()
        return written, ray.get(board.timings.remote()), ray.get(board.placements.remote())
    except Exception as exc:  # noqa: BLE001 - turned into one clear message below
        raise explain(exc) from None
    finally:
        files.close()
        ray.kill(board)


def embed_stages(ds, config: EmbedConfig, plan: Plan, board, tokenizer_spec, graph=None, sink: SinkSpec | None = None):
    """`ds` (rows with the read tasks' columns: id, text, _valid, _row) through TokenizeStage and
    EncodeStage, as the plan places them; with a sink the encoders commit files and return their
    summary rows, without one they return the rows with an `embedding` column (embed_dataset)."""
    from ray.data import ActorPoolStrategy

    from pipeline.stages.encode import EncodeStage
    from pipeline.stages.tokenize import TokenizeStage

    ds = ds.map_batches(
        TokenizeStage,
        fn_constructor_args=(config, board, tokenizer_spec, plan.batch_tokens, plan.block_rows, plan.call_tokens),
        batch_size=plan.block_rows,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=plan.num_tokenizers, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR),
        num_cpus=plan.tokenizer_cpus,
    )
    return ds.map_batches(
        EncodeStage,
        fn_constructor_args=(config, plan.device, plan.encoder_threads, board, graph, sink),
        batch_size=plan.block_rows,
        batch_format="pyarrow",
        compute=_encoder_pool(plan),
        num_cpus=plan.encoder_cpus,
        num_gpus=plan.encoder_gpus,
    )


def _encoder_pool(plan: Plan):
    """A fixed pool of encoders. On GPUs each takes two calls at once, so that writing one
    block's pieces overlaps encoding the next (EncodeStage holds a lock around encoding);
    on CPUs the cores are already busy encoding."""
    from ray.data import ActorPoolStrategy

    if plan.device != "cuda":
        return ActorPoolStrategy(size=plan.num_encoders, max_tasks_in_flight_per_actor=CPU_ENCODER_TASKS_IN_FLIGHT)
    return ActorPoolStrategy(
        size=plan.num_encoders, max_tasks_in_flight_per_actor=ENCODER_CALLS_ON_GPU + 1,
        max_concurrent_calls_per_actor=ENCODER_CALLS_ON_GPU, enable_true_multi_threading=True,
    )


class FileTracker:
    """The driver's view of the sink: files committed, and chunks whose pieces are being joined.

    Pieces are counted by their first row, so a block written twice (redone
    after a worker died) is counted once. A chunk is joined as soon as all
    its rows have arrived, and any chunk still in pieces when the stream
    ends is joined then (the join itself checks that no row is missing).
    A join's result is collected as soon as it has ended (a Lance unit is
    committed then), always from the driver's own thread.
    """

    def __init__(self, sink: SinkSpec, spread: bool, board=None):
        self.sink = sink
        self.board = board
        self._threads = None
        if spread:  # joins are spread over the cluster's nodes, as Ray tasks
            import ray

            self._join = ray.remote(num_cpus=COMMIT_CPUS)(merge_pieces).remote
            self._result = ray.get
            self._done = lambda ref: bool(ray.wait([ref], timeout=0, fetch_local=False)[0])
        else:  # one node: a thread of the driver, with no worker process to start (seconds on a small machine)
            threads = JOIN_THREADS if sink is not None and sink.separate else 1  # separate: every file is built here
            self._threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="embedpipe-join")
            self._join = functools.partial(self._threads.submit, merge_pieces)
            self._result = concurrent.futures.Future.result
            self._done = concurrent.futures.Future.done
        self.written: dict[str, dict] = {}
        self.pieces: dict[str, dict[int, int]] = {}
        self.chunk_rows: dict[str, int] = {}
        self.merges: dict[str, Any] = {}
        self._open: set[str] = set()  # joins started whose result is not collected yet
        self._commit = committer_for(sink)  # --format lance: the driver commits each unit written (else None)

    def add(self, row: dict) -> None:
        name = row["file"]
        if row["kind"] == "file":
            self.written[name] = _stats(row)
            self._committed(name)
            return
        self.chunk_rows[name] = row["chunk_rows"]
        self.pieces.setdefault(name, {})[row["first_row"]] = (row["rows"], row["docs"], row["doc_chunks"])
        rows, docs, doc_chunks = (sum(counts) for counts in zip(*self.pieces[name].values()))
        if name not in self.merges and docs == row["chunk_rows"] and rows == doc_chunks:  # every document, whole
            self.merges[name] = self._join(self.sink, name, row["chunk_rows"], self.board)
            self._open.add(name)
        self._collect()

    def _collect(self, wait: bool = False) -> None:
        """Joins that have ended: their files count as written (a Lance unit is committed now, not at
        the end of the run) and a join that failed ends the run at once. `wait`: every join."""
        for name in [n for n in self._open if wait or self._done(self.merges[n])]:
            self._open.discard(name)
            self.written[name] = self._result(self.merges[name])
            self._committed(name)

    def finish(self) -> dict[str, dict]:
        for name in self.pieces:
            if name not in self.merges and name not in self.written:
                self.merges[name] = self._join(self.sink, name, self.chunk_rows[name], self.board)
                self._open.add(name)
        self._collect(wait=True)
        return self.written

    def _committed(self, name: str) -> None:
        if self._commit is not None:
            self._commit(name)

    def close(self) -> None:
        """After a failure, joins not yet started are dropped: those files are not committed, and a rerun redoes them."""
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)


def _stats(row: dict) -> dict:
    return {k: row[k] for k in ("file", "shard", "last_shard", "shards", "last", "rows", "embedded", "invalid", "truncated",
                                "tokens", "chunks", "max_chunks")}
