"""Baseline for mining: sentence-transformers' paraphrase_mining_embeddings in one process.

    python jobs/st_mine_baseline.py EMBEDDINGS_DIR OUT.parquet [--top-k 100] [--max-pairs 500000]

Reads the vectors, mines, writes Parquet (id_a, id_b, score). Prints the
seconds spent in paraphrase_mining_embeddings alone on stdout.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("embeddings")
    p.add_argument("output")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--max-pairs", type=int, default=500_000)
    args = p.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from sentence_transformers.util import paraphrase_mining_embeddings

    from pipeline import read_embeddings

    ids, vectors = read_embeddings(args.embeddings)
    start = time.perf_counter()
    pairs = paraphrase_mining_embeddings(torch.from_numpy(vectors), top_k=args.top_k, max_pairs=args.max_pairs)
    seconds = time.perf_counter() - start
    table = pa.table(
        {
            "id_a": [ids[i] for _, i, _ in pairs],
            "id_b": [ids[j] for _, _, j in pairs],
            "score": pa.array([s for s, _, _ in pairs], pa.float32()),
        }
    )
    pq.write_table(table, args.output)
    print(f"{seconds:.3f}")


if __name__ == "__main__":
    main()
