"""The baseline `embedpipe rerank` is measured against: a plain sentence-transformers script.

    python jobs/st_rerank_baseline.py PAIRS.parquet TEXTS.txt MODEL_DIR OUTPUT.parquet [--device cpu|cuda] [--batch-size 32]

Reads the pairs (id_a, id_b, score) and the texts (one per line, ids
"<file name>:<line number from 0>" as embed assigns them), scores every pair
with CrossEncoder.predict in one process, writes Parquet (id_a, id_b, score,
rerank_score) sorted by rerank_score. What a user would write without
embedpipe. The last line printed is the seconds spent in predict alone.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("pairs")
    p.add_argument("texts")
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(args.model, device=args.device)
    name = os.path.basename(args.texts)
    with open(args.texts, encoding="utf-8") as f:
        texts = {f"{name}:{i}": line.rstrip("\n") for i, line in enumerate(f)}
    pairs = pq.read_table(args.pairs)
    ids_a, ids_b = pairs["id_a"].to_pylist(), pairs["id_b"].to_pylist()
    start = time.perf_counter()
    scores = model.predict([[texts[a], texts[b]] for a, b in zip(ids_a, ids_b)], batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    table = pairs.append_column("rerank_score", pa.array(np.asarray(scores, np.float32)))
    pq.write_table(table.sort_by([("rerank_score", "descending")]), args.output)
    print(f"{seconds:.3f}")


if __name__ == "__main__":
    main()
