"""Pairs of ids joined back to their texts on Ray tasks, without the corpus on the driver.

    pick_texts (a task per group of shards: a large shard, or small ones packed as embed packs
        them): reads them as `embed` does, so the ids are the ones embed assigned; keeps the rows
        whose id a pair names; splits them into P parts
    join_first (a task per part p): the pairs whose id_a lies in part p get text_a, and are
        split again by the part of their id_b
    join_second (a task per part q): the pairs whose id_b lies in part q get text_b, cut
        into blocks of at most `block_rows` pairs for the scoring actors

An id's part is its position in `wanted`, the sorted ids the pairs name, modulo P:
no hashing, the same answer on every worker. The driver holds the pairs and
`wanted` (at most two ids per pair) and never a text. Memory per task: a pick
task holds a lookup of `wanted` (about 160 bytes an id: 160 MB for a million)
and its shard's matching texts; a join task 1/P of the wanted texts and of the pairs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stages.columns import VALID
from pipeline.errors import InputError
from pipeline.storage.packing import Group, as_group, pack_shards
from pipeline.storage.sources import ReadSpec, Shard, read_chunks

TASK_CPUS = 0.25  # reading and joining are I/O and memory bound
PICK_ROWS = 8192  # rows a pick task reads at a time; small shards are packed into groups as embed packs them
TEXTS_PER_PART = 65_536  # wanted texts per join part (default P): a part's texts stay in the tens of MB
TEXT_PART = pa.schema([("pos", pa.int64()), ("text", pa.string())])


def default_parts(wanted: int) -> int:
    return max(1, math.ceil(wanted / TEXTS_PER_PART))


def pick_texts(shard: Shard | Group, spec: ReadSpec, wanted: pa.Array, parts: int, cuts: pa.Table | None = None) -> list:
    """The shard's texts whose id is wanted, as `parts` tables (pos, text), then the positions found.

    With `cuts` (pairs of chunks: `doc_id`, `start`, `end` of each wanted id, in wanted's order), a
    wanted id is a chunk: the row whose id is its doc_id gives text[start:end], as embed embedded it.
    Rows whose text is empty, blank or null are left out: embed never embedded them.
    """
    if cuts is None:
        lookup = {value: [k] for k, value in enumerate(wanted.to_pylist())}
    else:
        lookup = {}
        for k, doc in enumerate(cuts["doc_id"].to_pylist()):
            lookup.setdefault(doc, []).append(k)
        starts, ends = cuts["start"].to_pylist(), cuts["end"].to_pylist()
    picked: list[list[pa.Table]] = [[] for _ in range(parts)]
    found = []
    for table in read_chunks(as_group(shard), spec, PICK_ROWS, frozenset()):
        valid = table[VALID].to_pylist()
        rows = [(i, ks) for i, ks in enumerate(lookup.get(d) for d in table["id"].to_pylist()) if ks and valid[i]]
        if not rows:
            continue
        texts = table["text"].take(pa.array([i for i, _ in rows])).to_pylist()
        pos = np.array([k for _, ks in rows for k in ks], np.int64)
        if cuts is None:
            text = pa.array(texts, pa.string())
        else:
            text = pa.array([t[starts[k]:ends[k]] for (_, ks), t in zip(rows, texts) for k in ks], pa.string())
        found.append(pos)
        part = pos % parts
        for p in np.unique(part):
            mine = part == p
            picked[p].append(pa.table({"pos": pos[mine], "text": text.filter(pa.array(mine))}, schema=TEXT_PART))
    out: list[Any] = [pa.concat_tables(t) if t else TEXT_PART.empty_table() for t in picked]
    return out + [np.concatenate(found) if found else np.zeros(0, np.int64)]


def chunk_offsets(embeddings: str, storage_options, wanted: pa.Array, where: str) -> pa.Table:
    """`doc_id`, `start`, `end` of each of the chunk ids `wanted`, in its order (nulls for an id that
    is not there), read from an `embed --chunk-tokens` output: pick_texts' `cuts`."""
    import pyarrow.parquet as pq

    from pipeline.storage.filesystems import first_line, get_fs
    from pipeline.storage.readers import embedding_files

    try:
        fs, _ = get_fs(embeddings, storage_options)
        parts = []
        for path in embedding_files(embeddings, storage_options):
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=["id", "doc_id", "start", "end"])
            parts.append(table.filter(pc.is_in(table["id"], value_set=wanted)))
    except InputError:
        raise InputError(f"{where}: the embeddings output {embeddings} cannot be read; give --embeddings") from None
    except (pa.ArrowException, KeyError, OSError) as exc:
        raise InputError(f"{where}: {embeddings} holds no chunk offsets (id, doc_id, start, end: not an "
                         f"`embed --chunk-tokens` output): {first_line(exc)}") from None
    found = pa.concat_tables(parts) if parts else None
    if found is None or found.num_rows == 0:
        raise InputError(f"{where}: none of the ids is a chunk of {embeddings}")
    return found.select(["doc_id", "start", "end"]).take(pc.index_in(wanted, value_set=found["id"].combine_chunks()))


def _texts_by_slot(parts: int, text_tables: tuple[pa.Table, ...]) -> tuple[pa.Array, np.ndarray]:
    """One part's texts and, for each position pos of the part, the row holding it (at slot pos // parts)."""
    texts = pa.concat_tables(text_tables)
    slots = texts["pos"].to_numpy() // parts
    row_of = np.full(int(slots.max()) + 1 if len(slots) else 0, -1, np.int64)
    row_of[slots] = np.arange(len(slots))
    return texts["text"].combine_chunks(), row_of


def _attach(pairs: pa.Table, key: str, column: str, parts: int, text_tables) -> pa.Table:
    texts, row_of = _texts_by_slot(parts, text_tables)
    rows = row_of[pairs[key].to_numpy() // parts]
    assert (rows >= 0).all(), "every wanted id was found before the join started"
    return pairs.append_column(column, texts.take(pa.array(rows)))


def join_first(parts: int, pairs: pa.Table, *text_tables: pa.Table) -> list[pa.Table] | pa.Table:
    """Pairs (pair, pos_a, pos_b) of one part of id_a -> text_a attached, split by the part of id_b
    (one table per part; the table itself when there is one part, as Ray returns a single value)."""
    joined = _attach(pairs, "pos_a", "text_a", parts, text_tables).drop_columns(["pos_a"])
    part_b = joined["pos_b"].to_numpy() % parts
    out = [joined.filter(pa.array(part_b == q)) for q in range(parts)]
    return out if parts > 1 else out[0]


def join_second(parts: int, block_rows: int, n_texts: int, *tables: pa.Table) -> list[pa.Table] | pa.Table:
    """One part of id_b: text_b attached to the pairs from every join_first, cut into tables (pair, text_a,
    text_b) of `block_rows` pairs, the last one shorter. `tables` holds this part's `n_texts` text tables,
    then those pairs. A single block is returned as the table itself."""
    pairs = pa.concat_tables(tables[n_texts:])
    joined = _attach(pairs, "pos_b", "text_b", parts, tables[:n_texts]).drop_columns(["pos_b"])
    blocks = max(1, math.ceil(joined.num_rows / block_rows))
    out = [joined.slice(k * block_rows, block_rows) for k in range(blocks)]
    return out if blocks > 1 else out[0]


def join_texts(
    pairs: pa.Table, wanted: pa.Array, shards: list[Shard], spec: ReadSpec, parts: int, block_rows: int, where: str,
    cuts: pa.Table | None = None,
) -> list:
    """Blocks (pair, text_a, text_b) of every pair, as object refs, computed on the cluster in use.

    `pairs` holds pair, id_a, id_b; `cuts`, for pairs of chunks, where each wanted id's text is
    (pick_texts). An id that is not in the input, or that is on
    several of its rows, is an InputError naming how many and one of them,
    raised before any pair is joined.
    """
    import ray

    pick = ray.remote(num_cpus=TASK_CPUS, num_returns=parts + 1)(pick_texts)
    wanted_ref = ray.put(wanted)
    cuts_ref = ray.put(cuts)
    groups = pack_shards(shards, PICK_ROWS)  # no task per small file
    picked = [pick.remote(group, spec, wanted_ref, parts, cuts_ref) for group in groups]
    found = np.concatenate(ray.get([refs[-1] for refs in picked]) or [np.zeros(0, np.int64)])
    _check_found(found, wanted, where, cuts_unknown=cuts is None)

    pos_a = pc.index_in(pairs["id_a"], value_set=wanted).to_numpy()
    pos_b = pc.index_in(pairs["id_b"], value_set=wanted).to_numpy()
    keyed = pa.table({"pair": pairs["pair"], "pos_a": pos_a, "pos_b": pos_b})
    first = ray.remote(num_cpus=TASK_CPUS, num_returns=parts)(join_first)
    second = ray.remote(num_cpus=TASK_CPUS)(join_second)
    firsts = [
        _as_list(first.remote(parts, keyed.filter(pa.array(pos_a % parts == p)), *[refs[p] for refs in picked]))
        for p in range(parts)
    ]
    blocks = []
    for q in range(parts):
        count = int((pos_b % parts == q).sum())
        if count == 0:
            continue
        refs = second.options(num_returns=math.ceil(count / block_rows)).remote(
            parts, block_rows, len(picked), *[refs[q] for refs in picked], *[f[q] for f in firsts]
        )
        blocks += _as_list(refs)
    return blocks


def _as_list(refs) -> list:
    return refs if isinstance(refs, list) else [refs]


def _check_found(found: np.ndarray, wanted: pa.Array, where: str, cuts_unknown: bool = True) -> None:
    counts = np.bincount(found, minlength=len(wanted))
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        example = wanted[int(missing[0])].as_py()
        chunk = "#" in example and cuts_unknown
        raise InputError(
            f"{where}: {len(missing):,} of the {len(wanted):,} ids named by the pairs are not in it "
            f"(e.g. {example!r}), or have empty text; "
            + ("if they are chunks (embed --chunk-tokens), give --embeddings, the output they were mined from"
               if chunk else "were the pairs mined from this input's vectors, with the same --id-field?")
        )
    repeated = np.flatnonzero(counts > 1)
    if len(repeated):
        first = int(repeated[0])
        raise InputError(
            f"{where}: id {wanted[first].as_py()!r} is on {counts[first]} rows ({len(repeated):,} ids repeated); "
            "a pair's texts must be unambiguous: use an --id-field with unique values"
        )
