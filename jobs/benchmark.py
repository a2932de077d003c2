"""Benchmarks against sentence-transformers, same machine, same run.

embed (default): `embedpipe embed` (whole command) against a plain
sentence-transformers script (jobs/st_baseline.py, whole script), same texts, same model.

    python jobs/benchmark.py [--docs 10000] [--input FILE.txt] [--device cpu|cuda] [--repeat 1]
           [--embed-args "--max-batch-tokens 8192" | --variants "" "--dtype int8" ...] [--cache warm|cold]
           [--st-variants "" "--dtype float16 --batch-size 256"] [--markdown]

scale: `embedpipe embed` with a tiny random model (2 layers, hidden 32) on N synthetic
documents, sampling the proportional memory (PSS) of the whole process tree (driver, Ray's
daemons, every worker) twice a second; reports the peak and the plumbing throughput.

    python jobs/benchmark.py --task scale [--scale-docs 100000 1000000]

fidelity: what `--dtype int8` costs. Encodes with the stages every actor runs, float32
and int8, and reports cosine between the two (WordNet glosses and fortunes) and Spearman's
correlation with the gold scores of a similarity task built from WordNet (jobs/wordnet_pairs.py).

    python jobs/benchmark.py --task fidelity [--pairs 2000]

mine: `embedpipe mine` (whole command) against paraphrase_mining_embeddings in one
process (jobs/st_mine_baseline.py) on N x D clustered random vectors; checks the pairs agree.

    python jobs/benchmark.py --task mine [--vectors 50000] [--dim 384] [--top-k 100] [--max-pairs 500000]

host: the pipeline's own host work, with a near-zero-cost model on --lines short fortune lines,
against the same model in a sentence-transformers script (jobs/bench_host.py).

    python jobs/benchmark.py --task host [--lines 1000000] [--repeat 1] [--variants "" "--flag ..."]

precision: what each --precision and --truncate-dim keeps (Spearman on the WordNet task, recall@10
against float32, bytes) and what binary and int8 cost to write against float32 (jobs/bench_precision.py).

    python jobs/benchmark.py --task precision [--pairs 2000] [--lines 200000] [--repeat 1]

search: `embedpipe search` (whole command) of 1,000 queries over 100,000 vectors against
encode_query + util.semantic_search in one process (jobs/st_search_baseline.py), and the scoring alone
against semantic_search alone; checks the hits agree (jobs/bench_search.py).

    python jobs/benchmark.py --task search [--search-vectors 100000] [--search-queries 1000] [--top-k-search 10] [--repeat 1]

rerank: `embedpipe rerank` (whole command) against CrossEncoder.predict in one process
(jobs/st_rerank_baseline.py) on N random pairs of the corpus's texts; checks the scores agree.
The cross-encoder is all-MiniLM-L6-v2's BERT with a new one-label classification head (seed 0):
real size, real compute, meaningless scores (no cross-encoder weights ship with the project).

    python jobs/benchmark.py --task rerank [--pairs 2000] [--docs 10000] [--device cpu|cuda] [--rerank-args "..."]

Default corpus: the first N distinct English texts of Debian's `fortunes`
packages (`apt-get install fortunes fortunes-min`). Checks that the vectors
agree (cosine >= 0.9999) and prints documents/s, tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, {gpu}"


def corpus(args, workdir: str) -> str:
    path = os.path.join(workdir, "docs.txt")
    if args.input:
        with open(args.input, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()][: args.docs]
    else:
        sys.path.insert(0, os.path.join(REPO, "data"))
        from fortunes import english_corpus

        texts = english_corpus()[: args.docs]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(" ".join(t.split()) + "\n" for t in texts)
    return path


def timed(cmd: list[str], cache: str | None = None) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    if cache is not None:
        env["EMBEDPIPE_CACHE"] = cache
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=10_000)
    p.add_argument("--input")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1, help="alternate the two commands this many times; best of each")
    p.add_argument("--embed-args", default="", help="extra flags for embedpipe embed")
    p.add_argument("--cache", choices=("warm", "cold"), default="warm",
                   help="warm: embedpipe's cache (the model's description, the int8 graph) is filled by an untimed "
                        "20-document run of each variant first, as on any run after a model's first; "
                        "cold: every timed run starts from an empty cache, as a model's first run does")
    p.add_argument("--variants", nargs="+", metavar="FLAGS",
                   help="several embedpipe flag sets (e.g. '' '--dtype int8'), each timed against the same baseline runs")
    p.add_argument("--st-variants", nargs="+", metavar="FLAGS",
                   help="several jobs/st_baseline.py flag sets (e.g. '' '--dtype float16 --batch-size 256'); "
                        "the first one's vectors are the reference")
    p.add_argument("--markdown", action="store_true", help="also print a BENCHMARKS.md table row")
    p.add_argument("--task", choices=("embed", "mine", "scale", "fidelity", "rerank", "host", "precision", "search"),
                   default="embed")
    p.add_argument("--pairs", type=int, default=2000, help="similarity pairs for --task fidelity, pairs to score for --task rerank")
    p.add_argument("--rerank-args", default="", help="extra flags for embedpipe rerank")
    p.add_argument("--scale-docs", type=int, nargs="+", default=[100_000, 1_000_000], help="corpus sizes for --task scale")
    p.add_argument("--lines", type=int, default=1_000_000, help="short lines for --task host")
    p.add_argument("--vectors", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--max-pairs", type=int, default=500_000)
    p.add_argument("--mine-args", default="", help="extra flags for embedpipe mine")
    p.add_argument("--search-vectors", type=int, default=100_000, help="vectors searched by --task search")
    p.add_argument("--search-queries", type=int, default=1000, help="queries of --task search")
    p.add_argument("--top-k-search", type=int, default=10, help="top_k of --task search")
    args = p.parse_args()
    if args.task == "mine":
        return bench_mine(args)
    if args.task == "scale":
        return bench_scale(args)
    if args.task == "fidelity":
        return bench_fidelity(args)
    if args.task == "rerank":
        return bench_rerank(args)
    if args.task == "precision":
        from jobs.bench_precision import bench_precision

        return bench_precision(args)
    if args.task == "search":
        from jobs.bench_search import bench_search

        bench_search(args)
        return
    if args.task == "host":
        from jobs.bench_host import bench_host

        bench_host(args)
        return

    import numpy as np
    import pyarrow.parquet as pq

    from pipeline import read_embeddings

    with tempfile.TemporaryDirectory() as work:
        docs = corpus(args, work)
        n = sum(1 for _ in open(docs, encoding="utf-8"))
        variants = args.variants if args.variants is not None else [args.embed_args]
        st_variants = args.st_variants or [""]
        st_outs = [os.path.join(work, f"st-{k}.parquet") for k in range(len(st_variants))]
        st_cmds = [[sys.executable, os.path.join(REPO, "jobs", "st_baseline.py"), docs, out, "--model", args.model,
                    "--device", args.device, *shlex.split(flags)] for out, flags in zip(st_outs, st_variants)]
        ours: dict[str, list[float]] = {v: [] for v in variants}
        theirs: dict[str, list[float]] = {v: [] for v in st_variants}
        warm = os.path.join(work, "cache")
        if args.cache == "warm":
            few = os.path.join(work, "few.txt")
            with open(docs, encoding="utf-8") as src, open(few, "w", encoding="utf-8") as dst:
                dst.writelines(line for _, line in zip(range(20), src))
            for v in variants:
                timed(embed_command(args, few, os.path.join(work, "warm-up"), v), warm)

        def cache_for_run() -> str:
            return warm if args.cache == "warm" else tempfile.mkdtemp(dir=work, prefix="cold-cache-")

        for _ in range(args.repeat):  # alternated, so a busy spell of the machine hits both sides
            for v, cmd in zip(st_variants, st_cmds):
                theirs[v].append(timed(cmd))
            for v in variants:
                out = os.path.join(work, f"out-{variants.index(v)}")
                ours[v].append(timed(embed_command(args, docs, out, v), cache_for_run()))
        ref = pq.read_table(st_outs[0])  # the first baseline's vectors are the reference (float32 by default)
        ref_vectors = np.asarray(ref["embedding"].combine_chunks().flatten().to_numpy(), np.float32).reshape(len(ref), -1)
        ref_index = {i: k for k, i in enumerate(ref["id"].to_pylist())}
        results = []
        for k, v in enumerate(variants):
            out = os.path.join(work, f"out-{k}")
            ids, vectors = read_embeddings(out)
            ref_v = ref_vectors[[ref_index[i] for i in ids]]
            cos = (vectors * ref_v).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(ref_v, axis=1))
            manifest = json.load(open(os.path.join(out, "_manifest.json")))
            tokens = manifest["rows"]["tokens"]
            best_ours = min(ours[v])
            for sv in st_variants:
                best_theirs = min(theirs[sv])
                results.append({
                    "date": dt.date.today().isoformat(),
                    "machine": machine(),
                    "docs": n,
                    "tokens": tokens,
                    "embed_args": v,
                    "st_args": sv,
                    "cache": args.cache,
                    "dtype": manifest.get("dtype"),
                    "embedpipe_seconds": round(best_ours, 2),
                    "st_seconds": round(best_theirs, 2),
                    "embedpipe_docs_per_s": round(n / best_ours, 1),
                    "st_docs_per_s": round(n / best_theirs, 1),
                    "embedpipe_tokens_per_s": round(tokens / best_ours, 1),
                    "encode_docs_per_s": encode_rate(manifest),
                    "ratio": round(best_theirs / best_ours, 3),
                    "mean_cosine": round(float(cos.mean()), 6),
                    "min_cosine": round(float(cos.min()), 6),
                    "all_runs": {"embedpipe": [round(x, 2) for x in ours[v]],
                                 "sentence_transformers": [round(x, 2) for x in theirs[sv]]},
                    "stages": manifest["timings"].get("stages"),
                })
    print(json.dumps(results, indent=2))
    for r in results:
        if args.markdown:
            print(
                f"| {r['date']} | {n:,} | {args.device} | {r['embedpipe_docs_per_s']:,} | "
                f"{r['st_docs_per_s']:,} | **{r['ratio']}x** | {r['mean_cosine']:.6f} / {r['min_cosine']:.6f} | "
                f"{r['embed_args'] or '-'} ({r['cache']} cache) | {r['st_args'] or '-'} |"
            )
    # float32 must reproduce the reference; float16/bfloat16/int8 report their cosine instead
    exact = [r for r in results if r["dtype"] == "float32"]
    if any(r["min_cosine"] < 0.9999 for r in exact):
        sys.exit("vectors disagree: min cosine < 0.9999 for a float32 run")


def encode_rate(manifest: dict) -> float | None:
    """Documents per second while the encoders ran: rows over the span from the first encode
    step's start to the last one's end (the steady state, without start-up and teardown)."""
    span = (manifest["timings"].get("stages") or {}).get("encode.encoding")
    if not span:
        return None
    span = span["last_s"] - span["first_s"]
    return round(manifest["rows"]["embedded"] / span, 1) if span > 0 else None


def embed_command(args, docs: str, out: str, flags: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "embed", "--input", docs, "--output", out, "--model", args.model,
            "--device", args.device, "--overwrite", "--quiet", *shlex.split(flags)]


def bench_mine(args) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.vectors // 20, args.dim))
    vectors = (centres[rng.integers(0, len(centres), args.vectors)] + 0.3 * rng.standard_normal((args.vectors, args.dim)))
    vectors = vectors.astype(np.float32)
    with tempfile.TemporaryDirectory() as work:
        emb = os.path.join(work, "emb")
        os.makedirs(emb)
        for k, start in enumerate(range(0, args.vectors, 10_000)):
            part = vectors[start : start + 10_000]
            flat = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), args.dim)
            ids = [f"v{i}" for i in range(start, start + len(part))]
            pq.write_table(pa.table({"id": ids, "embedding": flat}), os.path.join(emb, f"part-{k:03d}.parquet"))
        ours_out, st_out = os.path.join(work, "pairs"), os.path.join(work, "st.parquet")
        mine_cmd = [sys.executable, "-m", "pipeline", "mine", "--embeddings", emb, "--output", ours_out, "--quiet",
                    "--top-k", str(args.top_k), "--max-pairs", str(args.max_pairs), *shlex.split(args.mine_args)]
        st_cmd = [sys.executable, os.path.join(REPO, "jobs", "st_mine_baseline.py"), emb, st_out,
                  "--top-k", str(args.top_k), "--max-pairs", str(args.max_pairs)]
        ours, theirs, st_inner = [], [], []
        for _ in range(args.repeat):
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
            start = time.perf_counter()
            proc = subprocess.run(st_cmd, capture_output=True, text=True, env=env, cwd=REPO)
            theirs.append(time.perf_counter() - start)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            st_inner.append(float(proc.stdout.strip().splitlines()[-1]))
            ours.append(timed(mine_cmd))
        a, b = pq.read_table(os.path.join(ours_out, "pairs.parquet")), pq.read_table(st_out)
        got = {frozenset(p): s for p, s in zip(zip(a["id_a"].to_pylist(), a["id_b"].to_pylist()), a["score"].to_pylist())}
        ref = {frozenset(p): s for p, s in zip(zip(b["id_a"].to_pylist(), b["id_b"].to_pylist()), b["score"].to_pylist())}
    common = set(got) & set(ref)
    result = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "vectors": args.vectors,
        "dim": args.dim,
        "top_k": args.top_k,
        "max_pairs": args.max_pairs,
        "embedpipe_mine_seconds": round(min(ours), 2),
        "st_script_seconds": round(min(theirs), 2),
        "st_function_seconds": round(min(st_inner), 2),
        "ratio_to_st_script": round(min(ours) / min(theirs), 3),
        "ratio_to_st_function": round(min(ours) / min(st_inner), 3),
        "pairs": len(got),
        "pairs_in_common": len(common),
        "max_score_diff": max((abs(got[p] - ref[p]) for p in common), default=0.0),
        "mine_args": args.mine_args,
    }
    print(json.dumps(result, indent=2))


def bench_fidelity(args) -> None:
    import numpy as np
    import pyarrow as pa
    from scipy.stats import spearmanr

    sys.path.insert(0, os.path.join(REPO, "data"))
    sys.path.insert(0, os.path.join(REPO, "jobs"))
    from fortunes import english_corpus
    from wordnet_pairs import pairs

    from pipeline import EmbedConfig
    from pipeline.stages.encode import EncodeStage
    from pipeline.models.loading import describe_model, load_model
    from pipeline.models.onnx_graph import graph_for
    from pipeline.stages.tokenize import TokenizeStage

    triples = pairs(args.pairs)
    glosses = sorted({t for a, b, _ in triples for t in (a, b)})
    fortunes = english_corpus()[: args.docs]
    base = EmbedConfig(input="x", output="y", model=args.model)
    int8 = EmbedConfig(input="x", output="y", model=args.model, dtype="int8")
    fingerprint = describe_model(load_model(base, weights=False), base).fingerprint
    tokenizer = TokenizeStage(base)
    # float32: the plain PyTorch path, the reference; onnx_float32: the default CPU path's graph
    stages = {
        "float32": EncodeStage(base, "cpu", 1),
        "onnx_float32": EncodeStage(base, "cpu", 1, None, graph_for(base, fingerprint, required=True)),
        "int8": EncodeStage(int8, "cpu", 1, None, graph_for(int8, fingerprint, required=True)),
    }

    def encode(stage, texts):
        batch = pa.table({"id": [str(i) for i in range(len(texts))], "text": texts, "_valid": [True] * len(texts)})
        out = stage(tokenizer(batch))
        order = np.argsort(np.asarray(out["id"].to_pylist(), dtype=np.int64))
        flat = out["embedding"].combine_chunks().flatten().to_numpy()
        return np.asarray(flat, np.float32).reshape(len(texts), -1)[order]

    result = {"date": dt.date.today().isoformat(), "machine": machine(), "model": args.model, "pairs": len(triples)}
    vectors, seconds = {}, {}
    for name, stage in stages.items():
        start = time.process_time()
        vectors[name] = {"glosses": encode(stage, glosses), "fortunes": encode(stage, fortunes)}
        seconds[name] = time.process_time() - start
    index = {t: i for i, t in enumerate(glosses)}
    gold = [g for _, _, g in triples]
    for name, v in vectors.items():
        unit = v["glosses"] / np.linalg.norm(v["glosses"], axis=1, keepdims=True)
        cos = [float(unit[index[a]] @ unit[index[b]]) for a, b, _ in triples]
        result[f"spearman_{name}"] = round(float(spearmanr(cos, gold).statistic), 4)
    result["spearman_change"] = round(result["spearman_int8"] - result["spearman_float32"], 4)
    for name in ("int8", "onnx_float32"):
        for corpus in ("glosses", "fortunes"):
            a, b = vectors["float32"][corpus], vectors[name][corpus]
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            result[f"cosine_{name}_to_float32_{corpus}"] = {
                "mean": round(float(cos.mean()), 7), "min": round(float(cos.min()), 7), "n": len(cos),
            }
    result["encode_cpu_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    result["int8_speedup_cpu_time"] = round(seconds["float32"] / seconds["int8"], 2)
    result["onnx_float32_speedup_cpu_time"] = round(seconds["float32"] / seconds["onnx_float32"], 2)
    print(json.dumps(result, indent=2))


def minilm_cross_encoder(path: str) -> str:
    """all-MiniLM-L6-v2's BERT with a new one-label classification head (seed 0), saved as a CrossEncoder directory."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertForSequenceClassification

    from pipeline.models.loading import resolve_model_path

    torch.manual_seed(0)
    base, hf = resolve_model_path("all-MiniLM-L6-v2"), os.path.join(path, "hf")
    BertForSequenceClassification.from_pretrained(base, num_labels=1).eval().save_pretrained(hf)
    AutoTokenizer.from_pretrained(base).save_pretrained(hf)
    CrossEncoder(hf, device="cpu").save_pretrained(os.path.join(path, "ce"))
    return os.path.join(path, "ce")


def bench_rerank(args) -> None:
    """`embedpipe rerank` (whole command) against CrossEncoder.predict (one process), same pairs, same run."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as work:
        docs = corpus(args, work)
        n = sum(1 for _ in open(docs, encoding="utf-8"))
        model = minilm_cross_encoder(os.path.join(work, "model"))
        rng = np.random.default_rng(0)
        pairs_dir = os.path.join(work, "pairs")
        os.makedirs(pairs_dir)
        a, b = rng.integers(0, n, args.pairs), rng.integers(0, n - 1, args.pairs)
        b = b + (b >= a)  # never a text with itself
        name = os.path.basename(docs)
        pq.write_table(pa.table({
            "id_a": [f"{name}:{i}" for i in a], "id_b": [f"{name}:{j}" for j in b],
            "score": pa.array(np.sort(rng.random(args.pairs))[::-1], pa.float32()),
        }), os.path.join(pairs_dir, "pairs.parquet"))
        ours_out, st_out = os.path.join(work, "reranked"), os.path.join(work, "st.parquet")
        ours_cmd = [sys.executable, "-m", "pipeline", "rerank", "--pairs", pairs_dir, "--texts", docs, "--model", model,
                    "--output", ours_out, "--device", args.device, "--overwrite", "--quiet", *shlex.split(args.rerank_args)]
        st_cmd = [sys.executable, os.path.join(REPO, "jobs", "st_rerank_baseline.py"), os.path.join(pairs_dir, "pairs.parquet"),
                  docs, model, st_out, "--device", args.device]
        ours, theirs, st_predict = [], [], []
        for _ in range(args.repeat):  # alternated, so a busy spell of the machine hits both sides
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
            start = time.perf_counter()
            proc = subprocess.run(st_cmd, capture_output=True, text=True, env=env, cwd=REPO)
            theirs.append(time.perf_counter() - start)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            st_predict.append(float(proc.stdout.strip().splitlines()[-1]))
            ours.append(timed(ours_cmd))
        got, ref = pq.read_table(os.path.join(ours_out, "pairs.parquet")), pq.read_table(st_out)
        manifest = json.load(open(os.path.join(ours_out, "_manifest.json")))
    key = lambda t: list(zip(t["id_a"].to_pylist(), t["id_b"].to_pylist()))  # noqa: E731
    ref_scores = dict(zip(key(ref), ref["rerank_score"].to_pylist()))
    diff = max(abs(s - ref_scores[p]) for p, s in zip(key(got), got["rerank_score"].to_pylist()))
    best_ours, best_theirs, best_predict = min(ours), min(theirs), min(st_predict)
    result = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "device": args.device,
        "pairs": args.pairs,
        "texts": n,
        "tokens": manifest["counts"]["tokens"],
        "embedpipe_rerank_seconds": round(best_ours, 2),
        "st_script_seconds": round(best_theirs, 2),
        "st_predict_seconds": round(best_predict, 2),
        "embedpipe_pairs_per_s": round(args.pairs / best_ours, 1),
        "st_script_pairs_per_s": round(args.pairs / best_theirs, 1),
        "st_predict_pairs_per_s": round(args.pairs / best_predict, 1),
        "ratio_to_st_script": round(best_theirs / best_ours, 3),
        "ratio_to_st_predict": round(best_predict / best_ours, 3),
        "max_abs_score_diff": float(diff),
        "pairs_checked": got.num_rows,
        "embedpipe_phases": {k: manifest["timings"][k] for k in ("join_s", "score_s")},
        "rerank_args": args.rerank_args,
        "all_runs": {"embedpipe": [round(x, 2) for x in ours], "st_script": [round(x, 2) for x in theirs],
                     "st_predict": [round(x, 2) for x in st_predict]},
    }
    print(json.dumps(result, indent=2))
    if args.markdown:
        print(f"| {result['date']} | {args.pairs:,} | {args.device} | {result['embedpipe_pairs_per_s']:,} | "
              f"{result['st_script_pairs_per_s']:,} ({result['st_predict_pairs_per_s']:,} in predict) | "
              f"**{result['ratio_to_st_script']}x** | {diff:.1e} | {args.rerank_args or '-'} |")
    if got.num_rows != args.pairs or diff > 1e-4:
        sys.exit(f"scores disagree: {got.num_rows} pairs, max abs difference {diff:.2e}")


def tiny_model(path: str) -> str:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer, mean pooling: the pipeline's cost, not the model's."""
    from jobs.bench_host import random_bert

    return random_bert(path, hidden=32, layers=2, heads=4, intermediate=64, max_positions=128, max_seq_length=128)


def tree_pss(root_pid: int) -> tuple[int, dict[str, int]]:
    """Proportional set size of a process and all its descendants (shared pages counted once
    overall), in total and by kind of process (the driver, each Ray daemon, each actor class)."""
    import psutil

    total, by_kind = 0, {}
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, {}
    for proc in procs:
        try:
            pss = proc.memory_full_info().pss
            kind = "driver" if proc.pid == root_pid else process_kind(proc.cmdline(), proc.name())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += pss
        by_kind[kind] = by_kind.get(kind, 0) + pss
    return total, by_kind


def process_kind(cmdline: list[str], name: str) -> str:
    """'raylet', 'gcs_server', 'ray::MapWorker(...)', 'ray::IDLE', a Ray script's file name, ..."""
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split(" ")[0]
    if "-m" in cmdline[1:-1]:
        return cmdline[cmdline.index("-m") + 1]
    script = next((os.path.basename(a) for a in cmdline[1:3] if a.endswith(".py")), None)
    return script or name


def bench_scale(args) -> None:
    """Peak memory of the whole process tree and plumbing throughput, for each corpus size."""
    import threading

    sys.path.insert(0, os.path.join(REPO, "data"))
    from fortunes import english_corpus

    texts = [" ".join(t.split()) for t in english_corpus()]
    results = []
    with tempfile.TemporaryDirectory() as work:
        model = tiny_model(os.path.join(work, "model"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", "EMBEDPIPE_CACHE": os.path.join(work, "cache")}
        warmup = os.path.join(work, "warmup.txt")  # an untimed run fills the cache (description, ONNX graph)
        with open(warmup, "w", encoding="utf-8") as f:
            f.writelines(f"{t}\n" for t in texts[:200])
        subprocess.run([sys.executable, "-m", "pipeline", "embed", "--input", warmup, "--output",
                        os.path.join(work, "out-warmup"), "--model", model, "--quiet", *shlex.split(args.embed_args)],
                       env=env, cwd=REPO, check=True, capture_output=True)
        for n in args.scale_docs:
            src = os.path.join(work, f"in-{n}")
            os.makedirs(src)
            per_shard = 50_000
            for k, start in enumerate(range(0, n, per_shard)):
                with open(os.path.join(src, f"part-{k:04d}.txt"), "w", encoding="utf-8") as f:
                    f.writelines(f"{texts[i % len(texts)]} #{i}\n" for i in range(start, min(n, start + per_shard)))
            out = os.path.join(work, f"out-{n}")
            cmd = [sys.executable, "-m", "pipeline", "embed", "--input", src, "--output", out, "--model", model,
                   "--quiet", *shlex.split(args.embed_args)]
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            samples: list[tuple[float, int]] = []
            at_peak: dict[str, int] = {}

            def sample() -> None:
                while proc.poll() is None:
                    total, by_kind = tree_pss(proc.pid)
                    if total > max((b for _, b in samples), default=0):
                        at_peak.clear()
                        at_peak.update(by_kind)
                    samples.append((time.perf_counter() - start, total))
                    time.sleep(0.5)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            _, err = proc.communicate()
            seconds = time.perf_counter() - start
            sampler.join()
            if proc.returncode:
                sys.exit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
            manifest = json.load(open(os.path.join(out, "_manifest.json")))
            peak = max(b for _, b in samples)
            half = [b for t, b in samples if t >= seconds / 2]
            results.append({
                "docs": n,
                "embedded": manifest["rows"]["embedded"],
                "seconds": round(seconds, 1),
                "docs_per_s": round(n / seconds, 1),
                "peak_tree_pss_mib": round(peak / 2**20, 1),
                "peak_second_half_mib": round(max(half) / 2**20, 1) if half else None,
                "samples": len(samples),
                "at_peak_mib": {k: round(v / 2**20, 1) for k, v in sorted(at_peak.items(), key=lambda kv: -kv[1])},
            })
            print(json.dumps(results[-1]), flush=True)
            shutil.rmtree(src)
            shutil.rmtree(out)
    if len(results) > 1:
        print(json.dumps({"date": dt.date.today().isoformat(), "machine": machine(),
                          "peak_ratio_last_to_first": round(results[-1]["peak_tree_pss_mib"] / results[0]["peak_tree_pss_mib"], 3)}))


if __name__ == "__main__":
    main()
