"""The host work both encoders share (EncodeStage, CrossEncodeStage): token-budget
micro-batches, padding, the device and compute dtype, device moves, and the split of a
micro-batch that runs out of CUDA memory.

Rows arrive sorted longest first. They are cut into micro-batches by a token budget
(rows x longest row <= max_batch_tokens) and each micro-batch is padded only to its own
longest row, on the tokenizer's side with its pad ids, as the tokenizer itself would pad it.

torch is imported only by the functions that need it: an encoder on ONNX Runtime plans and
pads its micro-batches here without it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

Result = TypeVar("Result")

# Default token budgets of one forward pass. CPU, all-MiniLM-L6-v2 on 3,072 fortunes in 1,024-row
# blocks, one thread, CPU time: 16384 tokens 74.1 s, 4096 57.7 s, 2048 51.6 s, 1024 50.1 s
# (BENCHMARKS.md): small batches keep their activations in the cores' caches. A GPU wants large ones.
CPU_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 16384
# What a micro-batch costs beyond its tokens (plan_micro_batches weighs it against padding). CPU: all-MiniLM-L6-v2
# on ONNX Runtime, one thread, 6,144 fortune lines in unsorted 256-row blocks: budget-filling cuts 34.2-38.2 s
# of model time, least padding at 8 / 16 / 32 / 64 / 128 tokens a call 26.2 / 26.6 / 27.5 / 28.1 / 29.3 s:
# 8 and 16 are within 2%, and 12, between them, leaves room for a costlier call elsewhere. GPU: a forward
# pass launches a few hundred kernels, the cost of thousands of tokens; at 4,096 the cut makes about as
# many micro-batches as the budget-filling one and pads half as much (not measured on a GPU yet).
REFERENCE_WEIGHTS_PER_TOKEN = 10_795_392  # all-MiniLM-L6-v2
CPU_CALL_WEIGHTS = 12 * REFERENCE_WEIGHTS_PER_TOKEN
GPU_CALL_TOKENS = 4096
# A sparse model's MLM head produces rows x tokens x vocabulary logits; its token budget is cut
# so that they stay within this many bytes (about 2,200 tokens for a 30k vocabulary).
SPARSE_LOGITS_BYTES = 256 << 20


def batch_tokens(asked: int | None, device: str, vocab_size: int | None = None) -> int:
    """The token budget of one micro-batch: --max-batch-tokens, else the device's default; a sparse
    model's (`vocab_size`, its output's width) is cut so that its logits fit SPARSE_LOGITS_BYTES."""
    budget = asked or (GPU_BATCH_TOKENS if device == "cuda" else CPU_BATCH_TOKENS)
    if vocab_size:
        budget = max(1, min(budget, SPARSE_LOGITS_BYTES // (4 * vocab_size)))
    return budget


def call_tokens(device: str, weights_per_token: int | None) -> int:
    """What one more micro-batch costs, in padded tokens of the model: what `plan_micro_batches` weighs
    against padding. A CPU call costs about as much as CPU_CALL_WEIGHTS weights run once (all-MiniLM-L6-v2:
    12 tokens; a near-zero-cost model: more than any budget, so its cuts stay where the budget puts them);
    a GPU call, kernel launches and a copy, GPU_CALL_TOKENS."""
    if device == "cuda":
        return GPU_CALL_TOKENS
    return max(1, CPU_CALL_WEIGHTS // (weights_per_token or REFERENCE_WEIGHTS_PER_TOKEN))


def plan_micro_batches(lengths: np.ndarray, max_batch_tokens: int,
                       call_tokens: int | None = None) -> list[tuple[int, int]]:
    """[start, end) slices over rows sorted by descending length, each padded to its first (longest) row.

    Without `call_tokens` each slice holds as many rows as fit the budget; with it, the slices are
    those of least `padded tokens + call_tokens x slices` within the budget (`_least_padding`). A row
    longer than the budget gets a slice of its own.
    """
    if call_tokens is not None and len(lengths):
        return _least_padding(np.asarray(lengths, np.int64), max_batch_tokens, call_tokens)
    spans, start, n = [], 0, len(lengths)
    while start < n:
        longest = max(int(lengths[start]), 1)
        size = max(1, max_batch_tokens // longest)
        end = min(n, start + size)
        spans.append((start, end))
        start = end
    return spans


def _least_padding(lengths: np.ndarray, budget: int, call_tokens: int) -> list[tuple[int, int]]:
    """The cut of least cost (tokens run, padding included, plus `call_tokens` a slice) among the cuts whose
    slices end where the length changes or where the budget stops them, by dynamic programming over those
    places (a few dozen in a block of short texts). The budget-filling cut is one of them, so its cost is
    never above that cut's, and it makes at most (that cut's padding - its own) / call_tokens more slices.
    Short sentences as the tokenizers get them, 256-row CPU blocks: 19% of the tokens run were padding with
    the budget-filling cut, 0.4% with this one at 12 tokens a call (BENCHMARKS.md, padding)."""
    n = len(lengths)
    widths = np.maximum(lengths, 1)
    changes = np.flatnonzero(lengths[1:] != lengths[:-1]) + 1
    reach = np.minimum(n, np.arange(n) + np.maximum(1, budget // widths))  # the furthest end of a slice at each row
    starts = set(changes.tolist()) | {0}
    todo = sorted(starts)
    while todo:  # every place a slice can start: 0, a change of length, or where a budget-full slice ended
        more = {int(reach[s]) for s in todo} - starts - {n}
        starts |= more
        todo = sorted(more)
    cost = np.full(n + 1, np.inf)
    cost[n] = 0.0
    best_end = np.zeros(n + 1, np.int64)
    for s in sorted(starts, reverse=True):
        ends = np.append(changes[np.searchsorted(changes, s, "right"):np.searchsorted(changes, reach[s])], reach[s])
        totals = (ends - s) * widths[s] + cost[ends]
        k = int(np.argmin(totals))
        cost[s], best_end[s] = totals[k] + call_tokens, ends[k]
    spans, s = [], 0
    while s < n:
        spans.append((s, int(best_end[s])))
        s = int(best_end[s])
    return spans


def micro_batches(rows: np.ndarray, lengths: np.ndarray, max_batch_tokens: int) -> Iterator[np.ndarray]:
    """`rows` (sorted longest first) cut as plan_micro_batches cuts them; `lengths` is indexed by row."""
    for start, end in plan_micro_batches(lengths[rows], max_batch_tokens):
        yield rows[start:end]


def padding(tokenizer) -> tuple[bool, dict[str, int]]:
    """(pads on the left, pad value per token feature) of a tokenizer, as its own padding would use."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    return left, {"input_ids": pad_id, "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0}


def pad_features(
    tokens: dict[str, np.ndarray | Sequence[np.ndarray]], lengths: np.ndarray, left: bool, pad_values: dict[str, int],
) -> dict[str, np.ndarray]:
    """The token features of B rows padded to the longest of them, and their attention mask: int64 (B, T).

    `tokens[key]` holds the rows' tokens one row after another (row b has lengths[b] of them),
    as one flat array or as one array per row. Each row is padded on the left or on the right
    with pad_values[key] (0 for a feature without one), as `padding(tokenizer)` says.
    """
    lengths = np.asarray(lengths, np.int64)
    width = int(lengths.max())
    columns = np.arange(width)
    if left:
        mask = columns[None, :] >= (width - lengths)[:, None]  # (B, T)
    else:
        mask = columns[None, :] < lengths[:, None]  # (B, T)
    features = {}
    for key, rows in tokens.items():
        flat = rows if isinstance(rows, np.ndarray) else np.concatenate(rows)
        padded = np.full((len(lengths), width), pad_values.get(key, 0), np.int64)  # (B, T)
        padded[mask] = flat  # row after row, as the mask's True cells
        features[key] = padded
    features["attention_mask"] = mask.astype(np.int64)
    return features


def usable_device(planned: str, asked: str) -> str:
    """The device this replica runs on: the planned one, or CPU when the plan said CUDA
    only because of `--device auto` and this node's torch sees no CUDA device (a GPU that
    Ray counts but torch cannot use). With `--device cuda` that is an error instead."""
    if planned != "cuda":
        return planned
    import torch

    if torch.cuda.is_available():
        return planned
    if asked == "cuda":
        raise PipelineError("--device cuda: Ray gave this encoder a GPU, but torch on its node sees no CUDA device")
    log.warning("Ray gave this encoder a GPU, but torch sees no CUDA device; encoding on CPU (--device auto)")
    return "cpu"


def compute_dtype(asked: str, device: str) -> str:
    """The dtype the encoder computes in: `--dtype`, where auto is float16 on CUDA and float32 on CPU."""
    if asked == "auto":
        return "float16" if device == "cuda" else "float32"
    return asked


def to_device(array: np.ndarray, device):
    """A tensor on `device` from a numpy array (a read-only view of an Arrow buffer, often): on CUDA
    copied once into pinned memory, then to the device asynchronously, overlapping the previous
    micro-batch; on CPU shared where the array is writable, else copied once."""
    import torch

    if device.type != "cuda":
        return torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)
    pinned = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype, pin_memory=True)
    pinned.numpy()[...] = array
    return pinned.to(device, non_blocking=True)


def on_device(features: dict[str, np.ndarray], device, extras: dict[str, Any]) -> dict[str, Any]:
    """Padded features as torch tensors on `device` (torch.device), with the model's features
    that are not tensors (`extras`: the modality, a prompt's length) as they are."""
    tensors: dict[str, Any] = {k: to_device(v, device) for k, v in features.items()}
    tensors.update(extras)
    return tensors


def split_on_oom(
    forward: Callable[[np.ndarray], Result], rows: np.ndarray, lengths: np.ndarray | None,
    join: Callable[[list[Result]], Result],
) -> Result:
    """`forward(rows)`; where that runs out of CUDA memory, `forward` on each half of `rows`, joined in order.

    Halves are split again until they fit; a single row that does not fit raises. The failed
    try's tensors go with its traceback, before the cache is emptied and the halves run.
    `lengths` (indexed by row; None where unknown) only names the failed micro-batch's width in the warning.
    """
    import torch

    try:
        return forward(rows)
    except torch.cuda.OutOfMemoryError:
        if len(rows) == 1:
            raise
    width = f" x {int(lengths[rows].max())} tokens" if lengths is not None else ""
    log.warning("CUDA out of memory on %d rows%s; splitting the batch", len(rows), width)
    torch.cuda.empty_cache()
    half = len(rows) // 2
    return join([split_on_oom(forward, rows[:half], lengths, join), split_on_oom(forward, rows[half:], lengths, join)])
