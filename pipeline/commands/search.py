"""`embedpipe search`: exact top-k by cosine over an embeddings output, in one process, without Ray.

    the output's manifest: the model that made the vectors (its fingerprint checked), the run's
      settings; its files as `mine` plans them (pipeline.commands.mine.plan_files)
      -> the queries (one, or a .txt/.jsonl file: pipeline.storage.queries) encoded here by that
         model as the run loaded it, with its `query` prompt when it has one (as encode_query),
         stored as the run stored its documents (quantize_queries) and read back as `mine` reads them
      -> the output's files read a block of rows at a time and scored (pipeline.retrieval: a running
         top-k per query; int8/uint8 as bucket centres, binary/ubinary as +1/-1, as `mine` scores them)
      -> the hits' ids (the id column of the files holding them); their texts with --texts
         (pair_texts.pick_texts, shard by shard, as rerank reads them)
      -> printed, or DIR/results.parquet (query_id, id, rank, score) and DIR/_manifest.json

Exact brute force: every query is scored against every row (no approximate index). Memory: one
file's vector column as pyarrow reads it, a block of rows and its scores, queries x top_k hits.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.commands.mine import FileSpan, pair_ids, plan_files
from pipeline.config import EmbedConfig, SearchConfig
from pipeline.errors import InputError, UsageError
from pipeline.manifest import build as build_manifest, read as read_manifest, read_required, write as write_manifest
from pipeline.quantization import from_column
from pipeline.storage.filesystems import get_fs, write_bytes_atomic
from pipeline.storage.sink import MANIFEST, parquet_bytes

RESULTS_FILE = "results.parquet"
RESULTS_SCHEMA = pa.schema([("query_id", pa.string()), ("id", pa.string()), ("rank", pa.int32()), ("score", pa.float32())])
QUERY_BATCH = 32  # queries per forward pass, encode's default


@dataclass
class SearchResult:
    """Each query's top-k: `rows` and `scores` are (queries, k) arrays, best first; `ids` holds the
    hits' ids query after query (k each), `texts` their texts with --texts."""

    query_ids: list[str]
    queries: list[str]
    rows: np.ndarray
    scores: np.ndarray
    ids: pa.Array
    documents: int
    seconds: float
    prompt: str | None = None
    texts: pa.Array | None = None
    output: str | None = None
    manifest: dict[str, Any] | None = field(default=None, repr=False)
    unit: str = "documents"
    """What a row of the output is: documents, or chunks (embed --chunk-tokens)."""

    @property
    def k(self) -> int:
        return self.rows.shape[1]

    def hits(self, query: int) -> list[dict[str, Any]]:
        """One query's hits, best first: {'rank', 'id', 'score', 'corpus_id' (the row, in the order
        read_embeddings reads the output), 'text' (with --texts)}."""
        hits = []
        for rank in range(self.k):
            at = query * self.k + rank
            hit = {"rank": rank + 1, "id": self.ids[at].as_py(), "score": float(self.scores[query, rank]),
                   "corpus_id": int(self.rows[query, rank])}
            if self.texts is not None:
                hit["text"] = self.texts[at].as_py()
            hits.append(hit)
        return hits

    @property
    def results(self) -> list[list[dict[str, Any]]]:
        """Every query's hits, as util.semantic_search lists them (with 'id', 'rank', 'text' added)."""
        return [self.hits(q) for q in range(len(self.query_ids))]

    def table(self) -> pa.Table:
        """results.parquet: query_id, id, rank (1 = best), score; query after query, best first."""
        q, k = self.rows.shape
        return pa.table({
            "query_id": pa.array(self.query_ids, pa.string()).take(pa.array(np.repeat(np.arange(q), k))),
            "id": self.ids,
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), q), pa.int32()),
            "score": pa.array(self.scores.reshape(-1), pa.float32()),
        }, schema=RESULTS_SCHEMA)

    def lines(self) -> list[str]:
        """The printed form: per query a header line, then rank, score, id (and text)."""
        out = []
        for q, (query_id, query) in enumerate(zip(self.query_ids, self.queries)):
            out.append(f"query {query_id}: {_shown(query, 200)}" if len(self.query_ids) > 1 else f"query: {_shown(query, 200)}")
            for hit in self.hits(q):
                text = f"  {_shown(hit['text'], 120)}" if "text" in hit else ""
                out.append(f"{hit['rank']:>4}  {hit['score']:.4f}  {hit['id']}{text}")
        return out

    def summary_line(self) -> str:
        where = f" -> {self.output}" if self.output else ""
        queries = f"{len(self.query_ids):,} {'query' if len(self.query_ids) == 1 else 'queries'}"
        return f"searched {self.documents:,} {self.unit} for {queries} (top {self.k}) in {self.seconds:.1f}s{where}"


def _shown(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run_search(config: SearchConfig) -> SearchResult:
    from pipeline.storage.queries import read_queries

    started = time.time()
    manifest = embeddings_manifest(config)
    spans = plan_files(config)
    query_ids, queries = (["0"], [config.query]) if config.query is not None else read_queries(
        config.queries, config.storage_options)
    out = results_dir(config) if config.output else None
    shards = texts_shards(config, manifest) if config.texts else None
    loaded = time.time()
    encoder = QueryEncoder(config, manifest)
    vectors = encoder.encode(queries)
    encoded = time.time()
    rows, scores = top_k(config, spans, vectors)
    scored = time.time()
    flat = rows.reshape(-1)
    ids = pair_ids(config, spans, flat, flat)[0] if len(flat) else pa.array([], pa.string())
    texts = hit_texts(config, manifest, shards, ids) if shards is not None else None
    documents = spans[-1].start + spans[-1].rows
    result = SearchResult(query_ids, queries, rows, scores, ids, documents=documents, seconds=0.0,
                          prompt=encoder.prompt, texts=texts, output=config.output,
                          unit="chunks" if manifest.get("chunking") else "documents")
    timings = {"read_s": round(loaded - started, 3), "encode_s": round(encoded - loaded, 3),
               "score_s": round(scored - encoded, 3)}
    if out is not None:
        write_results(config, out, result, manifest, encoder, spans, timings, started)
    result.seconds = time.time() - started
    return result


# --------------------------------------------------------------------------- the output searched


def embeddings_manifest(config: SearchConfig) -> dict[str, Any]:
    """The manifest of the output searched: a finished embed output of dense vectors."""
    where = config.embeddings
    try:
        fs, root = get_fs(config.embeddings, config.storage_options)
        root = root.rstrip("/") or root
        if fs.isfile(root):
            raise InputError(f"{where}: is a file; search takes the output directory (its manifest names the model)")
        if not fs.isdir(root):
            raise InputError(f"{where}: no such directory")
        return read_required(fs, root, where, ("dense",))
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}: cannot be read ({exc.__class__.__name__})") from None


def top_k(config: SearchConfig, spans: list[FileSpan], queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of every query's top_k over the output's rows, read config.block_size at a time."""
    from pipeline.retrieval import EMPTY_ROW, RunningTopK

    fs, _ = get_fs(config.embeddings, config.storage_options)
    vectors = spans[0].vectors  # every file's, as plan_files checked
    binary = vectors.precision in ("binary", "ubinary")  # +1/-1: exact integer sums / dim (pipeline.retrieval)
    found = RunningTopK(queries, config.top_k, divisor=queries.shape[1] if binary else None)
    for span in spans:
        assert found.seen == span.start
        with fs.open(span.path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=config.block_size, columns=["embedding"]):
                found.add(span.vectors.decode(from_column(batch.column(0))))  # float32; int8 centres, binary +1/-1
    rows, scores = found.result()
    if (rows == EMPTY_ROW).any():  # only NaN scores fail every comparison
        raise InputError(f"{config.embeddings}: holds vectors that are not finite numbers (NaN), which no score ranks")
    return rows, scores


def texts_shards(config: SearchConfig, manifest: dict) -> list:
    """The shards of --texts, found before any work (a wrong path is refused at once), read as embed
    read its input (a document per file where the manifest says so)."""
    from pipeline.storage.sources import discover_shards

    documents = bool((manifest.get("config") or {}).get("document_per_file"))
    try:
        return discover_shards(config.texts, config.storage_options, documents)
    except InputError as exc:
        raise InputError(str(exc).replace(f"--input {config.texts}", f"--texts {config.texts}", 1)) from None


def hit_texts(config: SearchConfig, manifest: dict, shards: list, ids: pa.Array) -> pa.Array:
    """The text of every hit, read from --texts as embed read its input (its text_field, id_field and
    encoding_errors, from the manifest), shard by shard, keeping only the hits' ids. Hits that are
    chunks (embed --chunk-tokens) get their own text, text[start:end] of their document."""
    from pipeline.storage.packing import pack_shards
    from pipeline.storage.pair_texts import PICK_ROWS, chunk_offsets, pick_texts
    from pipeline.storage.sources import ReadSpec

    embedded = manifest.get("config") or {}
    spec = ReadSpec(embedded.get("text_field") or "text", embedded.get("id_field"), (),
                    embedded.get("encoding_errors") or "strict", config.storage_options)
    unique = pc.unique(ids)
    wanted = unique.take(pc.sort_indices(unique))
    cuts = chunk_offsets(config.embeddings, config.storage_options, wanted, f"--embeddings {config.embeddings}") \
        if manifest.get("chunking") else None
    tables, found = [], []
    for group in pack_shards(shards, PICK_ROWS):  # small files read together, as embed reads them
        picked, positions = pick_texts(group, spec, wanted, 1, cuts)
        tables.append(picked)
        found.append(positions)
    counts = np.bincount(np.concatenate(found), minlength=len(wanted))
    for problem, at in (("is not in it (or its text is empty)", counts == 0), ("is on several of its rows", counts > 1)):
        if at.any():
            raise InputError(f"--texts {config.texts}: id {wanted[int(np.argmax(at))].as_py()!r} {problem}; "
                             f"is it the input {config.embeddings} was embedded from?")
    picked = pa.concat_tables(tables)
    texts = picked["text"].take(pc.sort_indices(picked["pos"]))  # position p: the text of wanted[p]
    return texts.take(pc.index_in(ids, value_set=wanted)).combine_chunks()


# --------------------------------------------------------------------------- the queries' vectors


class QueryEncoder:
    """The run's model, loaded here as the run loaded it (pooling, max_seq_length, normalisation), and
    the queries' prompt: --prompt, --prompt-name, else the model's `query` prompt (encode_query's choice)."""

    def __init__(self, config: SearchConfig, manifest: dict[str, Any]):
        from pipeline.models.loading import _routes, load_model, resolve_prompt

        self.config, self.manifest = config, manifest
        embedded = manifest.get("config") or {}
        if embedded.get("trust_remote_code") and not config.trust_remote_code:
            raise UsageError(f"{config.embeddings} was embedded with --trust-remote-code: its model runs its own "
                             "code; add --trust-remote-code to encode the queries with it")
        self.path, self.fingerprint = model_path(config, manifest)
        self.device = query_device(config.device)
        view = EmbedConfig(
            input="-", output=config.embeddings, model=self.path, pooling=embedded.get("pooling"),
            normalize=embedded.get("normalize"), max_seq_length=embedded.get("max_seq_length"),
            trust_remote_code=config.trust_remote_code, prompt=config.prompt, prompt_name=config.prompt_name,
            role="query",
        )
        self.model = load_model(view, self.device)
        if config.prompt is None and config.prompt_name is None and _routes(self.model):
            raise UsageError(f"model {self.path} routes queries and documents through different modules (a Router), "
                             "which embedpipe does not do; give the queries' prompt with --prompt-name or --prompt")
        self.prompt = resolve_prompt(self.model, view)

    def encode(self, queries: list[str]) -> np.ndarray:
        """float32 query vectors, as the output's documents are read back: truncated, normalised and
        quantised as the run stored them (quantize_queries), then dequantised as `mine` reads them."""
        from pipeline.storage.readers import output_format, quantize_queries

        self.model.truncate_dim = None  # the run's truncation (the model's own included) is the format's
        vectors = self.model.encode(queries, prompt=self.prompt, batch_size=QUERY_BATCH, convert_to_numpy=True,
                                    show_progress_bar=False)
        stored = quantize_queries(vectors, self.config.embeddings, self.config.storage_options)
        return output_format(self.config.embeddings, self.config.storage_options).decode(stored)

    def as_dict(self) -> dict[str, Any]:
        recorded = self.manifest.get("model") or {}
        return {"name": recorded.get("name"), "path": self.path, "fingerprint": self.fingerprint,
                "prompt": self.prompt, "device": self.device}


def model_path(config: SearchConfig, manifest: dict[str, Any]) -> tuple[str, str | None]:
    """(path or hub id, fingerprint) of the model that made the vectors: --model, else the path the
    manifest records, else the run's --model; the files' fingerprint must be the run's."""
    from pipeline.models.loading import fingerprint, resolve_model_path

    recorded = manifest.get("model") or {}
    expected = recorded.get("fingerprint") or ((manifest.get("identity") or {}).get("settings") or {}).get("model")
    if config.model:
        path = resolve_model_path(config.model)
        found = fingerprint(path)
        if expected and found != expected:
            raise InputError(f"--model {config.model}: not the model that made {config.embeddings} (its files' "
                             f"fingerprint is {found}, the run's {expected})")
        return path, found
    names = [recorded.get("path"), (manifest.get("config") or {}).get("model"), recorded.get("name")]
    for name in dict.fromkeys(n for n in names if n):
        try:
            path = resolve_model_path(name)
        except InputError:
            continue
        found = fingerprint(path)
        if not expected or found == expected:
            return path, found
    raise InputError(f"{config.embeddings}: its model ({recorded.get('name')}, {recorded.get('path')}) is not on this "
                     "machine with the same files; give its directory with --model")


def query_device(asked: str) -> str:
    if asked == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if asked == "cuda":
        raise UsageError("--device cuda: torch sees no CUDA device")
    return "cpu"


# --------------------------------------------------------------------------- DIR/results.parquet


def results_dir(config: SearchConfig):
    """(fs, root) of --output, checked before any work: a directory of search results, or a new one."""
    from pipeline.engine.cluster import prepare_output

    fs, root = prepare_output(config.output, config.storage_options)
    where = f"--output {config.output}"
    previous = read_manifest(fs, root)
    if previous is not None and previous.get("kind") != "search":
        raise InputError(f"{where}: holds a {previous.get('kind')} output ({MANIFEST}); search results need a "
                         "directory of their own")
    names = [posixpath.basename(p) for p in fs.ls(root, detail=False)] if fs.isdir(root) else []
    other = next((n for n in sorted(names) if (n.endswith(".parquet") and n != RESULTS_FILE) or n == "_run.json"), None)
    if other is not None:
        raise InputError(f"{where}: holds {other}, which is not search results; use a directory of its own")
    return fs, root


def write_results(config: SearchConfig, out, result: SearchResult, manifest: dict, encoder: QueryEncoder,
                  spans: list[FileSpan], timings: dict, started: float) -> None:
    """results.parquet, then _manifest.json (an older search's manifest removed first: never a new
    results file beside the old manifest)."""
    fs, root = out
    if fs.exists(posixpath.join(root, MANIFEST)):
        fs.rm(posixpath.join(root, MANIFEST))
    table = result.table()
    write_bytes_atomic(fs, posixpath.join(root, RESULTS_FILE), parquet_bytes(table))
    precision = spans[0].vectors.precision
    run = manifest.get("identity") or {}
    result.manifest = build_manifest(
        "search", rows={"queries": len(result.query_ids), "documents": result.documents, "results": table.num_rows},
        files=[{"file": RESULTS_FILE, "rows": table.num_rows}], config=config, started=started, finished=time.time(),
        model=encoder.as_dict(), timings=timings,
        embeddings=config.embeddings,
        embeddings_identity=run.get("hash"),
        queries=config.queries,
        top_k=config.top_k,
        prompt=encoder.prompt,
        precision=precision,
        score="cosine" if precision not in ("binary", "ubinary") else "cosine of the +1/-1 vectors",
        min_score=float(result.scores.min()) if result.scores.size else None,
        max_score=float(result.scores.max()) if result.scores.size else None,
    )
    write_manifest(fs, root, result.manifest)
