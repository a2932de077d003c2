"""`embedpipe rerank`: mined pairs scored by a cross-encoder on the encoder actor pool.

    driver: reads pairs.parquet (the N best by bi-encoder score with --top), the ids they name
      -> pair_texts.join_texts (Ray tasks: per-shard reads, a two-step join by id)
      -> CrossEncodeStage (Ray Data actor pool: one replica per GPU, or per core on CPU)
      -> driver: sorts by rerank_score, writes pairs.parquet + _manifest.json atomically

A cross-encoder reads both texts of a pair in one forward pass: more accurate
than the cosine of two vectors, and one pass per pair, which is why only mined
candidates are reranked. The driver holds the pairs and their scores, never a text.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import RerankConfig
from pipeline.errors import EmbedpipeError, InputError, UsageError
from pipeline.manifest import build as build_manifest, read as read_manifest, write as write_manifest
from pipeline.commands.mine import PAIRS_FILE
from pipeline.storage.sink import MANIFEST, parquet_bytes
from pipeline.storage.filesystems import first_line, get_fs, write_bytes_atomic

log = logging.getLogger(__name__)

RERANKED_SCHEMA = pa.schema(
    [("id_a", pa.string()), ("id_b", pa.string()), ("score", pa.float32()), ("rerank_score", pa.float32())]
)
CPU_BLOCK_PAIRS = 512  # a pair is two texts: half embed's 1,024-row CPU blocks keeps a block near a second per core
GPU_BLOCK_PAIRS = 4096
BLOCKS_PER_REPLICA = 4  # at least, in a small run: the replicas finish together
REPLICAS_START_S = 600  # pairs flow once every replica is up: the first one up would otherwise take them all


def rerank_after_mine(mine) -> RerankConfig:
    """The rerank that `mine --rerank-model` runs on the pairs just written (`MineConfig.rerank_config`).

    The texts default to the input recorded in the embeddings' manifest, and the
    options that decide ids and text (text_field, id_field, encoding_errors) come
    from it, so the ids match the ones embed assigned. (`embed --mine --rerank-model`
    knows them: `EmbedConfig.rerank_config`.)
    """
    embedded = _embed_config(mine.embeddings, mine.storage_options)
    texts = mine.texts or embedded.get("input")
    if not texts:
        raise UsageError(f"--rerank-model needs --texts: {mine.embeddings} has no manifest naming the embedded input")
    read = {k: embedded[k] for k in ("text_field", "id_field", "encoding_errors", "document_per_file") if k in embedded}
    return mine.rerank_config(texts, **read)


def _embed_config(embeddings: str, storage_options) -> dict[str, Any]:
    """The `config` section of an embeddings directory's manifest, or {} without one."""
    try:
        fs, root = get_fs(embeddings, storage_options)
        data = read_manifest(fs, root.rstrip("/"))
    except OSError:
        return {}
    return dict((data or {}).get("config") or {})


# --------------------------------------------------------------------------- pairs in


def read_pairs(config: RerankConfig) -> tuple[pa.Table, int]:
    """(pair, id_a, id_b, score) of the pairs to rerank, best score first (in the input's order where it
    has no `score`: then `score` is null), and how many the input held. --pairs is `mine`'s output, or
    any Parquet file or directory of Parquet files with id_a and id_b."""
    where = f"--pairs {config.pairs}"
    table, name = _pairs_table(config, where)
    for column in ("id_a", "id_b"):
        if column not in table.column_names:
            raise InputError(f"{where}: {name} has no {column!r} column (columns are {table.column_names[:12]})")
    scored = "score" in table.column_names
    if scored:
        kind = table["score"].type
        if table["score"].null_count or not (pa.types.is_floating(kind) or pa.types.is_integer(kind)):
            raise InputError(f"{where}: column 'score' must hold numbers, without nulls")
    elif config.top:
        raise UsageError(f"--top {config.top}: {where} has no 'score' column to choose the best pairs by")
    for column in ("id_a", "id_b"):
        if table[column].null_count:
            raise InputError(f"{where}: column {column!r} has {table[column].null_count} null ids")
    total = table.num_rows
    table = pa.table({
        "id_a": table["id_a"].cast(pa.string()),
        "id_b": table["id_b"].cast(pa.string()),
        "score": table["score"].cast(pa.float32()) if scored else pa.nulls(total, pa.float32()),
    })
    if scored:
        order = np.argsort(-table["score"].to_numpy(), kind="stable")  # mine writes them sorted; others may not
        table = table.take(pa.array(order[: config.top] if config.top else order))
    return table.append_column("pair", pa.array(np.arange(table.num_rows), pa.int64())), total


def _pairs_table(config: RerankConfig, where: str) -> tuple[pa.Table, str]:
    """The pairs as one table, and what it was read from: a .parquet file, a directory's pairs.parquet
    (mine's), else every Parquet file of the directory (names starting with _ or . left out)."""
    try:
        fs, root = get_fs(config.pairs, config.storage_options)
        root = root.rstrip("/") or root
        if root.endswith(".parquet"):
            paths = [root] if fs.exists(root) else []
        elif fs.exists(posixpath.join(root, PAIRS_FILE)):
            paths = [posixpath.join(root, PAIRS_FILE)]
        else:
            paths = sorted(p for p in fs.glob(posixpath.join(root, "*.parquet"))
                           if not posixpath.basename(p).startswith(("_", ".")))
        if not paths:
            if not fs.exists(root):
                raise InputError(f"{where}: no such file or directory")
            raise InputError(f"{where}: holds no Parquet file of pairs ({PAIRS_FILE} from `embedpipe mine`, or any "
                             "with id_a and id_b columns)")
        tables = []
        for path in paths:
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f))
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except InputError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"{where}: not a readable pairs file ({first_line(exc)})") from None
    return table, posixpath.basename(paths[0]) if len(paths) == 1 else f"{len(paths)} Parquet files"


def chunk_cuts(config: RerankConfig, wanted: pa.Array) -> tuple[pa.Table | None, str | None]:
    """For pairs of chunks (embed --chunk-tokens, then mine): doc_id, start, end of each wanted id, in
    wanted's order, read from the embeddings output (--embeddings, else the one the pairs' manifest
    names), and that output; (None, None) for pairs of whole documents."""
    mined = _pairs_manifest(config)
    embeddings = config.embeddings
    if embeddings is None and mined.get("same_document_pairs") is None:
        return None, None  # pairs of whole documents, or pairs without a manifest: ids are documents'
    embeddings = embeddings or mined.get("embeddings")
    where = f"--embeddings {embeddings}" if config.embeddings else f"--pairs {config.pairs}"
    if not embeddings:
        raise UsageError(f"{where}: pairs of chunks need the embeddings output they were mined from (its offsets); give --embeddings")
    from pipeline.storage.pair_texts import chunk_offsets

    return chunk_offsets(embeddings, config.storage_options, wanted, where), embeddings


def _documents(config: RerankConfig) -> bool:
    """Whether --texts holds a document per file: --document-per-file, or the embeddings were made so."""
    if config.document_per_file:
        return True
    embeddings = config.embeddings or _pairs_manifest(config).get("embeddings")
    return bool(embeddings and _embed_config(embeddings, config.storage_options).get("document_per_file"))


def _pairs_manifest(config: RerankConfig) -> dict[str, Any]:
    """The pairs' _manifest.json ({} without one)."""
    try:
        fs, root = get_fs(config.pairs, config.storage_options)
        root = root.rstrip("/")
        return read_manifest(fs, posixpath.dirname(root) if root.endswith(".parquet") else root) or {}
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- run


@dataclass
class RerankResult:
    output: str
    pairs: int
    seconds: float
    manifest: dict[str, Any] = field(repr=False)

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        return (
            f"reranked {self.pairs:,} pairs in {self.seconds:.1f}s: {self.pairs_per_second:,.1f} pairs/s -> {self.output}"
        )


def run_rerank(config: RerankConfig) -> RerankResult:
    """Score `config.pairs` with the cross-encoder and write them, best rerank_score first, to `config.output`."""
    from pipeline.stages.cross_encode import check_cross_encoder
    from pipeline.engine.cluster import prepare_output, ray_session_for
    from pipeline.storage.sources import discover_shards

    started = time.time()
    pairs, total = read_pairs(config)
    info = check_cross_encoder(config.model, config.trust_remote_code)
    try:
        shards = discover_shards(config.texts, config.storage_options, _documents(config))
    except InputError as exc:
        raise InputError(str(exc).replace(f"--input {config.texts}", f"--texts {config.texts}", 1)) from None
    cuts, chunks_from = chunk_cuts(config, wanted_ids(pairs)) if pairs.num_rows else (None, None)
    _refuse_clobber(config)
    fs, root = prepare_output(config.output, config.storage_options)

    scores = np.zeros(pairs.num_rows, np.float32)
    tokens, layout, timings = 0, None, {}
    if pairs.num_rows:
        with ray_session_for(config.ray_address, config.quiet):
            scores, tokens, layout, timings = _join_and_score(config, _plan(config), pairs, shards, cuts)
    order = np.lexsort((np.arange(len(scores)), -scores))  # best rerank_score first; ties keep the mined order
    table = pa.table(
        {"id_a": pairs["id_a"], "id_b": pairs["id_b"], "score": pairs["score"], "rerank_score": pa.array(scores, pa.float32())},
        schema=RERANKED_SCHEMA,
    ).take(pa.array(order))
    if config.overwrite and fs.exists(posixpath.join(root, MANIFEST)):
        fs.rm(posixpath.join(root, MANIFEST))  # never a new pairs file beside the old manifest
    write_bytes_atomic(fs, posixpath.join(root, PAIRS_FILE), parquet_bytes(table))
    finished = time.time()
    manifest = _manifest(config, info, layout, total, table, tokens, started, finished, timings, chunks_from)
    write_manifest(fs, root, manifest)
    return RerankResult(config.output, table.num_rows, finished - started, manifest)


def _refuse_clobber(config: RerankConfig) -> None:
    if config.overwrite:
        return
    try:
        fs, root = get_fs(config.output, config.storage_options)
        present = [n for n in (PAIRS_FILE, MANIFEST) if fs.exists(posixpath.join(root.rstrip("/"), n))]
    except (OSError, ValueError):
        return  # prepare_output names what is wrong with the location
    if present:
        raise UsageError(f"--output {config.output} already holds {' and '.join(present)}; use --overwrite or another output")


def _plan(config: RerankConfig):
    """embed's resource plan for this cluster: the cross-encoder replicas take the encoders' places."""
    import ray

    from pipeline.config import EmbedConfig
    from pipeline.engine.plan import alive_nodes, plan_resources

    view = EmbedConfig(
        input=config.texts, output=config.output, device=config.device, dtype=config.dtype,
        num_encoders=config.num_encoders, encoder_threads=config.encoder_threads,
    )
    return plan_resources(view, ray.cluster_resources(), alive_nodes())


def wanted_ids(pairs: pa.Table) -> pa.Array:
    """The distinct ids the pairs name, sorted."""
    ids = pc.unique(pa.concat_arrays([pairs["id_a"].combine_chunks(), pairs["id_b"].combine_chunks()]))
    return ids.take(pc.sort_indices(ids))


def _join_and_score(config: RerankConfig, plan, pairs: pa.Table, shards, cuts) -> tuple[np.ndarray, int, dict, dict]:
    """Rerank scores of `pairs` (indexed by their `pair` column), total tokens, the layout used
    (replicas, their reservations, block and join sizes), and seconds per phase; `cuts`: chunk_cuts'."""
    from pipeline.storage.pair_texts import default_parts, join_texts
    from pipeline.engine.execution import explain
    from pipeline.storage.sources import ReadSpec

    block_pairs = config.block_pairs or (GPU_BLOCK_PAIRS if plan.device == "cuda" else CPU_BLOCK_PAIRS)
    block_pairs = min(block_pairs, -(-pairs.num_rows // (BLOCKS_PER_REPLICA * plan.num_encoders)))
    wanted = wanted_ids(pairs)
    parts = config.join_parts or default_parts(len(wanted))
    spec = ReadSpec(config.text_field, config.id_field, (), config.encoding_errors, config.storage_options)
    started = time.time()
    try:
        blocks = join_texts(
            pairs.select(["pair", "id_a", "id_b"]), wanted, shards, spec, parts, block_pairs, f"--texts {config.texts}",
            cuts,
        )
        joined = time.time()
        replicas = min(plan.num_encoders, len(blocks))
        scores, tokens = _score(config, plan, blocks, block_pairs, replicas, pairs.num_rows)
    except EmbedpipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - turned into one clear message
        raise explain(exc) from None
    layout = {
        "device": plan.device, "num_encoders": replicas, "encoder_cpus": plan.encoder_cpus,
        "encoder_gpus": plan.encoder_gpus, "encoder_threads": plan.encoder_threads,
        "block_pairs": block_pairs, "blocks": len(blocks), "join_parts": parts,
    }
    return scores, tokens, layout, {"join_s": round(joined - started, 3), "score_s": round(time.time() - joined, 3)}


def _score(config: RerankConfig, plan, blocks: list, block_pairs: int, replicas: int, n: int) -> tuple[np.ndarray, int]:
    """The joined blocks through the CrossEncodeStage actor pool: the score of each pair, and the tokens scored."""
    import ray

    from pipeline.engine.execution import ray_data_settings

    ray.wait(blocks, num_returns=len(blocks))  # the join is done before any replica starts
    with ray_data_settings(config.quiet, wait_for_min_actors_s=REPLICAS_START_S):
        return _scores(config, plan, blocks, block_pairs, replicas, n)


def _scores(config: RerankConfig, plan, blocks: list, block_pairs: int, replicas: int, n: int) -> tuple[np.ndarray, int]:
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.stages.cross_encode import CrossEncodeStage
    from pipeline.engine.chain import TASKS_IN_FLIGHT_PER_ACTOR

    ds = ray.data.from_arrow_refs(blocks).map_batches(
        CrossEncodeStage,
        fn_constructor_args=(config, plan.device, plan.encoder_threads),
        batch_size=block_pairs,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR),
        num_cpus=plan.encoder_cpus,
        num_gpus=plan.encoder_gpus,
    )
    scores = np.full(n, np.nan, np.float32)
    tokens = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        scores[batch["pair"].to_numpy()] = batch["rerank_score"].to_numpy()
        tokens += int(pc.sum(batch["n_tokens"]).as_py() or 0)
    assert not np.isnan(scores).any(), "every pair was scored once"
    return scores, tokens


def _manifest(config, info, layout, total, table, tokens, started, finished, timings, chunks_from) -> dict[str, Any]:
    rerank = table["rerank_score"]
    return build_manifest(
        "reranked", rows={"pairs_in": total, "reranked": table.num_rows, "tokens": tokens},
        files=[{"file": PAIRS_FILE, "rows": table.num_rows}], config=config, started=started, finished=finished,
        model=info.as_dict(), timings=timings,
        pairs_input=config.pairs,
        texts=config.texts,
        chunks_from=chunks_from,
        score="cosine (bi-encoder), as mined" if table["score"].null_count == 0 else "none: the pairs had no score",
        rerank_score=f"cross-encoder, {info.activation_fn}",
        top=config.top,
        min_rerank_score=float(pc.min(rerank).as_py()) if table.num_rows else None,
        max_rerank_score=float(pc.max(rerank).as_py()) if table.num_rows else None,
        resources=layout,
    )
