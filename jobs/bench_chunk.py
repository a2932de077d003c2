"""What chunking costs (issue 22): `embedpipe embed --chunk-tokens N` on long real documents (Debian's
/usr/share/doc/*/copyright files, else the installed packages' METADATA), against the same command on
the same chunks already cut (one JSONL row per chunk: what a user who cut them first would run), and
against a sentence-transformers script that cuts with the same rule (pipeline.stages.chunking) and
encodes the chunks; whole commands, one after another in the same run, the default model.

    python jobs/bench_chunk.py [--docs 300] [--chunk-tokens 200] [--overlap 0] [--max-chars 20000] [--repeat 1]

With --repeat N the chunked and pre-cut commands alternate N times (the shared machine's speed moves
between minutes) and the medians are compared.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ST_SCRIPT = r"""
import json, sys, time
started = time.perf_counter()
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer
from pipeline.stages.chunking import Chunker
model_path, docs_path, out, n, overlap = sys.argv[1:6]
model = SentenceTransformer(model_path, device="cpu")
docs = [json.loads(line) for line in open(docs_path, encoding="utf-8")]
chunker = Chunker(model.tokenizer.backend_tokenizer.to_str(), False, int(n), int(overlap))
ids, texts = [], []
for doc, spans in zip(docs, chunker.spans([d["text"] for d in docs])):
    for k, (s, e) in enumerate(spans):
        ids.append(f"{doc['id']}#{k}")
        texts.append(doc["text"][s:e])
vectors = model.encode(texts, batch_size=32)
pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])}), out)
print(json.dumps({"chunks": len(texts), "seconds": time.perf_counter() - started}))
"""


def documents(limit: int, max_chars: int) -> list[dict]:
    paths = sorted(glob.glob("/usr/share/doc/*/copyright")) or sorted(
        glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "*.dist-info", "METADATA")))
    docs = []
    for path in paths:
        text = open(path, encoding="utf-8", errors="replace").read()[:max_chars]
        if len(text) >= 3000:
            docs.append({"id": os.path.relpath(path, "/"), "text": text})
        if len(docs) == limit:
            break
    return docs


def main() -> None:
    from jobs.benchmark import machine
    from pipeline.config import DEFAULT_MODEL
    from pipeline.models.loading import resolve_model_path
    from pipeline.stages.chunking import Chunker

    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=300)
    p.add_argument("--chunk-tokens", type=int, default=200)
    p.add_argument("--overlap", type=int, default=0)
    p.add_argument("--max-chars", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    model = resolve_model_path(DEFAULT_MODEL)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    with tempfile.TemporaryDirectory() as work:
        docs = documents(args.docs, args.max_chars)
        whole, cut = os.path.join(work, "docs.jsonl"), os.path.join(work, "chunks.jsonl")
        with open(whole, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        from tokenizers import Tokenizer

        chunker = Chunker(Tokenizer.from_file(os.path.join(model, "tokenizer.json")).to_str(), False,
                          args.chunk_tokens, args.overlap)
        with open(cut, "w", encoding="utf-8") as f:
            for doc, spans in zip(docs, chunker.spans([d["text"] for d in docs])):
                f.writelines(json.dumps({"id": f"{doc['id']}#{k}", "text": doc["text"][s:e]}) + "\n"
                             for k, (s, e) in enumerate(spans))

        def embed(name: str, source: str, *extra: str) -> tuple[float, dict]:
            out = os.path.join(work, name)
            cmd = [sys.executable, "-m", "pipeline", "embed", "--input", source, "--output", out, "--id-field", "id",
                   "--quiet", *extra]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
            return time.perf_counter() - t0, json.load(open(os.path.join(out, "_manifest.json")))

        chunked, precut = [], []
        for k in range(args.repeat):  # alternated
            chunked_s, m = embed(f"chunked{k}", whole, "--chunk-tokens", str(args.chunk_tokens),
                                 "--chunk-overlap", str(args.overlap))
            precut_s, m2 = embed(f"precut{k}", cut)
            chunked.append(chunked_s)
            precut.append(precut_s)
        chunked_s, precut_s = statistics.median(chunked), statistics.median(precut)
        t0 = time.perf_counter()
        st = subprocess.run([sys.executable, "-c", ST_SCRIPT, model, whole, os.path.join(work, "st.parquet"),
                             str(args.chunk_tokens), str(args.overlap)], check=True, env=env, cwd=REPO,
                            capture_output=True, text=True)
        st_s = time.perf_counter() - t0
        st_chunks = json.loads(st.stdout.strip().splitlines()[-1])["chunks"]
    rows = m["rows"]
    print(json.dumps({
        "machine": machine(), "documents": rows["documents"], "characters": sum(len(d["text"]) for d in docs),
        "chunk_tokens": args.chunk_tokens, "overlap": args.overlap, "chunks": rows["chunks"],
        "chunks_per_document": rows["chunks_per_document"], "tokens": rows["tokens"],
        "chunked_runs_s": [round(x, 1) for x in chunked], "precut_runs_s": [round(x, 1) for x in precut],
        "chunked_s": round(chunked_s, 1), "precut_s": round(precut_s, 1), "precut_rows": m2["rows"]["embedded"],
        "chunking_cost": round(chunked_s / precut_s, 3),
        "st_s": round(st_s, 1), "st_chunks": st_chunks, "vs_st": round(st_s / chunked_s, 3),
        "docs_per_s": round(rows["documents"] / chunked_s, 1), "chunks_per_s": round(rows["chunks"] / chunked_s, 1),
        "st_docs_per_s": round(rows["documents"] / st_s, 1), "st_chunks_per_s": round(st_chunks / st_s, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
