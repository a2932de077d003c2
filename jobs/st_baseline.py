"""The baseline embedpipe is measured against: a plain sentence-transformers script.

    python jobs/st_baseline.py INPUT.txt OUTPUT.parquet [--model DIR] [--device cpu|cuda] [--batch-size 32] [--dtype float16]

Loads the model, encodes every line with SentenceTransformer.encode, writes
Parquet (id, embedding). What a user would write without embedpipe.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="the model cast to this dtype (model.half() and the like), as a GPU user would")
    args = p.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from sentence_transformers import SentenceTransformer

    from pipeline.models.loading import resolve_model_path

    model = SentenceTransformer(resolve_model_path(args.model), device=args.device)
    if args.dtype != "float32":
        model.to(getattr(torch, args.dtype))
    with open(args.input, encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f]
    vectors = model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True).astype(np.float32)
    ids = [f"{os.path.basename(args.input)}:{i}" for i in range(len(texts))]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    pq.write_table(pa.table({"id": ids, "embedding": embedding}), args.output)


if __name__ == "__main__":
    main()
