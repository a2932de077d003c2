"""The search benchmark (`python jobs/benchmark.py --task search`): `embedpipe search` of
--search-queries queries over --search-vectors vectors against sentence-transformers'
`util.semantic_search`, in one run, on one machine.

The vectors: --search-vectors random unit vectors (384 dimensions, numpy seed 0) written as a real
embed output. A real `embedpipe embed` of 200 lines of data/sample/en.txt with all-MiniLM-L6-v2
gives the output its `_run.json`, `_manifest.json` and every file's settings; its vectors are then
replaced by the random ones (files of 50,000 rows, ids `v0`, `v1`, ...), so `search` reads, checks
and loads the model exactly as for any output. The queries: the first --search-queries distinct
English fortunes (`apt-get install fortunes fortunes-min`), else lines of data/sample/en.txt.

Both sides are whole commands, alternated --repeat times (best of each):
- embedpipe: `python -m pipeline search OUT --queries q.txt --output RES --top-k K`;
- sentence-transformers: `jobs/st_search_baseline.py` (pyarrow read, `encode_query`, semantic_search).
Also the scoring alone: the manifest's `score_s` (reading the files a block at a time and scoring)
against the seconds inside semantic_search (its vectors already in memory: `ratio_scoring`) and
against the baseline's pyarrow read plus semantic_search (`ratio_read_and_score`, the same work). The hits must agree:
the same ids rank by rank, except between scores equal within 1e-5.

The whole commands are dominated by encoding the queries (the same model on both sides), and on a
shared machine by its load; so the scoring is also timed in one process, alternated --repeat + 2
times on the same output: embedpipe's blocked read and running top-k (`pipeline.commands.search.top_k`)
against pyarrow's read plus semantic_search, with --search-queries random unit query vectors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 384
FILE_ROWS = 50_000


def bench_search(args) -> dict:
    sys.path.insert(0, REPO)
    from jobs.benchmark import machine

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    with tempfile.TemporaryDirectory() as work:
        env["EMBEDPIPE_CACHE"] = os.path.join(work, "cache")
        out = os.path.join(work, "vectors")
        real_output_of_random_vectors(out, args.search_vectors, work, env)
        queries = os.path.join(work, "queries.txt")
        with open(queries, "w", encoding="utf-8") as f:
            f.writelines(q + "\n" for q in query_texts(args.search_queries))
        ours_cmd = [sys.executable, "-m", "pipeline", "search", out, "--queries", queries, "--output",
                    os.path.join(work, "results"), "--top-k", str(args.top_k_search), "--quiet"]
        st_cmd = [sys.executable, os.path.join(REPO, "jobs", "st_search_baseline.py"), out, queries,
                  os.path.join(work, "st.parquet"), "--top-k", str(args.top_k_search)]
        ours, theirs, score_s, search_s = [], [], [], []
        for _ in range(args.repeat):  # alternated, so a busy spell of the machine hits both sides
            seconds, stdout = run(st_cmd, env)
            theirs.append(seconds)
            search_s.append(json.loads(stdout.strip().splitlines()[-1]))
            ours.append(run(ours_cmd, env)[0])
            with open(os.path.join(work, "results", "_manifest.json"), encoding="utf-8") as f:
                score_s.append(json.load(f)["timings"])
        agreement = compare(os.path.join(work, "results", "results.parquet"), os.path.join(work, "st.parquet"))
        in_process = scoring_in_process(out, args.search_queries, args.top_k_search, args.repeat + 2)
    best_st = min(range(len(theirs)), key=lambda k: search_s[k]["search_s"])
    best_ours = min(range(len(ours)), key=lambda k: score_s[k]["score_s"])
    result = {
        "command": " ".join(["python jobs/benchmark.py --task search", f"--search-vectors {args.search_vectors}",
                             f"--search-queries {args.search_queries}", f"--repeat {args.repeat}"]),
        "commit": commit(),
        "machine": machine(),
        "cpu": cpu_flags(),
        "vectors": args.search_vectors, "dim": DIM, "queries": args.search_queries, "top_k": args.top_k_search,
        "data": "random unit vectors (seed 0) written as a real embed output (all-MiniLM-L6-v2's _run.json, "
                "manifest and file settings); fortune queries encoded by the model",
        "embedpipe_seconds": round(min(ours), 2),
        "st_seconds": round(min(theirs), 2),
        "ratio_whole_command": round(min(theirs) / min(ours), 3),
        "embedpipe_score_s": score_s[best_ours]["score_s"],
        "st_semantic_search_s": search_s[best_st]["search_s"],
        "ratio_scoring": round(search_s[best_st]["search_s"] / score_s[best_ours]["score_s"], 3),
        "ratio_read_and_score": round((search_s[best_st]["read_s"] + search_s[best_st]["search_s"])
                                      / score_s[best_ours]["score_s"], 3),
        "embedpipe_timings": score_s[best_ours],
        "st_timings": search_s[best_st],
        "all_runs": {"embedpipe": [round(x, 2) for x in ours], "sentence_transformers": [round(x, 2) for x in theirs]},
        "scoring_in_one_process": in_process,
        **agreement,
    }
    print(json.dumps(result, indent=2))
    if agreement["queries_differing"]:
        sys.exit("the hits disagree with semantic_search")
    return result


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    """(wall seconds, stdout) of a whole command."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def scoring_in_process(out: str, n_queries: int, k: int, repeat: int) -> dict:
    """Best-of-`repeat` seconds, alternated: embedpipe's read + score against pyarrow's read + semantic_search."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from sentence_transformers.util import semantic_search

    from pipeline.commands.mine import plan_files
    from pipeline.commands.search import top_k
    from pipeline.config import SearchConfig

    config = SearchConfig(embeddings=out, query="-", top_k=k)
    spans = plan_files(config)
    queries = np.random.default_rng(1).standard_normal((n_queries, DIM)).astype(np.float32)
    ours, theirs, search_only = [], [], []
    for _ in range(repeat):
        start = time.perf_counter()
        top_k(config, spans, queries)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        column = pq.read_table(out, columns=["embedding"])["embedding"].combine_chunks()
        corpus = torch.from_numpy(column.flatten().to_numpy().reshape(-1, DIM))
        read = time.perf_counter()
        semantic_search(torch.from_numpy(queries), corpus, top_k=k)
        theirs.append(time.perf_counter() - start)
        search_only.append(time.perf_counter() - read)
    return {"embedpipe_read_and_score_s": round(min(ours), 3), "st_read_and_search_s": round(min(theirs), 3),
            "st_search_only_s": round(min(search_only), 3), "ratio": round(min(theirs) / min(ours), 3),
            "ratio_to_search_only": round(min(search_only) / min(ours), 3), "passes": repeat}


def real_output_of_random_vectors(out: str, n: int, work: str, env: dict) -> None:
    """A real embed output (see the module's docstring) holding n random unit vectors."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = os.path.join(work, "docs.txt")
    with open(os.path.join(REPO, "data", "sample", "en.txt"), encoding="utf-8") as src, open(docs, "w") as dst:
        dst.writelines(line for _, line in zip(range(200), src))
    run([sys.executable, "-m", "pipeline", "embed", "--input", docs, "--output", out, "--quiet"], env)
    (made,) = [name for name in os.listdir(out) if name.endswith(".parquet")]
    metadata = pq.read_schema(os.path.join(out, made)).metadata  # the run's settings and embedpipe's statistics
    os.remove(os.path.join(out, made))
    rng = np.random.default_rng(0)
    files = []
    for k, start in enumerate(range(0, n, FILE_ROWS)):
        rows = min(FILE_ROWS, n - start)
        vectors = rng.standard_normal((rows, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        table = pa.table({"id": [f"v{i}" for i in range(start, start + rows)],
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM)})
        name = f"random-{k:03d}.parquet"
        pq.write_table(table.replace_schema_metadata(metadata), os.path.join(out, name), compression="zstd")
        files.append({"file": name, "rows": rows})
    path = os.path.join(out, "_manifest.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest.update(files=files, rows={**manifest["rows"], "documents": n, "embedded": n})
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)


def query_texts(n: int) -> list[str]:
    try:
        sys.path.insert(0, os.path.join(REPO, "data"))
        from fortunes import english_corpus

        texts = english_corpus()
    except OSError:  # no fortunes installed
        with open(os.path.join(REPO, "data", "sample", "en.txt"), encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    texts = [" ".join(t.split()) for t in texts][:n]
    if len(texts) < n:
        sys.exit(f"only {len(texts)} query texts; install fortunes (apt-get install fortunes fortunes-min)")
    return texts


def compare(ours_path: str, theirs_path: str) -> dict:
    """Rank by rank: the same ids, except where semantic_search's scores tie within 1e-5."""
    import pyarrow.parquet as pq

    ours, theirs = pq.read_table(ours_path).to_pylist(), pq.read_table(theirs_path).to_pylist()
    assert len(ours) == len(theirs)
    differing, worst = set(), 0.0
    for a, b in zip(ours, theirs):
        worst = max(worst, abs(a["score"] - b["score"]))
        if (a["query_id"], a["rank"]) != (b["query_id"], b["rank"]) or (a["id"] != b["id"] and abs(a["score"] - b["score"]) > 1e-5):
            differing.add(a["query_id"])
    ids_equal = sum(a["id"] == b["id"] for a, b in zip(ours, theirs))
    return {"hits": len(ours), "hits_with_the_same_id": ids_equal, "queries_differing": len(differing),
            "max_score_diff": worst}


def commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=REPO)
    return proc.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_flags() -> dict:
    """lscpu's model name, and which of the vector extensions that matter for a float32 product it lists."""
    proc = subprocess.run(["lscpu"], capture_output=True, text=True)
    fields = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {"model_name": fields.get("Model name", "").strip(),
            **{flag: flag in flags for flag in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")}}
