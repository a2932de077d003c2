"""The host benchmark (`python jobs/benchmark.py --task host`): what the pipeline's own host
work costs, measured on CPU with a model that costs almost nothing.

The model is a one-layer BERT 16 wide with MiniLM's tokenizer, mean pooling, a Dense layer to
384 and Normalize (built here, seed 0): its forward pass is a few microseconds a row, so a run
costs what the chain around it costs (reading, tokenising, batching, moving blocks between
processes, building and writing Parquet). On a GPU that host work is what bounds a small model.

The corpus is Debian's fortunes split into lines (48,230 distinct lines of ~48 characters),
repeated with a pass number appended (" (2)", " (3)", ...) until there are --lines of them, all
distinct. Both sides run as whole commands, alternated:

    embedpipe embed --input lines.txt --model <the model> --device D [--embed-args]
    jobs/st_baseline.py lines.txt out.parquet --model <the model> --device D --batch-size 256

(--device cpu by default: what the host path costs where no GPU is lent.)

Reported: the whole-command ratio; embedpipe's steady state (rows over the span from the first
vector's micro-batch to the last) and its fixed cost (the time before the first vector and after
the last); from the manifest, host microseconds per row of each stage (busy seconds / rows:
read, tokenize, encoder host work = the encoder's busy time minus its time inside the model
call, write), as CPU time of the threads doing it and as wall-clock time.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORTUNE_DIR = "/usr/share/games/fortunes"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def fortune_lines(n: int, root: str = FORTUNE_DIR) -> list[str]:
    """n distinct short lines: the English fortunes' distinct lines, then again with " (k)" appended."""
    names = sorted(
        f for f in os.listdir(root)
        if os.path.isfile(os.path.join(root, f)) and "." not in f and f not in ("chinese", "tang300", "song100")
    )
    seen: set[str] = set()
    base: list[str] = []
    for name in names:
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            for line in f:
                text = " ".join(ANSI.sub("", line).split())
                if text and text != "%" and text not in seen:
                    seen.add(text)
                    base.append(text)
    out = base[:n]
    k = 2
    while len(out) < n:
        out.extend(f"{t} ({k})" for t in base[: n - len(out)])
        k += 1
    return out


def near_zero_model(path: str) -> str:
    """A one-layer, 16-wide BERT (MiniLM's tokenizer), mean pooling, Dense 16 -> 384, Normalize."""
    import torch
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    return random_bert(path, hidden=16, layers=1, heads=1, intermediate=16, max_positions=512, max_seq_length=256,
                       after=lambda: [Dense(16, 384, activation_function=torch.nn.Identity()), Normalize()])


def random_bert(path: str, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int,
                max_seq_length: int, after=None) -> str:
    """A random BERT (seed 0) with MiniLM's tokenizer and mean pooling, then the modules `after()`
    makes (made after the BERT, so the seed fixes them too), saved as a sentence-transformers
    directory under `path`; returns that directory."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.models.loading import resolve_model_path

    torch.manual_seed(0)
    base = os.path.join(path, "hf")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=max_positions)
    BertModel(config).eval().save_pretrained(base)
    tokenizer.save_pretrained(base)
    modules = [Transformer(base, max_seq_length=max_seq_length), Pooling(hidden, pooling_mode="mean"), *(after() if after else [])]
    SentenceTransformer(modules=modules, device="cpu").save(os.path.join(path, "st"))
    return os.path.join(path, "st")


def run_tree(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(started, ended, wall seconds) of one command."""
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    ended = time.time()
    if proc.returncode != 0:
        sys.exit(f"failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    return started, ended, wall


def stage_costs(manifest: dict, rows: int, key: str = "cpu_s") -> dict[str, float]:
    """Microseconds per row of each stage, from the manifest: CPU time of the threads that did the
    work (`cpu_s`, what the work costs whatever else shares the cores) or wall-clock time (`busy_s`,
    longer where processes wait for the 2 cores)."""
    stages = manifest["timings"].get("stages") or {}

    def spent(name: str) -> float:
        return float((stages.get(name) or {}).get(key, 0.0))

    per_row = 1e6 / max(rows, 1)
    return {
        "read": round(spent("read.reading") * per_row, 1),
        "tokenize": round(spent("tokenize.tokenizing") * per_row, 1),
        "encoder_host": round((spent("encode.encoding") - spent("encode.model")) * per_row, 1),
        "model_call": round(spent("encode.model") * per_row, 1),
        "write": round((spent("write.writing") + spent("write.joining")) * per_row, 1),
    }


def bench_host(args) -> list[dict]:
    import numpy as np
    import pyarrow.parquet as pq

    sys.path.insert(0, REPO)
    from jobs.benchmark import machine
    from pipeline import read_embeddings

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    with tempfile.TemporaryDirectory() as work:
        model = near_zero_model(os.path.join(work, "model"))
        lines = fortune_lines(args.lines)
        docs = os.path.join(work, "lines.txt")
        with open(docs, "w", encoding="utf-8") as f:
            f.writelines(t + "\n" for t in lines)
        env["EMBEDPIPE_CACHE"] = os.path.join(work, "cache")
        variants = args.variants if args.variants is not None else [args.embed_args]
        few = os.path.join(work, "few.txt")
        with open(few, "w", encoding="utf-8") as f:
            f.writelines(t + "\n" for t in lines[:20])
        for v in variants:  # the model's description and graph are cached, as on any run after a model's first
            run_tree(_embed(few, os.path.join(work, "warm"), model, v, args.device), env)
        st_out = os.path.join(work, "st.parquet")
        st_cmd = [sys.executable, os.path.join(REPO, "jobs", "st_baseline.py"), docs, st_out, "--model", model,
                  "--device", args.device, "--batch-size", "256"]
        theirs, ours = [], {v: [] for v in variants}
        for _ in range(args.repeat):
            theirs.append(run_tree(st_cmd, env))
            for k, v in enumerate(variants):
                out = os.path.join(work, f"out-{k}")
                runs = run_tree(_embed(docs, out, model, v, args.device), env)
                ours[v].append((runs, json.load(open(os.path.join(out, "_manifest.json")))))
        ref = pq.read_table(st_out)
        ref_vectors = np.asarray(ref["embedding"].combine_chunks().flatten().to_numpy(), np.float32).reshape(len(ref), -1)
        ref_index = {i: k for k, i in enumerate(ref["id"].to_pylist())}
        best_st = min(theirs, key=lambda r: r[2])
        results = []
        for k, v in enumerate(variants):
            ids, vectors = read_embeddings(os.path.join(work, f"out-{k}"))
            cos = (vectors * ref_vectors[[ref_index[i] for i in ids]]).sum(1)  # both normalised
            (started, ended, wall), manifest = min(ours[v], key=lambda r: r[0][2])
            stages = manifest["timings"]["stages"]
            span = stages["encode.encoding"]
            origin = stages["origin_unix"]
            first_vector, last_vector = origin + span["first_s"], origin + span["last_s"]
            n = manifest["rows"]["documents"]
            results.append({
                "machine": machine(),
                "lines": n,
                "embed_args": v,
                "embedpipe_seconds": round(wall, 2),
                "st_seconds": round(best_st[2], 2),
                "ratio": round(best_st[2] / wall, 3),
                "embedpipe_rows_per_s": round(n / wall, 1),
                "st_rows_per_s": round(n / best_st[2], 1),
                "steady_rows_per_s": round(n / max(last_vector - first_vector, 1e-9), 1),
                "fixed_cost_s": {"before_first_vector": round(first_vector - started, 2),
                                 "after_last_vector": round(ended - last_vector, 2)},
                "host_cpu_us_per_row": stage_costs(manifest, n),
                "wall_us_per_row": stage_costs(manifest, n, "busy_s"),
                "min_cosine": round(float(cos.min()), 6),
                "all_runs": {"embedpipe": [round(r[0][2], 2) for r in ours[v]],
                             "sentence_transformers": [round(r[2], 2) for r in theirs]},
                "stages": stages,
            })
    print(json.dumps(results, indent=2))
    if any(r["min_cosine"] < 0.99999 for r in results):
        sys.exit("vectors disagree: min cosine < 0.99999")
    return results


def _embed(docs: str, out: str, model: str, flags: str, device: str = "cpu") -> list[str]:
    return [sys.executable, "-m", "pipeline", "embed", "--input", docs, "--output", out, "--model", model,
            "--device", device, "--overwrite", "--quiet", *shlex.split(flags)]
