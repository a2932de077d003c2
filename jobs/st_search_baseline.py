"""Baseline for search: what a sentence-transformers user writes, in one process.

    python jobs/st_search_baseline.py EMBEDDINGS_DIR QUERIES.txt OUT.parquet [--top-k 10] [--model DIR]

Loads the model (default the one the output's manifest names), encodes the queries with
`encode_query`, reads every vector with pyarrow, runs `util.semantic_search`, writes Parquet
(query_id, id, rank, score) as `embedpipe search --output` does. Prints a JSON line of the seconds
spent reading the vectors, encoding the queries and in semantic_search alone.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("embeddings")
    p.add_argument("queries")
    p.add_argument("output")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--model")
    args = p.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import semantic_search

    start = time.perf_counter()
    table = pq.read_table(args.embeddings, columns=["id", "embedding"])  # a directory: every file, in name order
    ids = table["id"].to_pylist()
    dim = table.schema.field("embedding").type.list_size
    corpus = torch.from_numpy(table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim))
    read_s = time.perf_counter() - start

    with open(os.path.join(args.embeddings, "_manifest.json"), encoding="utf-8") as f:
        model_path = args.model or json.load(f)["model"]["path"]
    start = time.perf_counter()
    model = SentenceTransformer(model_path, device="cpu")
    with open(args.queries, encoding="utf-8") as f:
        queries = [line.strip() for line in f if line.strip()]
    query_vectors = model.encode_query(queries, convert_to_tensor=True)
    encode_s = time.perf_counter() - start

    start = time.perf_counter()
    hits = semantic_search(query_vectors, corpus, top_k=args.top_k)
    search_s = time.perf_counter() - start

    k = len(hits[0]) if hits else 0
    pq.write_table(pa.table({
        "query_id": [str(q) for q in range(len(hits)) for _ in range(k)],
        "id": [ids[h["corpus_id"]] for found in hits for h in found],
        "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), len(hits)), pa.int32()),
        "score": pa.array([h["score"] for found in hits for h in found], pa.float32()),
    }), args.output)
    print(json.dumps({"read_s": round(read_s, 3), "encode_s": round(encode_s, 3), "search_s": round(search_s, 3)}))


if __name__ == "__main__":
    main()
