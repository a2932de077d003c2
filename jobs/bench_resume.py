"""What a resume costs when almost everything is committed (issue 24, item 5): `embedpipe embed` on
--shards shards of --rows short lines each, cut into files of --rows-per-file rows (the last file of
each shard short), with the tiny random model of the scale task; then one file of one shard is
removed and the same command runs again. Reported: both whole commands, and the shards the rerun
read (the manifest's `shards_read`: a shard whose files are all committed is not opened).

    python jobs/bench_resume.py [--shards 100] [--rows 1000] [--rows-per-file 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> None:
    from jobs.benchmark import machine, tiny_model

    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--rows-per-file", type=int, default=300)
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    with tempfile.TemporaryDirectory() as work:
        env["EMBEDPIPE_CACHE"] = os.path.join(work, "cache")
        model = tiny_model(os.path.join(work, "model"))
        src, out = os.path.join(work, "in"), os.path.join(work, "out")
        os.makedirs(src)
        for k in range(args.shards):
            with open(os.path.join(src, f"s{k:03d}.txt"), "w", encoding="utf-8") as f:
                f.writelines(f"shard {k} line {i} of a short text\n" for i in range(args.rows))
        cmd = [sys.executable, "-m", "pipeline", "embed", "--input", src, "--output", out, "--model", model,
               "--rows-per-file", str(args.rows_per_file), "--quiet"]

        def run() -> tuple[float, dict]:
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
            return time.perf_counter() - t0, json.load(open(os.path.join(out, "_manifest.json")))

        first, m1 = run()
        os.remove(os.path.join(out, "s050.txt-00001.parquet"))
        resumed, m2 = run()
        complete, m3 = run()
    print(json.dumps({
        "machine": machine(), "shards": args.shards, "rows": args.shards * args.rows, "files": len(m1["files"]),
        "first_run_s": round(first, 1), "shards_read_first": m1["shards_read"],
        "resume_one_file_missing_s": round(resumed, 1), "shards_read_resume": m2["shards_read"],
        "rerun_complete_s": round(complete, 1), "shards_read_complete": m3["shards_read"],
    }, indent=2))


if __name__ == "__main__":
    main()
