"""`embedpipe info DIR`: the manifest, a few rows, optionally the closest pairs (embeddings); for pairs,
reranked pairs and search results, the manifest's parameters and counts and the first rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.identity import consistency_problems, names_to_paths
from pipeline.storage.readers import embedding_files, read_embeddings
from pipeline.manifest import read_required
from pipeline.quantization import VectorFormat
from pipeline.storage import lance_sink
from pipeline.storage.filesystems import get_fs

MAX_PAIRS_ROWS = 10_000  # the exact all-pairs scan here is for small outputs; `mine` is for big ones


def show_info(path: str, rows: int = 3, pairs: int = 0, storage_options: dict | None = None,
              pairs_in: str | None = None) -> None:
    """Print the output's manifest (in brief) and first rows; with `pairs`, the closest pairs among
    its rows (those whose id matches the glob `pairs_in`, e.g. 'en.txt:*')."""
    fs, root = get_fs(path, storage_options)
    manifest = read_required(fs, root.rstrip("/"), path)
    if manifest["kind"] in ("pairs", "reranked", "search"):
        return _show_pairs_output(path, manifest, rows, pairs, fs, root)
    brief = {k: manifest[k] for k in ("dim", "pooling", "normalize", "max_seq_length", "rows")}
    brief["precision"] = manifest.get("precision") or manifest.get("output_dtype")
    if manifest.get("kind") != "sparse":
        brief["bytes_per_vector"] = manifest.get("bytes_per_vector") or VectorFormat(brief["precision"] or "float32",
                                                                                    manifest.get("dim")).bytes_per_vector
        if manifest.get("truncate_dim"):
            brief["truncate_dim"] = manifest["truncate_dim"]
    if manifest.get("kind") == "sparse":
        brief.update(kind="sparse", vocab_size=manifest.get("vocab_size"), sparse_top_k=manifest.get("sparse_top_k"))
    brief["model"] = manifest["model"]["name"]
    if manifest.get("chunking"):
        brief["chunking"] = manifest["chunking"]
    brief["files"] = len(manifest["files"])
    if manifest.get("replicas"):  # how many replicas of each stage ran on each node
        brief["replicas_per_node"] = {stage: r["per_node"] for stage, r in manifest["replicas"].items()}
    lance = manifest.get("table_format") == "lance"  # a Lance dataset (pipeline.storage.lance_sink)
    if lance:
        brief["table_format"] = "lance"
    files = [] if lance else embedding_files(path, storage_options)
    # Every file must have been made with the output's settings (pipeline.identity): one that was
    # not (copied in by hand, left by another run) is listed here, and the command exits 2.
    problems = (lance_sink.problems(fs, root, storage_options) if lance
                else consistency_problems(fs, root.rstrip("/"), names_to_paths(files)))
    brief["settings"] = (manifest.get("identity") or {}).get("hash", "not recorded (written before embedpipe recorded them)")
    if problems:
        brief["files_not_belonging"] = problems
    print(json.dumps(brief, indent=2, ensure_ascii=False))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{path}: {problems[0]}{more}; its vectors must not be read together with the others")
    if rows > 0 and (files or lance):
        table = _first_rows(fs, files, rows, path if lance else None, storage_options)
        for row in table.to_pylist():
            if "embedding" in row:
                vec = ", ".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in row["embedding"][:4])
                print(f"{row['id']}: [{vec}, ...]")
            else:  # sparse: its strongest terms
                top = sorted(zip(row["values"], row["indices"]), reverse=True)[:4]
                terms = ", ".join(f"{i}: {v:.4f}" for v, i in top)
                print(f"{row['id']}: {len(row['indices'])} terms {{{terms}, ...}}")
    if pairs > 0 and manifest.get("kind") == "sparse":
        raise InputError("--pairs: this output holds sparse vectors; pairs are mined from dense embeddings")
    if pairs > 0:
        _show_pairs(path, files, pairs, fs, storage_options, pairs_in, chunks=bool(manifest.get("chunking")))


def _first_rows(fs, files: list[str], rows: int, lance_path: str | None, storage_options) -> pa.Table:
    """The output's first rows: its first file's, or a Lance output's first unit's."""
    if lance_path is not None:
        return lance_sink.read_table(lance_path, storage_options, limit=rows) or pa.table({})
    with fs.open(files[0], "rb") as f:
        return pq.read_table(f).slice(0, rows)


def _show_pairs_output(path: str, manifest: dict, rows: int, pairs: int, fs, root: str) -> None:
    """A `mine`, `rerank` or `search` output: its parameters and counts, then its first rows (the
    best pairs; search results query after query)."""
    if pairs > 0:
        held = "search results" if manifest["kind"] == "search" else "mined pairs"
        raise InputError(f"--pairs: {path} already holds {held}; show its first rows with --rows N")
    skip = ("timings", "versions", "config", "resources", "model")
    brief = {k: v for k, v in manifest.items() if k not in skip}
    if isinstance(manifest.get("model"), dict):
        brief["model"] = manifest["model"].get("name")
    print(json.dumps(brief, indent=2, ensure_ascii=False))
    from pipeline.commands.mine import PAIRS_FILE
    from pipeline.commands.search import RESULTS_FILE

    if rows > 0:
        name = RESULTS_FILE if manifest["kind"] == "search" else PAIRS_FILE
        with fs.open(f"{root.rstrip('/')}/{name}", "rb") as f:
            table = pq.read_table(f).slice(0, rows)
        for row in table.to_pylist():
            if "query_id" in row:
                print(f"query {row['query_id']}  {row['rank']:>3}  {row['score']:.4f}  {row['id']}")
                continue
            rerank = f"  rerank {row['rerank_score']:.4f}" if "rerank_score" in row else ""
            print(f"{row['score']:.4f}{rerank}  {row['id_a']} <-> {row['id_b']}")


def _show_pairs(path: str, files: list[str], k: int, fs, storage_options: dict | None, pattern: str | None = None,
                chunks: bool = False) -> None:
    """The k closest pairs, by an exact scan of all pairs (small outputs); of chunks, never two chunks
    of one document (as `mine` leaves them out)."""
    import fnmatch

    ids, vectors = read_embeddings(path, storage_options, dequantize=True)
    if pattern:
        keep = [i for i, doc_id in enumerate(ids) if fnmatch.fnmatchcase(doc_id, pattern)]
        if not keep:
            raise InputError(f"--pairs-in {pattern}: no id of {path} matches it (ids look like {ids[0]!r})")
        ids, vectors = [ids[i] for i in keep], vectors[keep]
    if len(ids) > MAX_PAIRS_ROWS:
        raise InputError(f"--pairs scans all pairs in memory, limited to {MAX_PAIRS_ROWS:,} rows")
    texts = {}
    for file in files:
        with fs.open(file, "rb") as f:
            schema = pq.read_schema(f)
        if "text" in schema.names:
            with fs.open(file, "rb") as f:
                t = pq.read_table(f, columns=["id", "text"])
            texts.update(zip(t["id"].to_pylist(), t["text"].to_pylist()))
    norm = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    sims = norm @ norm.T
    iu = np.triu_indices(len(ids), k=1)
    scores = sims[iu]
    if chunks:  # a chunk's id is '<doc id>#<n>'
        docs = np.array([doc_id.rsplit("#", 1)[0] for doc_id in ids], dtype=object)
        scores = np.where(docs[iu[0]] == docs[iu[1]], -np.inf, scores)
    top = [t for t in np.argsort(-scores)[:k] if np.isfinite(scores[t])]
    print(f"{len(top)} most similar pairs (cosine){f' among the ids matching {pattern}' if pattern else ''}:")
    for t in top:
        a, b = iu[0][t], iu[1][t]
        print(f"  {scores[t]:.4f}  {_label(ids[a], texts)}  <->  {_label(ids[b], texts)}")


def _label(doc_id: str, texts: dict) -> str:
    text = texts.get(doc_id)
    if text is None:
        return doc_id
    text = " ".join(text.split())
    return repr(text[:70] + ("…" if len(text) > 70 else ""))
