"""`_manifest.json`: one writer and one reader for every kind of output, with the same sections.

Every manifest, whatever the output, has:

    kind            what the output holds: dense, sparse, pairs, reranked or search
    format          embedpipe/embeddings, embedpipe/pairs, embedpipe/reranked-pairs or embedpipe/search-results
    format_version  2; manifests without it are version 1 and are read all the same
    rows            counts of what went in and came out
    model           the model that made the vectors, scores or query vectors (None for pairs: they come from vectors)
    files           the output's Parquet files, with their row counts
    config          the options of the run (never credentials)
    timings         started, finished, seconds, and the kind's own breakdown
    versions        embedpipe's and its libraries' versions

followed by the kind's own keys (KEYS below, which docs/reference.md is generated from). It is
written last, atomically: an output without one is not finished.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
from typing import Any

from pipeline.errors import InputError
from pipeline.storage.sink import MANIFEST
from pipeline.storage.filesystems import write_bytes_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
FORMATS = {"dense": "embedpipe/embeddings", "sparse": "embedpipe/embeddings", "pairs": "embedpipe/pairs",
           "reranked": "embedpipe/reranked-pairs", "search": "embedpipe/search-results"}
KINDS = tuple(FORMATS)

COMMON_KEYS = {
    "kind": "what the output holds: `dense` (one vector per document), `sparse` (SPLADE terms), `pairs` "
            "(mined pairs), `reranked` (pairs with a cross-encoder score) or `search` (each query's top-k documents)",
    "format": "`embedpipe/embeddings`, `embedpipe/pairs`, `embedpipe/reranked-pairs` or `embedpipe/search-results`",
    "format_version": f"{FORMAT_VERSION}; a manifest without it is version 1 (written before `kind` and "
                      "`format_version`), and is read all the same",
    "version": "1: the key readers of version 1 looked for; kept",
    "rows": "counts: for embeddings `documents`, `embedded`, `invalid` (empty texts skipped), `truncated`, "
            "`tokens` (with --chunk-tokens also `chunks` and `chunks_per_document`: `mean`, `max`); for pairs "
            "`documents`, `pairs`; for reranked pairs `pairs_in`, `reranked`, `tokens`; for search results "
            "`queries`, `documents`, `results`",
    "model": "the model: `name`, `path`, `fingerprint` (sha256 over its files), and its settings; "
             "None for pairs; for search results the model that encoded the queries, its `prompt` and `device`",
    "files": "the Parquet files: `file` and `rows` (for embeddings also `shard` and `last_shard`, the first and "
             "last input shard it holds rows of, `shards` (how many), `last` (the last file of its group), "
             "`embedded`, `invalid`, `truncated`, `tokens`, `chunks`, `max_chunks`; `rows` and `embedded` count documents)",
    "config": "every option of the run, as in docs/reference.md; storage options (credentials) are never written",
    "timings": "`started`, `finished` (UTC, ISO 8601), `seconds`; embeddings add `stages` (per stage and step "
               "(`read.reading`, `tokenize.tokenizing`, `encode.encoding`, `encode.model`: the time inside the model's "
               "calls, `write.writing`, `write.joining`, ...): `steps`, `busy_s` (wall clock), `cpu_s` (CPU time of the "
               "thread doing it), `first_s` and `last_s` after `origin_unix`; and `chain_started_s`), reranks "
               "`join_s`, `score_s`, searches `read_s` (the output's manifest and footers, the queries), "
               "`encode_s` (loading the model, encoding the queries), `score_s` (reading and scoring every row)",
    "versions": "versions of embedpipe, ray, torch, transformers, sentence-transformers, pyarrow, tokenizers",
}
KEYS: dict[str, dict[str, str]] = {
    "embeddings": {
        "identity": "the settings that made the vectors and their `hash`, as in `_run.json` and in every file's "
                    "`embedpipe.settings` metadata (docs/usage.md, the run's identity)",
        "table_format": "`parquet` (one file per `files` entry) or `lance` (--format lance: the directory is a Lance "
                        "dataset; each `files` entry is a unit committed as a Lance fragment, named as its Parquet file would be)",
        "dim": "the vectors' logical dimension, after --truncate-dim (a binary vector of 384 dimensions is 48 "
               "bytes and has dim 384; a sparse model's: its vocabulary size)",
        "pooling": "the pooling the model ran, e.g. `mean`, `cls`, `mean+max`",
        "normalize": "whether the vectors are L2-normalised",
        "max_seq_length": "tokens per text, beyond which a text was truncated",
        "dtype": "what the encoders computed in: float32, float16, bfloat16 or int8",
        "backend": "what ran the model: `onnxruntime` or `torch`; None when nothing was encoded",
        "precision": "what is stored of each vector: float32, float16, int8, uint8, binary or ubinary "
                     "(as sentence-transformers' quantize_embeddings)",
        "output_dtype": "deprecated, the same as `precision`: kept for readers of older manifests",
        "truncate_dim": "the dimension the vectors were truncated to (--truncate-dim, or the model's own), None if not",
        "bytes_per_vector": "the stored bytes of one vector's values (dense outputs)",
        "quantization": "int8/uint8: `precision`, `ranges` ([[min per dimension], [max per dimension]], the run's "
                        "buckets), `source` (how they were obtained: `from` rows (with `rows`, `shards`, `device`, "
                        "`seconds`), file (`path`) or a resumed run); None for other precisions",
        "chunking": "--chunk-tokens: `tokens` (most per chunk) and `overlap`; rows are chunks, with `doc_id`, "
                    "`chunk`, `start`, `end`. None: one vector per document",
        "vocab_size": "sparse outputs: the vocabulary size",
        "sparse_top_k": "sparse outputs: the terms kept per document (None: all non-zero ones)",
        "input": "the input as planned: `files` (shards), `bytes`, `groups` (what one read task reads: a shard, "
                 "or small shards packed together, docs/usage.md#many-small-files) and `packed_groups`",
        "shards": "per group of the input: `shard` (its first shard), for a packed group `last_shard` and `count` "
                  "(its shards, in key order: `_plan.json` lists them), its `files`, `rows`, `embedded`",
        "shards_read": "input shards this run read; on a resume, a group whose files were all committed is not "
                       "opened",
        "resources": "the resource plan: device, tokenizer and encoder counts and reservations (encoder_gpus: "
                     "1/N with --encoders-per-gpu N), threads, block rows, batch_tokens (the micro-batches' token budget), "
                     "call_tokens (what a micro-batch costs beyond its tokens: the cut weighs it against padding), "
                     "writer (who built the files: the encoder, or a separate writer, --writer)",
        "replicas": "where each stage's actors ran: per stage, `actors` (node, IP, GPUs, device, dtype, backend) "
                    "and `per_node` counts",
    },
    "pairs": {
        "embeddings": "the embeddings directory mined",
        "embeddings_identity": "the settings hash of those embeddings (their `_run.json`), None if they have none",
        "documents": "rows mined",
        "pairs": "pairs written",
        "top_k": "candidates kept per document",
        "max_pairs": "best pairs kept in all",
        "threshold": "the lowest score kept, or None",
        "block_size": "rows per block of the blocked products",
        "same_document_pairs": "for embeddings of chunks (`--chunk-tokens`): `left out` (the default: two chunks "
        "of one document are never paired) or `kept` (`--same-document-pairs`); null for whole documents",
        "products": "where the block products ran: `device` planned (cuda when the cluster has GPUs), `ran_on` "
                    "([device, dtype] pairs the block-product tasks really used: cuda/float16 with candidates scored "
                    "again in float32, or cpu/float32), `tasks`, `gpu_tasks` (those holding a GPU), `per_node`",
        "precision": "what the embeddings stored, so how they were read: float32/float16 as they are, int8/uint8 "
                     "dequantised with their run's ranges (each bucket's centre), binary/ubinary as +1/-1 vectors",
        "score": "`cosine`; for binary/ubinary embeddings `cosine of the +1/-1 vectors` (1 - 2 * Hamming / dim)",
        "min_score": "the lowest score written",
        "max_score": "the highest score written",
    },
    "reranked": {
        "pairs_input": "the pairs directory reranked",
        "chunks_from": "pairs of chunks (`embed --chunk-tokens`): the embeddings output whose `start`/`end` cut "
                       "each chunk's text out of `texts`; null for pairs of whole documents",
        "texts": "where the documents' texts were read",
        "score": "what `score` is: the bi-encoder cosine, as mined",
        "rerank_score": "what `rerank_score` is: the cross-encoder's output and its activation",
        "top": "how many of the best mined pairs were reranked (None: all)",
        "min_rerank_score": "the lowest rerank score",
        "max_rerank_score": "the highest rerank score",
        "resources": "the layout: replicas, their reservations, block and join sizes",
    },
    "search": {
        "embeddings": "the embeddings directory searched",
        "embeddings_identity": "the settings hash of those embeddings (their `_run.json`), None if they have none",
        "queries": "the query file (--queries), or None for one query given on the command line (query_id `0`)",
        "top_k": "documents kept per query",
        "prompt": "the prompt the queries were encoded with (the model's `query` prompt, --prompt-name or "
                  "--prompt), None for none",
        "precision": "what the embeddings stored, so how documents and queries were read: float32/float16 as they "
                     "are, int8/uint8 as their buckets' centres, binary/ubinary as +1/-1 vectors, as `mine` reads them",
        "score": "`cosine`; for binary/ubinary embeddings `cosine of the +1/-1 vectors` (1 - 2 * Hamming / dim)",
        "min_score": "the lowest score written",
        "max_score": "the highest score written",
    },
}
SECTION = {"dense": "embeddings", "sparse": "embeddings", "pairs": "pairs", "reranked": "reranked", "search": "search"}


def build(kind: str, *, rows: dict, files: list[dict], config, started: float, finished: float,
          model: dict | None = None, timings: dict | None = None, **body: Any) -> dict[str, Any]:
    """The manifest of an output of `kind`: the common sections, then the kind's own keys (`body`)."""
    from pipeline import __version__

    unknown = set(body) - set(KEYS[SECTION[kind]])
    assert not unknown, f"undocumented manifest keys for {kind}: {sorted(unknown)} (add them to KEYS)"
    return {
        "kind": kind,
        "format": FORMATS[kind],
        "format_version": FORMAT_VERSION,
        "version": 1,
        "model": model,
        "rows": rows,
        "files": files,
        **body,
        "config": config.public_dict(),
        "timings": {
            "started": _iso(started),
            "finished": _iso(finished),
            "seconds": round(finished - started, 3),
            **(timings or {}),
        },
        "versions": versions(__version__),
    }


def write(fs, root: str, manifest: dict[str, Any]) -> None:
    """Write `root/_manifest.json` atomically (last, after every file of the output)."""
    write_bytes_atomic(fs, posixpath.join(root, MANIFEST), json.dumps(manifest, indent=2).encode())


def read(fs, root: str) -> dict | None:
    """The manifest in `root` with `kind` and `format_version` filled in for version-1 manifests; None
    where there is none (or it cannot be read: logged). Read from storage, never a listing cache."""
    path = posixpath.join(root, MANIFEST)
    try:
        data = json.loads(fs.cat_file(path))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, UnicodeDecodeError):
        log.warning("ignoring unreadable %s", path)
        return None
    if not isinstance(data, dict):
        log.warning("ignoring %s: not a JSON object", path)
        return None
    return upgraded(data)


def upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest in today's shape (kind, format_version; reranked `counts` as `rows`)."""
    if "format_version" in data:
        return data
    data = dict(data)
    fmt = data.get("format")
    if fmt == "embedpipe/pairs":
        data["kind"] = "pairs"
        data.setdefault("rows", {"documents": data.get("documents"), "pairs": data.get("pairs")})
    elif fmt == "embedpipe/reranked-pairs":
        data["kind"] = "reranked"
        data.setdefault("rows", data.get("counts"))
    else:
        data.setdefault("kind", "dense")
    data["format_version"] = 1
    return data


def read_required(fs, root: str, where: str, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """`read`, or InputError naming `where` when there is no manifest or it is of another kind."""
    manifest = read(fs, root)
    if manifest is None:
        raise InputError(f"{where}: no {MANIFEST} (not an embedpipe output, or the run has not finished)")
    if manifest["kind"] not in kinds:
        raise InputError(f"{where}: holds {manifest['kind']} output, expected {' or '.join(kinds)}")
    return manifest


def versions(own: str) -> dict[str, str]:
    from importlib import metadata

    out = {"embedpipe": own}
    for dist in ("ray", "torch", "transformers", "sentence-transformers", "pyarrow", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def reference_markdown() -> str:
    """The manifest keys, for docs/reference.md."""
    lines = ["## Manifest keys", "",
             "Every output's `_manifest.json` has these sections (pipeline/manifest.py):", "",
             "| key | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in COMMON_KEYS.items()]
    titles = {"embeddings": "Embeddings (`kind` dense or sparse)", "pairs": "Mined pairs (`kind` pairs)",
              "reranked": "Reranked pairs (`kind` reranked)", "search": "Search results (`kind` search)"}
    for section, keys in KEYS.items():
        lines += ["", f"### {titles[section]}", "", "| key | meaning |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat()
