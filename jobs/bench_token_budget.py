"""The encoder alone, in process, on one thread: CPU time to encode fortunes in 1,024-row blocks
for several --max-batch-tokens budgets (best of two interleaved passes), vectors checked equal.

    .venv/bin/python jobs/bench_token_budget.py [--docs 3072] [--block-rows 1024] [--call-tokens N] [BUDGET ...]

--call-tokens N cuts the micro-batches as the pipeline does now (least padding plus N tokens a call;
12 for MiniLM on CPU); without it each micro-batch is filled to the budget, as before.

Measures the lever behind the CPU default of 2,048 tokens (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "data")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("budgets", type=int, nargs="*", default=[16384, 4096, 2048, 1024])
    p.add_argument("--docs", type=int, default=3072)
    p.add_argument("--block-rows", type=int, default=1024)
    p.add_argument("--call-tokens", type=int)
    args = p.parse_args()

    import numpy as np
    import pyarrow as pa
    import torch

    from fortunes import english_corpus
    from pipeline import EmbedConfig
    from pipeline.stages.encode import EncodeStage
    from pipeline.stages.tokenize import TokenizeStage

    torch.set_num_threads(1)
    texts = english_corpus()[: args.docs]
    config = EmbedConfig(input="x", output="y")
    stage = EncodeStage(config, "cpu", 1)
    stages, blocks_for = {}, {}
    for budget in args.budgets:  # the tokenizer cuts the micro-batches: one layout per budget
        tokenizer = TokenizeStage(config, batch_tokens=budget, call_tokens=args.call_tokens)
        blocks_for[budget] = []
        for start in range(0, len(texts), args.block_rows):
            part = texts[start : start + args.block_rows]
            table = pa.table({"id": [str(i) for i in range(len(part))], "text": part, "_valid": [True] * len(part)})
            blocks_for[budget].append(tokenizer(table))
        stages[budget] = stage
    best = {b: float("inf") for b in args.budgets}
    reference = None
    for _ in range(2):
        for budget, stage in stages.items():
            started = time.process_time()
            out = [stage(block) for block in blocks_for[budget]]
            best[budget] = min(best[budget], time.process_time() - started)
            vectors = np.concatenate(
                [np.asarray(o["embedding"].combine_chunks().flatten().to_numpy(), np.float32).reshape(o.num_rows, -1) for o in out]
            )
            if reference is None:
                reference = vectors
            assert np.abs(vectors - reference).max() <= 1e-5, f"budget {budget} changed the vectors"
    print({budget: round(seconds, 1) for budget, seconds in best.items()},
          f"({len(texts)} fortunes, {args.block_rows}-row blocks, call_tokens {args.call_tokens}, CPU seconds, 1 thread)")


if __name__ == "__main__":
    main()
