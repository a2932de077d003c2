"""`embedpipe mine`: paraphrase mining of an embeddings directory, spread over Ray tasks.

    load_block (one task per row block: reads its rows from the Parquet files, normalises)
      -> diagonal_block (one task per block I: each row's top-k within I)
      -> driver: the score floor every answer pair reaches (see `pipeline.mining.score_floor`)
      -> off_diagonal_block (one task per block pair I < J: the scores >= floor)
      -> reduce_rows (one task per row block: each row's top-k of its candidates, the block's best 2 * max_pairs)
      -> driver: keeps the best 2 * max_pairs entries as the reduces finish, deduplicates, keeps
         the global best max_pairs, writes pairs.parquet + manifest

No task holds more than two blocks of vectors and one block x block score
matrix; the driver holds at most 2 * max_pairs scores for the floor, then
2 * max_pairs candidate entries and one reduce task's output.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import MineConfig
from pipeline.errors import InputError, PipelineError, UsageError
from pipeline.identity import check_consistent, names_to_paths
from pipeline.manifest import build as build_manifest, write as write_manifest
from pipeline.stages.columns import DOC_ID
from pipeline.quantization import NEEDS_RANGES, QUANTIZED, VectorFormat, from_column
from pipeline.storage.readers import NotParquet, embedding_files, file_format
from pipeline.storage.sink import parquet_bytes
from pipeline.storage.filesystems import get_fs, write_bytes_atomic

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.parquet"
PAIRS_SCHEMA = pa.schema([("id_a", pa.string()), ("id_b", pa.string()), ("score", pa.float32())])


@dataclass(frozen=True)
class FileSpan:
    path: str
    start: int  # global index of the file's first row
    rows: int
    vectors: VectorFormat = VectorFormat()  # what the file stores: read back as float32 (pipeline.quantization)
    chunks: bool = False  # rows are chunks of documents (a doc_id column: embed --chunk-tokens)


def plan_files(config: MineConfig) -> list[FileSpan]:
    """Where each file's rows fall in the global row order; refuses anything that is not embeddings."""
    try:
        files = embedding_files(config.embeddings, config.storage_options)
    except NotParquet as exc:
        raise InputError(f"--embeddings {exc}") from None
    except InputError:
        raise InputError(f"--embeddings {config.embeddings}: no such directory") from None
    if not files:
        raise InputError(f"--embeddings {config.embeddings}: holds no embeddings (no *.parquet files)")
    fs, root = get_fs(config.embeddings, config.storage_options)
    if len(files) > 1:  # pairs across two models' vectors mean nothing (pipeline.identity)
        check_consistent(fs, root.rstrip("/"), names_to_paths(files), f"--embeddings {config.embeddings}")
    spans, start, dims = [], 0, {}
    for path in files:
        rows, fmt, chunks = _embedding_file_shape(fs, path, config)
        dims[path] = (fmt.dim, fmt.precision)
        spans.append(FileSpan(path, start, rows, fmt, chunks))
        start += rows
    odd = next((p for p in files if dims[p] != dims[files[0]]), None)
    if odd is not None:
        raise InputError(
            f"--embeddings {config.embeddings}: {posixpath.basename(odd)} has {dims[odd][0]}-dimensional "
            f"{dims[odd][1]} vectors, {posixpath.basename(files[0])} has {dims[files[0]][0]}-dimensional {dims[files[0]][1]}"
        )
    if start == 0:
        raise InputError(f"--embeddings {config.embeddings}: its Parquet files hold no rows")
    return spans


def _embedding_file_shape(fs, path: str, config: MineConfig) -> tuple[int, VectorFormat, bool]:
    """(rows, what its vectors are, whether its rows are chunks) of one embeddings file, read from its footer; InputError naming
    what is wrong."""
    where = f"--embeddings {config.embeddings}: {posixpath.basename(path)}"
    try:
        with fs.open(path, "rb") as f:
            meta = pq.read_metadata(f)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise InputError(f"{where} is not a readable Parquet file ({first})") from None
    if "embedding" not in schema.names and {"indices", "values"} <= set(schema.names):
        raise InputError(f"{where} holds sparse (SPLADE) vectors; mining works on dense embeddings")
    for column in ("embedding", "id"):
        if column not in schema.names:
            raise InputError(f"{where} has no {column!r} column (columns are {schema.names[:12]})")
    kind = schema.field("embedding").type
    fmt = file_format(fs, path, schema)
    stored = pa.types.is_fixed_size_list(kind) and (
        pa.types.is_floating(kind.value_type) or (fmt.precision in QUANTIZED and pa.types.is_integer(kind.value_type)))
    if not stored:
        raise InputError(f"{where}: column 'embedding' has type {kind}, expected fixed_size_list<float>[dim] "
                         "(or embedpipe's int8/uint8/binary/ubinary vectors)")
    if fmt.precision in NEEDS_RANGES and fmt.ranges is None:
        raise InputError(f"{where}: {fmt.precision} vectors without the ranges they were quantised with")
    return meta.num_rows, fmt, DOC_ID in schema.names


def load_block(spans: list[FileSpan], start: int, end: int, embeddings: str, storage_options,
               groups: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows [start, end) as unit-length float32 vectors, read from the files that hold them, and with
    `groups` each row's document (`document_groups`), else None."""
    from pipeline.mining import normalize

    fs, _ = get_fs(embeddings, storage_options)
    parts, labels = [], []
    for span in spans:
        lo, hi = max(start, span.start), min(end, span.start + span.rows)
        if lo >= hi:
            continue
        with fs.open(span.path, "rb") as f:
            table = pq.read_table(f, columns=["embedding", DOC_ID] if groups else ["embedding"])
        column = table["embedding"].combine_chunks().slice(lo - span.start, hi - lo)
        parts.append(span.vectors.decode(from_column(column)))  # int8/uint8 dequantised, binary as +1/-1
        if groups:
            labels.append(document_groups(table[DOC_ID], span.start)[lo - span.start : hi - span.start])
    return normalize(np.concatenate(parts)), (np.concatenate(labels) if groups else None)


def document_groups(doc_ids: pa.ChunkedArray, start: int) -> np.ndarray:
    """One integer per row of a file whose first row is global row `start`: the global row of the
    first chunk of the row's document in that file (a document's chunks are all in one file)."""
    import pyarrow.compute as pc

    codes = np.asarray(pc.dictionary_encode(doc_ids.combine_chunks()).indices.to_numpy(zero_copy_only=False), np.int64)
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)  # integers, not id strings
    return first[inverse].astype(np.int64) + start


GPU_DTYPE = "float16"  # the block products' precision on a GPU (candidates are scored again in float32)


def products_on(device: str) -> tuple[str, str]:
    """(device, dtype) a mining task's block products run in: on a GPU that torch sees, GPU_DTYPE
    there (pipeline.mining_device); otherwise numpy float32 on CPU, without importing torch.

    `device` is "cuda" (asked for: a GPU torch cannot see is an error), "auto-cuda" (planned because
    the cluster has GPUs: such a GPU falls back to the CPU product, with a warning) or "cpu"."""
    if device in ("cuda", "auto-cuda"):
        import torch

        if torch.cuda.is_available():
            return "cuda", GPU_DTYPE
        if device == "cuda":
            raise PipelineError("--device cuda: Ray gave a mining task a GPU, but torch on its node sees no CUDA device")
        log.warning("Ray gave a mining task a GPU, but torch sees no CUDA device; using the CPU product (--device auto)")
    return "cpu", "float32"


def task_placement(device: str, dtype: str) -> dict:
    """Where a mining task ran, for the manifest."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": device, "dtype": dtype}


def _block_products(device: str):
    """(diagonal, off-diagonal candidate functions, where they run) for a task planned on `device`."""
    from pipeline.mining import block_products

    where, dtype = products_on(device)
    return (*block_products(where if where == "cuda" else None, dtype), task_placement(where, dtype))


def diagonal_block(block: tuple, start: int, k: int, device: str = "cpu"):
    """Phase 1: the block's candidates, their scores again for the driver's floor, and where it ran."""
    diagonal_candidates, _, placement = _block_products(device)
    found = diagonal_candidates(block[0], start, k, block[1])
    return found, found[2], placement


def off_diagonal_block(a: tuple, b: tuple, a_start: int, b_start: int, k: int, floor: float, device: str = "cpu"):
    """Phase 2: the block pair's candidates, and where it ran (a, b: load_block's (vectors, groups))."""
    _, off_diagonal_candidates, placement = _block_products(device)
    return off_diagonal_candidates(a[0], b[0], a_start, b_start, k, floor, a[1], b[1]), placement


def reduce_rows(start: int, end: int, k: int, max_pairs: int, floor: float, diagonal, *off_diagonal):
    from pipeline.mining import best_entries, row_block_pairs

    return best_entries(*row_block_pairs(start, end, k, floor, diagonal, list(off_diagonal)), 2 * max_pairs)


def mine_pairs(config: MineConfig, spans: list[FileSpan]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(i, j, score) of the best pairs, computed by Ray tasks on the cluster in use, and where the
    block products ran (for the manifest)."""
    import ray

    from pipeline.mining import best_pairs, row_blocks, score_floor

    n = spans[-1].start + spans[-1].rows
    blocks = row_blocks(n, config.block_size)
    device = mining_device(config.device, ray.cluster_resources().get("GPU", 0))
    # One CPU per task, loads and reduces included: each core runs one task at a time, so
    # Ray starts one worker process per core (each worker start costs seconds of imports).
    # On GPUs, each block product takes a whole GPU (not measured on a GPU yet: half a GPU would
    # let copies overlap products).
    gpus = 1 if device == "cuda" else 0
    task_device = "cuda" if config.device == "cuda" else ("auto-cuda" if device == "cuda" else "cpu")
    load = ray.remote(num_cpus=1)(load_block)
    diagonal_task = ray.remote(num_cpus=1, num_gpus=gpus, num_returns=3)(diagonal_block)
    off_diagonal_task = ray.remote(num_cpus=1, num_gpus=gpus, num_returns=2)(off_diagonal_block)
    reduce = ray.remote(num_cpus=1)(reduce_rows)
    groups = leaves_out_same_document(config, spans)
    vectors = [load.remote(spans, a, b, config.embeddings, config.storage_options, groups) for a, b in blocks]
    diagonal, scores, placed = zip(
        *(diagonal_task.remote(vectors[b], a0, config.top_k, task_device) for b, (a0, _) in enumerate(blocks))
    )
    floor = score_floor((ray.get(s) for s in scores), config.max_pairs, config.threshold)
    parts: list[list] = [[] for _ in blocks]
    placed = list(placed)
    for bi, (a0, _) in enumerate(blocks):
        for bj in range(bi + 1, len(blocks)):
            part, where = off_diagonal_task.remote(
                vectors[bi], vectors[bj], a0, blocks[bj][0], config.top_k, floor, task_device,
            )
            parts[bi].append(part)
            parts[bj].append(part)
            placed.append(where)
    reduced = [
        reduce.remote(a0, a1, config.top_k, config.max_pairs, floor, diagonal[b], *parts[b])
        for b, (a0, a1) in enumerate(blocks)
    ]
    i, j, s = best_pairs(*_best_as_they_finish(reduced, 2 * config.max_pairs), config.max_pairs)
    return i, j, s, products_summary(device, ray.get(placed))


def leaves_out_same_document(config: MineConfig, spans: list[FileSpan]) -> bool:
    """Whether two chunks of one document are kept from pairing: by default when the rows are chunks
    (their overlapping neighbours would fill every top-k), unless --same-document-pairs."""
    return any(span.chunks for span in spans) and not config.same_document_pairs


def same_document_pairs(config: MineConfig, spans: list[FileSpan]) -> str | None:
    """The manifest's `same_document_pairs`: "left out" or "kept" for chunks, None for whole documents."""
    if not any(span.chunks for span in spans):
        return None
    return "left out" if leaves_out_same_document(config, spans) else "kept"


def mining_device(asked: str, gpus: float) -> str:
    """Where block products go: GPU workers when asked (cuda) or when the cluster has GPUs (auto)."""
    if asked == "cuda" and gpus < 1:
        raise UsageError("--device cuda: the Ray cluster has no GPUs")
    return "cuda" if asked == "cuda" or (asked == "auto" and gpus >= 1) else "cpu"


def products_summary(device: str, placed: list[dict]) -> dict:
    """The manifest's `products`: the device planned, and what the block-product tasks really ran on."""
    return {
        "device": device,
        "ran_on": sorted({(p["device"], p["dtype"]) for p in placed}),
        "tasks": len(placed),
        "gpu_tasks": sum(1 for p in placed if p["gpu_ids"]),
        "per_node": {node: sum(1 for p in placed if p["node_id"] == node) for node in sorted({p["node_id"] for p in placed})},
    }


def _best_as_they_finish(refs: list, n: int):
    """The best n entries (`best_entries`) of the tasks' outputs, cut again as each task finishes:
    the driver holds at most n entries and one task's output, however many blocks there are."""
    import ray

    from pipeline.mining import best_entries

    kept = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        kept = best_entries(*(np.concatenate(pair) for pair in zip(kept, ray.get(done[0]))), n)
    return kept


def pair_ids(config: MineConfig, spans: list[FileSpan], i: np.ndarray, j: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """The ids of global rows i and j, as strings, reading only the id column of the files that hold them."""
    fs, _ = get_fs(config.embeddings, config.storage_options)
    wanted = np.unique(np.concatenate([i, j]))
    found = []  # the ids of `wanted`, in its order
    for span in spans:
        lo, hi = np.searchsorted(wanted, [span.start, span.start + span.rows])
        if lo == hi:
            continue
        with fs.open(span.path, "rb") as f:
            ids = pq.read_table(f, columns=["id"])["id"]
        found.append(ids.take(pa.array(wanted[lo:hi] - span.start)).combine_chunks().cast(pa.string()))
    ids = pa.concat_arrays(found) if found else pa.array([], pa.string())
    return ids.take(pa.array(np.searchsorted(wanted, i))), ids.take(pa.array(np.searchsorted(wanted, j)))


def _identity_hash(config: MineConfig) -> str | None:
    """The settings hash of the embeddings mined (their `_run.json`), None where they have none."""
    from pipeline.identity import read_run

    fs, root = get_fs(config.embeddings, config.storage_options)
    try:
        run = read_run(fs, root.rstrip("/"))
    except (UsageError, OSError):  # a single file (no folder to hold _run.json), or an unreadable one: nothing to record
        return None
    return run.get("hash") if run else None


@dataclass
class MineResult:
    output: str
    documents: int
    pairs: int
    seconds: float
    reranked: Any = None
    """The RerankResult when the pairs were reranked too (--rerank-model), else None."""

    def summary_line(self) -> str:
        return f"mined {self.pairs:,} pairs among {self.documents:,} documents in {self.seconds:.1f}s -> {self.output}"


def run_mine(config: MineConfig) -> MineResult:
    from pipeline.engine.cluster import prepare_output, ray_session_for

    started = time.time()
    spans = plan_files(config)
    fs, root = prepare_output(config.output, config.storage_options)
    with ray_session_for(config.ray_address, config.quiet):
        i, j, s, products = mine_pairs(config, spans)
    id_a, id_b = pair_ids(config, spans, i, j)
    table = pa.table({"id_a": id_a, "id_b": id_b, "score": pa.array(s, pa.float32())}, schema=PAIRS_SCHEMA)
    write_bytes_atomic(fs, posixpath.join(root, PAIRS_FILE), parquet_bytes(table))
    finished = time.time()
    n = spans[-1].start + spans[-1].rows
    manifest = build_manifest(
        "pairs", rows={"documents": n, "pairs": len(s)}, files=[{"file": PAIRS_FILE, "rows": len(s)}],
        config=config, started=started, finished=finished,
        embeddings=config.embeddings,
        embeddings_identity=_identity_hash(config),
        documents=n,
        pairs=len(s),
        top_k=config.top_k,
        max_pairs=config.max_pairs,
        threshold=config.threshold,
        block_size=config.block_size,
        products=products,
        same_document_pairs=same_document_pairs(config, spans),
        precision=spans[0].vectors.precision,
        score="cosine" if spans[0].vectors.precision not in ("binary", "ubinary") else "cosine of the +1/-1 vectors",
        min_score=float(s.min()) if len(s) else None,
        max_score=float(s.max()) if len(s) else None,
    )
    write_manifest(fs, root, manifest)
    return MineResult(config.output, n, len(s), finished - started)
