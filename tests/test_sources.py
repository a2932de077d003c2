"""Discovery and reading of every input format, without Ray."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.sources import ReadSpec, chunk_file_name, discover_shards, read_chunks

SPEC = ReadSpec("text", None, (), "strict", {})


def rows_of(shard, spec=SPEC, rows_per_file=1000, committed=frozenset()):
    tables = list(read_chunks(shard, spec, rows_per_file, committed))
    return pa.concat_tables(tables).to_pylist() if tables else []


def make_inputs(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("one\ntwo\n\nfour\n", encoding="utf-8")
    (d / "b.jsonl").write_text('{"text": "x", "k": 1}\n\n{"text": null, "k": 2}\n{"text": "z", "k": 3}\n')
    (d / "c.json").write_text(json.dumps([{"text": "arr0", "k": 1}, {"text": "arr1", "k": 2}]))
    (d / "sub" / "d.csv").write_text('text,k\n"multi\nline",1\nplain,2\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["p0", "p1", "p2"], "k": [1, 2, 3]}), d / "sub" / "e.parquet")
    with gzip.open(d / "f.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gz0\ngz1\n")
    (d / "_ignored.txt").write_text("hidden\n")
    (d / "notes.md").write_text("not an input\n")
    return d


def test_directory_discovery_and_every_format(tmp_path):
    d = make_inputs(tmp_path)
    shards = discover_shards(str(d))
    assert [s.key for s in shards] == ["a.txt", "b.jsonl", "c.json", "f.txt.gz", "sub/d.csv", "sub/e.parquet"]
    got = {s.key: rows_of(s) for s in shards}
    assert [r["text"] for r in got["a.txt"]] == ["one", "two", "", "four"]
    assert [r["_valid"] for r in got["a.txt"]] == [True, True, False, True]
    assert [r["id"] for r in got["a.txt"]] == ["a.txt:0", "a.txt:1", "a.txt:2", "a.txt:3"]
    assert [r["_valid"] for r in got["b.jsonl"]] == [True, False, True]  # null text is skipped, not "None"
    assert [r["text"] for r in got["c.json"]] == ["arr0", "arr1"]
    assert [r["text"] for r in got["sub/d.csv"]] == ["multi\nline", "plain"]
    assert [r["id"] for r in got["sub/e.parquet"]] == ["sub/e.parquet:0", "sub/e.parquet:1", "sub/e.parquet:2"]
    assert [r["text"] for r in got["f.txt.gz"]] == ["gz0", "gz1"]
    assert all(r["_file"] == "sub__d.csv.parquet" for r in got["sub/d.csv"])


def test_glob_and_single_file(tmp_path):
    d = make_inputs(tmp_path)
    assert [s.key for s in discover_shards(str(d / "sub" / "*"))] == ["d.csv", "e.parquet"]
    assert [s.key for s in discover_shards(str(d / "a.txt"))] == ["a.txt"]


def test_id_field_and_keep_columns(tmp_path):
    d = make_inputs(tmp_path)
    shard = next(s for s in discover_shards(str(d)) if s.key == "sub/e.parquet")
    rows = rows_of(shard, ReadSpec("text", "k", ("k",), "strict", {}))
    assert [r["id"] for r in rows] == ["1", "2", "3"] and [r["k"] for r in rows] == [1, 2, 3]


def test_huggingface_save_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"sentence": ["hf0", "hf1", "hf2"]}).save_to_disk(str(tmp_path / "ds"))
    shards = discover_shards(str(tmp_path / "ds"))
    assert len(shards) == 1 and shards[0].format == "arrow"
    rows = rows_of(shards[0], ReadSpec("sentence", None, (), "strict", {}))
    assert [r["text"] for r in rows] == ["hf0", "hf1", "hf2"]


def test_big_shard_is_cut_into_chunks_with_stable_names(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"line {i}\n" for i in range(25)))
    shard = discover_shards(str(path))[0]
    tables = list(read_chunks(shard, SPEC, 10, frozenset()))
    assert [t.num_rows for t in tables] == [10, 10, 5]
    assert [t["_file"][0].as_py() for t in tables] == ["big.txt-00000.parquet", "big.txt-00001.parquet", "big.txt-00002.parquet"]
    assert chunk_file_name(shard, 0, multi=False) == "big.txt.parquet"
    skipped = list(read_chunks(shard, SPEC, 10, frozenset({"big.txt-00001.parquet"})))
    assert [t["_row"][0].as_py() for t in skipped] == [0, 20]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "bad.jsonl: line 2 is not valid JSON"),
        ("notext.jsonl", '{"body": "no text"}\n', "has no field 'text' (set --text-field)"),
        ("num.jsonl", '{"text": 5}\n', "field 'text' is a int, expected a string"),
        ("empty.txt", "", "empty.txt: the file is empty"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    shard = discover_shards(str(tmp_path / name))[0]
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rows_of(shard)


def test_invalid_utf8_is_an_error_unless_replaced(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    shard = discover_shards(str(tmp_path / "latin1.txt"))[0]
    with pytest.raises(InputError, match="latin1.txt: line 1 is not valid UTF-8"):
        rows_of(shard)
    assert rows_of(shard, ReadSpec("text", None, (), "replace", {}))[0]["text"] == "caf\ufffd"


def test_corrupt_parquet(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    shard = discover_shards(str(tmp_path / "broken.parquet"))[0]
    with pytest.raises(InputError, match="broken.parquet: cannot read parquet"):
        rows_of(shard)


@pytest.mark.parametrize("pattern", ["missing-dir", "nothing-*.txt"])
def test_input_that_matches_nothing(tmp_path, pattern):
    with pytest.raises(InputError, match="no such file|matches no files"):
        discover_shards(str(tmp_path / pattern))


def test_directory_without_supported_files(tmp_path):
    (tmp_path / "x.md").write_text("hi")
    with pytest.raises(InputError, match="no files of a supported type"):
        discover_shards(str(tmp_path))
