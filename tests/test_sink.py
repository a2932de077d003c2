"""pipeline.storage.sink without a Ray cluster: a chunk split across blocks is written as pieces by
`commit_block`, as an encoder does, and joined by `merge_pieces`, as the driver does (pipeline.engine.chain)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.storage.sink import PIECES_DIR, SinkSpec, commit_block, merge_pieces, read_file_stats
from pipeline.storage.filesystems import get_fs

DIM = 3
SHARD = "docs.txt"
NAME = "docs-00000.parquet"
INVALID_ROW = 4  # a blank text: counted, never written


def chunk_block(rows: list[int], chunk_rows: int, name: str = NAME) -> pa.Table:
    """A block as it reaches the sink (read_chunks, TokenizeStage, EncodeStage): the rows `rows`
    of chunk `name`, in the order given (the tokenizer sorts a block longest first)."""
    valid = [r != INVALID_ROW for r in rows]
    vectors = np.array([[r, r + 0.5, -r] if ok else [0, 0, 0] for r, ok in zip(rows, valid)], np.float32)
    return pa.table({
        "id": [f"{SHARD}:{r}" for r in rows],
        "title": [f"title {r}" for r in rows],
        "_valid": valid,
        "_row": pa.array(rows, pa.int64()),
        "_shard": [SHARD] * len(rows),
        "_file": [name] * len(rows),
        "_chunk_rows": pa.array([chunk_rows] * len(rows), pa.int64()),
        "_n_tokens": pa.array([r + 2 if ok else 0 for r, ok in zip(rows, valid)], pa.int32()),
        "_truncated": [r == 1 for r in rows],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
    })


@pytest.fixture
def sink(tmp_path) -> SinkSpec:
    return SinkSpec(output=str(tmp_path / "out"), text_field="text", keep_columns=("title",))


def write_pieces(sink: SinkSpec, *blocks: list[int], chunk_rows: int = 6, name: str = NAME) -> None:
    for rows in blocks:
        summary = commit_block(chunk_block(rows, chunk_rows, name), sink)
        assert summary["kind"].to_pylist() == ["piece"]  # not the whole chunk: no final file yet
    assert not os.path.exists(os.path.join(sink.output, name))


def pieces_dir(sink: SinkSpec, name: str = NAME) -> str:
    return os.path.join(sink.output, PIECES_DIR, name)


def test_pieces_are_joined_in_row_order(sink):
    write_pieces(sink, [5, 3, 4], [2, 0, 1])  # the later rows arrive first, each block out of order
    stats = merge_pieces(sink, NAME, 6)
    table = pq.read_table(os.path.join(sink.output, NAME))
    assert table.column_names == ["id", "embedding", "title"]  # no private column reaches the file
    kept = [0, 1, 2, 3, 5]  # row 4 is invalid
    assert table["id"].to_pylist() == [f"{SHARD}:{r}" for r in kept]
    assert table["title"].to_pylist() == [f"title {r}" for r in kept]
    np.testing.assert_array_equal(np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
                                  np.array([[r, r + 0.5, -r] for r in kept], np.float32))
    assert stats == {"file": NAME, "shard": SHARD, "last_shard": SHARD, "shards": 1, "last": None, "rows": 6, "embedded": 5, "invalid": 1, "truncated": 1,
                     "tokens": sum(r + 2 for r in kept), "chunks": 5, "max_chunks": 1}
    fs, root = get_fs(sink.output)
    assert read_file_stats(fs, os.path.join(root, NAME)) == stats  # the footer the resume reads


def test_a_row_that_arrives_twice_is_kept_once(sink):
    # rows 2 and 3 twice: a block redone after a worker died, cut differently the second time
    write_pieces(sink, [0, 1, 2, 3], [3, 2, 5, 4])
    assert len(os.listdir(pieces_dir(sink))) == 2
    stats = merge_pieces(sink, NAME, 6)
    ids = pq.read_table(os.path.join(sink.output, NAME))["id"].to_pylist()
    assert ids == [f"{SHARD}:{r}" for r in (0, 1, 2, 3, 5)]
    assert stats["rows"] == 6 and stats["embedded"] == 5 and stats["invalid"] == 1


def test_a_chunk_that_lacks_rows_is_an_error_and_writes_no_file(sink):
    write_pieces(sink, [0, 1, 2], [5, 4])  # row 3 never arrived
    with pytest.raises(PipelineError, match=rf"^{NAME}: 5 of 6 rows reached the sink; rerun to redo this file$"):
        merge_pieces(sink, NAME, 6)
    assert sorted(os.listdir(sink.output)) == [PIECES_DIR]  # no final file, no temporary file either


def test_the_pieces_folder_is_removed_after_the_join_and_only_that_one(sink):
    other = "docs-00001.parquet"
    write_pieces(sink, [0, 1, 2], [3, 4, 5])
    write_pieces(sink, [0, 1], name=other, chunk_rows=4)
    merge_pieces(sink, NAME, 6)
    assert not os.path.exists(pieces_dir(sink))
    assert os.listdir(pieces_dir(sink, other)) == ["000000000000.arrow"]  # another chunk's pieces stay
    assert sorted(os.listdir(sink.output)) == [PIECES_DIR, NAME]


def test_a_whole_chunk_in_one_block_is_written_straight_to_its_name(sink):
    summary = commit_block(chunk_block([2, 0, 1], 3), sink)
    assert summary["kind"].to_pylist() == ["file"] and summary["rows"].to_pylist() == [3]
    assert sorted(os.listdir(sink.output)) == [NAME]  # no piece, no temporary file
    assert pq.read_table(os.path.join(sink.output, NAME))["id"].to_pylist() == [f"{SHARD}:{r}" for r in (0, 1, 2)]


def test_a_file_of_chunks_is_joined_only_once_every_chunk_of_every_document_is_there():
    """Documents' chunks spread over pieces (TokenizeStage hands chunks on in blocks): the file is
    whole when its pieces hold its documents' first chunks and as many rows as those documents have
    chunks, whatever the order the pieces come in, a piece that comes twice counted once."""
    from pipeline.engine.chain import FileTracker

    import concurrent.futures

    tracker = FileTracker(None, spread=False)
    joined = []

    def join(sink, name, rows, board):  # a join that has ended at once
        joined.append((name, rows))
        done = concurrent.futures.Future()
        done.set_result({"file": name, "rows": rows})
        return done

    tracker._join = join
    tracker._threads.shutdown()

    def piece(first_row, rows, docs, doc_chunks):  # a file of 2 documents: A has 3 chunks, B 1
        tracker.add({"kind": "piece", "file": "f.parquet", "chunk_rows": 2, "first_row": first_row, "rows": rows,
                     "docs": docs, "doc_chunks": doc_chunks})

    piece(0, 2, 1, 3)  # A#0, A#1: A's first chunk counts A and its 3 chunks
    piece(0, 2, 1, 3)  # the same piece again (a retried block)
    piece(3, 1, 1, 1)  # B#0: both documents seen, 3 rows of 4
    assert joined == []  # A#2 is missing
    piece(2, 1, 0, 0)  # A#2
    assert joined == [("f.parquet", 2)]
    assert tracker.written == {"f.parquet": {"file": "f.parquet", "rows": 2}}  # counted once ended, not at the end
    assert tracker.finish() == {"f.parquet": {"file": "f.parquet", "rows": 2}} and joined == [("f.parquet", 2)]


def test_a_separate_writer_gets_even_a_whole_chunk_as_pieces_and_builds_the_same_file(tmp_path):
    """--writer separate: the encoder's process builds no file; the join makes the file the encoder would have."""
    by_encoder = SinkSpec(output=str(tmp_path / "a"), text_field="text", keep_columns=("title",))
    separate = SinkSpec(output=str(tmp_path / "b"), text_field="text", keep_columns=("title",), separate=True)
    assert commit_block(chunk_block([2, 0, 1], 3), by_encoder)["kind"].to_pylist() == ["file"]
    summary = commit_block(chunk_block([2, 0, 1], 3), separate)
    assert summary["kind"].to_pylist() == ["piece"] and summary["rows"].to_pylist() == [3]
    assert os.listdir(separate.output) == [PIECES_DIR]  # nothing final yet
    stats = merge_pieces(separate, NAME, 3)
    assert sorted(os.listdir(separate.output)) == [PIECES_DIR, NAME] and not os.path.exists(pieces_dir(separate))
    a, b = (pq.read_table(os.path.join(s.output, NAME)) for s in (by_encoder, separate))
    assert a.equals(b) and a.schema.metadata == b.schema.metadata
    fs, root = get_fs(separate.output)
    assert stats == read_file_stats(fs, os.path.join(root, NAME))
