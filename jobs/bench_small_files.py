"""Many small files against the same rows in a few (issue 26): the whole `embedpipe embed` command with
the default model on --files files of --lines short sentences each (WordNet glosses, ~11 tokens),
then on the same rows in --big-files files, alternated --repeat times in the same run. Reported:
seconds, rows/s, the ratio (small files / few files, target >= 0.80), and the output files each made.

    python jobs/bench_small_files.py [--files 20000] [--lines 3] [--big-files 4] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def write_inputs(work: str, files: int, lines: int, big_files: int) -> tuple[str, str, int]:
    """(directory of `files` small files in subfolders of 1,000, directory of `big_files` files, rows):
    the same rows, in the same order."""
    from data.short_sentences import short_sentences

    texts = short_sentences()
    rows = files * lines
    texts = (texts * (rows // len(texts) + 1))[:rows]
    small, big = os.path.join(work, "small"), os.path.join(work, "big")
    for k in range(files):
        folder = os.path.join(small, f"part{k // 1000:03d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"doc{k:06d}.txt"), "w", encoding="utf-8") as f:
            f.writelines(t + "\n" for t in texts[k * lines:(k + 1) * lines])
    os.makedirs(big)
    per = -(-rows // big_files)
    for k in range(big_files):
        with open(os.path.join(big, f"part{k}.txt"), "w", encoding="utf-8") as f:
            f.writelines(t + "\n" for t in texts[k * per:(k + 1) * per])
    return small, big, rows


def main() -> None:
    from jobs.benchmark import machine

    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=20_000)
    p.add_argument("--lines", type=int, default=3)
    p.add_argument("--big-files", type=int, default=4)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    results: dict[str, list] = {"small": [], "big": []}
    with tempfile.TemporaryDirectory() as work:
        small, big, rows = write_inputs(work, args.files, args.lines, args.big_files)
        out = os.path.join(work, "out")

        def run(src: str) -> tuple[float, dict]:
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "pipeline", "embed", "--input", src, "--output", out, "--quiet"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
            seconds = time.perf_counter() - t0
            manifest = json.load(open(os.path.join(out, "_manifest.json")))
            assert manifest["rows"]["documents"] == rows
            return seconds, manifest

        for _ in range(args.repeat):
            for kind, src in (("big", big), ("small", small)):
                seconds, manifest = run(src)
                results[kind].append({"seconds": round(seconds, 1), "rows_per_s": round(rows / seconds),
                                      "output_files": len(manifest["files"]), "groups": manifest["input"]["groups"],
                                      "read_busy_s": manifest["timings"]["stages"].get("read.reading", {}).get("busy_s")})
    best = {k: min(r["seconds"] for r in v) for k, v in results.items()}
    print(json.dumps({
        "machine": machine(), "files": args.files, "lines_per_file": args.lines, "big_files": args.big_files,
        "rows": rows, "runs": results, "ratio_small_over_big_rows_per_s": round(best["big"] / best["small"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
