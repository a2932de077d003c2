"""Ready-to-run micro-batches: the layout in which the tokenizer hands a block to the encoder.

The tokenizer does all the host work of batching (pipeline.stages.tokenize calls `lay_out`):
it finds repeated texts, sorts each output file's rows longest first, cuts them into
micro-batches within the token budget (rows x longest row <= budget) where padding costs least
(pipeline.stages.batching.plan_micro_batches), and pads every row of a
micro-batch to that micro-batch's longest row, with the tokenizer's own pad ids on its own side.
A block then holds, row by row:

    tok_<feature>, tok_attention_mask   list<int64>; the rows of one micro-batch all have the
                                        micro-batch's width, so its tokens are one contiguous
                                        run of each column's values: a (rows, width) matrix
    _mb                                 int64: the micro-batch, an id shared by its rows only
                                        (COPY: a repeated text; NONE: an invalid row, no tokens)
    _copy_of                            int64: for a repeated text, the `_row` of its first copy
                                        in the same file; -1 otherwise

so that the encoder (`micro_batches_of`, `features_of`) only slices matrices out of Arrow
buffers, runs the model on each and copies the vectors back, without any per-row Python. A
repeated text keeps its own tokens, unpadded: if Ray Data ever cuts a block between its first
copy and it, the encoder encodes it itself (`copies_of`).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.stages.batching import pad_features, plan_micro_batches
from pipeline.stages.columns import COPY_OF, FILE, MICRO_BATCH, ROW, token_column

COPY = -1  # _mb of a repeated text
NONE = -2  # _mb of an invalid row
MASK = "attention_mask"


def segments(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Indices of the slices [starts[k], starts[k] + sizes[k]), one after another."""
    ends = np.cumsum(sizes)
    return np.repeat(starts - (ends - sizes), sizes) + np.arange(ends[-1] if len(ends) else 0)


def lay_out(
    batch: pa.Table, tokens: dict[str, tuple[np.ndarray, np.ndarray]], lengths: np.ndarray, budget: int,
    left: bool, pad_values: dict[str, int], call_tokens: int | None = None,
) -> tuple[np.ndarray, dict[str, pa.Array]]:
    """(the block's new row order, the columns to add in that order) for `batch` (with `_row`), whose
    rows have `tokens` ({feature: (flat values, offsets over every row)}; invalid rows have none) and `lengths`."""
    n = batch.num_rows
    file_rank = _file_codes(batch)
    valid = np.flatnonzero(lengths > 0)
    first = distinct_rows(valid, tokens, file_rank)  # for each valid row, the first row with its tokens
    kind = np.full(n, 2, np.int8)  # 0: encoded, 1: a repeated text, 2: invalid
    kind[valid] = np.where(first == valid, 0, 1)
    order = np.lexsort((-lengths, kind, file_rank))  # by output file, then encoded rows longest first
    lengths_o, kind_o = lengths[order], kind[order]

    mb = np.where(kind_o == 1, COPY, NONE).astype(np.int64)
    width = np.where(kind_o == 1, lengths_o, 0).astype(np.int64)
    encoded = np.flatnonzero(kind_o == 0)
    if len(encoded):
        base = int.from_bytes(os.urandom(5), "little") << 20  # ids that no other block's micro-batch shares
        file_o = file_rank[order][encoded]
        cuts = np.flatnonzero(np.diff(file_o)) + 1  # a micro-batch never spans two files
        k = 0
        for part in np.split(encoded, cuts):
            for s, e in plan_micro_batches(lengths_o[part], budget, call_tokens):
                mb[part[s:e]] = base + k
                width[part[s:e]] = lengths_o[part[s]]
                k += 1

    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(width, out=offsets[1:])
    starts = offsets[:-1] + (width - lengths_o if left else 0)
    dest = segments(starts, lengths_o)  # where each row's own tokens go among the padded ones
    columns: dict[str, pa.Array] = {}
    offsets_array = pa.array(offsets)
    for key, (values, row_offsets) in tokens.items():
        padded = np.full(offsets[-1], pad_values.get(key, 0), np.int64)
        padded[dest] = values[segments(row_offsets[order], lengths_o)]
        columns[token_column(key)] = pa.LargeListArray.from_arrays(offsets_array, pa.array(padded))
    mask = np.zeros(offsets[-1], np.int64)
    mask[dest] = 1
    columns[token_column(MASK)] = pa.LargeListArray.from_arrays(offsets_array, pa.array(mask))
    columns[MICRO_BATCH] = pa.array(mb)
    columns[COPY_OF] = pa.array(_copy_keys(batch, order, kind_o, valid, first))
    return order, columns


def _file_codes(batch: pa.Table) -> np.ndarray:
    """Each row's output file as a small integer, in the order of the names (0 for a block without `_file`)."""
    if FILE not in batch.column_names:
        return np.zeros(batch.num_rows, np.int64)
    return np.unique(batch[FILE].to_numpy(zero_copy_only=False), return_inverse=True)[1].astype(np.int64)


def _copy_keys(batch: pa.Table, order, kind_o, valid, first) -> np.ndarray:
    """_copy_of in the new row order: the key (see row_keys) of each repeated text's first copy."""
    n = len(order)
    first_of = np.arange(n)
    first_of[valid] = first
    keys = np.asarray(batch[ROW].to_numpy(zero_copy_only=False), np.int64)  # in the old order
    out = np.full(n, -1, np.int64)
    copies = kind_o == 1
    out[copies] = keys[first_of[order[copies]]]
    return out


def distinct_rows(valid: np.ndarray, tokens: dict, group: np.ndarray) -> np.ndarray:
    """For each valid row, the first row of the same `group` (output file) with the same tokens.

    Rows are grouped by a 64-bit hash of their group, length and tokens (numpy, no per-row
    Python); only rows that share it are compared token by token, so a hash collision never
    merges two different texts.
    """
    if len(valid) < 2:
        return valid.astype(np.int64)
    _, first_offsets = next(iter(tokens.values()))
    sizes = (first_offsets[valid + 1] - first_offsets[valid]).astype(np.int64)
    digest = sizes.astype(np.uint64) + group[valid].astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)
    position = segments(np.zeros_like(sizes), sizes).astype(np.uint64)  # each token's place in its row
    for values, offsets in tokens.values():
        flat = values[segments(offsets[valid], sizes)].astype(np.uint64)
        with np.errstate(over="ignore"):
            mixed = (flat + np.uint64(0x9E3779B97F4A7C15)) * (position * np.uint64(2) + np.uint64(0xBF58476D1CE4E5B9))
            mixed ^= mixed >> np.uint64(29)
            sums = np.add.reduceat(mixed, (np.cumsum(sizes) - sizes))  # valid rows have at least one token
            digest = digest * np.uint64(0x94D049BB133111EB) + sums
    _, first, inverse = np.unique(digest, return_index=True, return_inverse=True)
    candidate = valid[first[inverse]]  # the first row with the same digest
    repeated = np.flatnonzero(candidate != valid)
    if not len(repeated):
        return valid.astype(np.int64)

    def key(i):  # rare in real corpora: confirm each token by token
        return (int(group[i]), b"|".join(v[o[i] : o[i + 1]].tobytes() for v, o in tokens.values()))

    out = valid.astype(np.int64)
    if all(key(valid[j]) == key(candidate[j]) for j in repeated):
        out[repeated] = candidate[repeated]
        return out
    seen: dict = {}  # a true hash collision: exact keys
    for j, i in enumerate(valid):
        out[j] = seen.setdefault(key(i), int(i))
    return out


def micro_batches_of(batch: pa.Table) -> list[tuple[int, int]]:
    """The [start, end) rows of each ready micro-batch of a laid-out block (or any slice or
    concatenation of such blocks)."""
    mb = np.asarray(batch[MICRO_BATCH].to_numpy(zero_copy_only=False))
    if not len(mb):
        return []
    starts = np.flatnonzero(np.r_[True, mb[1:] != mb[:-1]])
    ends = np.r_[starts[1:], len(mb)]
    return [(int(s), int(e)) for s, e in zip(starts, ends) if mb[s] >= 0]


def flat_columns(batch: pa.Table, features: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{feature: (values, offsets)} of the block's token columns (attention_mask among them), zero-copy."""
    out = {}
    for key in features:
        column = batch[token_column(key)]
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        offsets = np.asarray(arr.offsets)
        out[key] = (np.asarray(arr.values)[offsets[0] : offsets[-1]], offsets - offsets[0])
    return out


def features_of(lists: dict[str, tuple[np.ndarray, np.ndarray]], start: int, end: int) -> dict[str, np.ndarray]:
    """The (rows, width) int64 matrices of rows [start, end) of one micro-batch: views, no copy."""
    out = {}
    for key, (values, offsets) in lists.items():
        width = offsets[start + 1] - offsets[start]
        if offsets[end] - offsets[start] != (end - start) * width:
            raise PipelineError(f"rows {start}-{end} of a block are not one ready micro-batch (uneven widths)")
        out[key] = values[offsets[start] : offsets[end]].reshape(end - start, width)
    return out


def copies_of(batch: pa.Table, lists: dict, left: bool, pad_values: dict[str, int], budget: int):
    """(rows that repeat an encoded row of this block, the rows they copy), and the micro-batches
    (rows, padded features) of repeated texts whose first copy is not in this block."""
    mb = np.asarray(batch[MICRO_BATCH].to_numpy(zero_copy_only=False))
    copies = np.flatnonzero(mb == COPY)
    if not len(copies):
        return copies, copies, []
    n = batch.num_rows
    file_code = _file_codes(batch)
    rows = np.asarray(batch[ROW].to_numpy(zero_copy_only=False), np.int64)
    copy_of = np.asarray(batch[COPY_OF].to_numpy(zero_copy_only=False), np.int64)[copies]
    # (file, row) pairs as one integer each: a chunk's row (doc_row * 2**24 + k) leaves no bits to shift into
    pairs = np.concatenate([np.stack([file_code, rows], 1), np.stack([file_code[copies], copy_of], 1)])
    codes = np.unique(pairs, axis=0, return_inverse=True)[1].reshape(-1)
    keys, wanted = codes[:n], codes[n:]
    encoded = np.flatnonzero(mb >= 0)
    sorted_keys = np.argsort(keys[encoded])
    at = np.minimum(np.searchsorted(keys[encoded], wanted, sorter=sorted_keys), len(encoded) - 1) if len(encoded) else None
    if at is not None:
        source = encoded[sorted_keys[at]]
        found = keys[source] == wanted
    else:
        source, found = np.zeros(len(copies), np.int64), np.zeros(len(copies), bool)
    orphans = copies[~found]
    extra = []
    if len(orphans):
        lengths = np.zeros(n, np.int64)
        values_mask, offsets_mask = lists[MASK]
        lengths[orphans] = offsets_mask[orphans + 1] - offsets_mask[orphans]
        orphans = orphans[np.argsort(-lengths[orphans], kind="stable")]
        for s, e in plan_micro_batches(lengths[orphans], budget):
            rows = orphans[s:e]
            tokens = {k: v[segments(o[rows], lengths[rows])] for k, (v, o) in lists.items() if k != MASK}
            extra.append((rows, pad_features(tokens, lengths[rows], left, pad_values)))
    return copies[found], source[found], extra
