"""The compact-vectors benchmark (`python jobs/benchmark.py --task precision`): what each
`--precision` (and `--truncate-dim`) keeps, and what it costs to write.

Quality: the whole `embedpipe embed` command on the glosses of the WordNet similarity task
(jobs/wordnet_pairs.py: --pairs pairs of noun definitions with Wu-Palmer gold scores), once per
variant, with the real default model. Each output is read back as `embedpipe mine` reads it
(`read_embeddings(dequantize=True)`: int8/uint8 bucket centres, binary as +1/-1) and scored:

- `spearman_gold`: Spearman's correlation of the pairs' cosines with the gold scores (float32's is
  the reference), and `kept` = that correlation over float32's;
- `spearman_to_float32`: the correlation of the pairs' cosines with float32's cosines;
- `recall_at_10`: for every gloss as a query, the share of its 10 nearest glosses under float32
  that the variant finds among its own 10 nearest (queries read back as the documents are);
- `bytes_per_vector` (manifest) and the output's Parquet bytes on disk.

Cost: the near-zero-cost model of the host benchmark (jobs/bench_host.py) on --lines short
fortune lines, float32 against binary and int8 (ranges from sampled rows), as whole commands
alternated --repeat times: wall seconds, and the write stage's CPU and wall microseconds a row
from the manifest (quantisation happens as each file is built, so it is counted there).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUALITY_VARIANTS = [
    "--precision float32", "--precision float16", "--precision int8", "--precision uint8",
    "--precision binary", "--precision ubinary", "--truncate-dim 256", "--truncate-dim 128",
    "--truncate-dim 128 --precision int8", "--truncate-dim 256 --precision binary",
]
COST_VARIANTS = ["--precision float32", "--precision binary", "--precision int8"]


def bench_precision(args) -> dict:
    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.join(REPO, "jobs"))
    from jobs.benchmark import machine

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    with tempfile.TemporaryDirectory() as work:
        env["EMBEDPIPE_CACHE"] = os.path.join(work, "cache")
        result = {"machine": machine(), "quality": quality(args, work, env), "cost": cost(args, work, env)}
    print(json.dumps(result, indent=2))
    return result


def quality(args, work: str, env: dict) -> dict:
    import numpy as np
    from scipy.stats import spearmanr

    from bench_host import _embed, run_tree
    from pipeline import read_embeddings
    from wordnet_pairs import pairs

    triples = pairs(args.pairs)
    glosses = sorted({t for a, b, _ in triples for t in (a, b)})
    docs = os.path.join(work, "glosses.txt")
    with open(docs, "w", encoding="utf-8") as f:
        f.writelines(" ".join(t.split()) + "\n" for t in glosses)
    index = {t: i for i, t in enumerate(glosses)}
    a_rows = np.array([index[a] for a, _, _ in triples])
    b_rows = np.array([index[b] for _, b, _ in triples])
    gold = np.array([g for _, _, g in triples])
    rows, reference = {}, None
    for k, flags in enumerate(QUALITY_VARIANTS):
        out = os.path.join(work, f"q{k}")
        _, _, wall = run_tree(_embed(docs, out, "all-MiniLM-L6-v2", flags), env)
        ids, vectors = read_embeddings(out, dequantize=True)
        vectors = vectors[np.argsort([int(i.rsplit(":", 1)[1]) for i in ids])]
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        cosines = (unit[a_rows] * unit[b_rows]).sum(1)
        neighbours = top10(unit)
        if reference is None:  # float32, the first variant
            reference = (cosines, neighbours)
        manifest = json.load(open(os.path.join(out, "_manifest.json")))
        rho = float(spearmanr(cosines, gold).statistic)
        rows[flags] = {
            "bytes_per_vector": manifest["bytes_per_vector"],
            "parquet_bytes": sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".parquet")),
            "spearman_gold": round(rho, 4),
            "spearman_to_float32": round(float(spearmanr(cosines, reference[0]).statistic), 4),
            "recall_at_10": round(float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(neighbours, reference[1])])), 4),
            "seconds": round(wall, 1),
        }
    base = rows[QUALITY_VARIANTS[0]]["spearman_gold"]
    for row in rows.values():
        row["kept"] = round(row["spearman_gold"] / base, 4)
    return {"pairs": len(triples), "glosses": len(glosses), "model": "all-MiniLM-L6-v2", "variants": rows}


def top10(unit):
    """Each row's 10 nearest other rows by cosine."""
    import numpy as np

    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :10]


def cost(args, work: str, env: dict) -> dict:
    from bench_host import _embed, fortune_lines, near_zero_model, run_tree, stage_costs

    model = near_zero_model(os.path.join(work, "model"))
    docs = os.path.join(work, "lines.txt")
    with open(docs, "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in fortune_lines(args.lines))
    run_tree(_embed(docs, os.path.join(work, "warm"), model, "--precision float32"), env)  # descriptions cached
    runs: dict[str, list] = {v: [] for v in COST_VARIANTS}
    for _ in range(args.repeat):
        for k, flags in enumerate(COST_VARIANTS):
            out = os.path.join(work, f"c{k}")
            _, _, wall = run_tree(_embed(docs, out, model, flags), env)
            runs[flags].append((wall, json.load(open(os.path.join(out, "_manifest.json")))))
    rows = {}
    for flags, done in runs.items():
        n = done[0][1]["rows"]["documents"]
        rows[flags] = {
            "seconds": [round(w, 2) for w, _ in done],
            "write_cpu_us_per_row": [stage_costs(m, n)["write"] for _, m in done],
            "write_wall_us_per_row": [stage_costs(m, n, "busy_s")["write"] for _, m in done],
            "calibration_s": [((m.get("quantization") or {}).get("source") or {}).get("seconds") for _, m in done],
        }
    return {"lines": args.lines, "model": "near-zero (jobs/bench_host.py)", "variants": rows}
