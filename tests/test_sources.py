"""Discovery and reading of every input format, without Ray."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.storage.sources import Group, ReadSpec, discover_shards, read_chunks

SPEC = ReadSpec("text", None, (), "strict", {})


def rows_of(shard, spec=SPEC, rows_per_file=1000, committed=frozenset()):
    """A shard's rows in file order: chunks come longest text first, and `_row` is what restores the order."""
    tables = list(read_chunks(shard, spec, rows_per_file, committed))
    return pa.concat_tables(tables).sort_by("_row").to_pylist() if tables else []


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


def test_each_chunk_comes_longest_text_first_with_its_file_row(tmp_path):
    path = tmp_path / "mixed.txt"
    texts = ["a", "ccc", "", "bb", "dddd", "e"]
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    (shard,) = discover_shards(str(path))
    chunks = [t.to_pylist() for t in read_chunks(shard, SPEC, 3, frozenset())]
    assert [[r["text"] for r in c] for c in chunks] == [["ccc", "a", ""], ["dddd", "bb", "e"]]
    assert [[r["_row"] for r in c] for c in chunks] == [[1, 0, 2], [4, 3, 5]]
    assert all(r["id"] == f"mixed.txt:{r['_row']}" for c in chunks for r in c)


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
    assert Group((shard,)).file_name(0, multi=False) == "big.txt.parquet"
    assert [t["_last"][0].as_py() for t in tables] == [False, False, True]
    skipped = list(read_chunks(shard, SPEC, 10, frozenset({"big.txt-00001.parquet"})))
    assert [t["_row"][0].as_py() for t in skipped] == [0, 20]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "bad.jsonl: line 2 is not valid JSON"),
        ("notext.jsonl", '{"body": "no text"}\n', "has no field 'text' (set --text-field)"),
        ("num.jsonl", '{"text": 5}\n', "field 'text' is a int, expected a string"),
        ("header.csv", "text,k\n", "header.csv: the file is empty (no rows)"),
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


# --------------------------------------------------------------------------- bad input, format by format
# (tests/test_bad_input.py runs one of each kind through the CLI and Ray)


def shard_of(tmp_path, name: str, content: bytes):
    (tmp_path / name).write_bytes(content)
    return discover_shards(str(tmp_path / name))[0]


def parquet_file(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_a_zero_byte_file_is_refused_while_discovering(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty.jsonl: the file is empty \(0 bytes\)"):
        discover_shards(str(tmp_path / "empty.jsonl"))


def test_a_codec_that_is_not_installed_is_refused_while_discovering(tmp_path, monkeypatch):
    import fsspec.utils

    monkeypatch.delitem(fsspec.utils.compressions, "zst", raising=False)  # as without the zstandard package
    (tmp_path / "docs.txt.zst").write_bytes(b"(\xb5/\xfd not really")
    with pytest.raises(InputError, match=r"docs.txt.zst: no .zst codec installed \(for .zst: pip install zstandard\)"):
        discover_shards(str(tmp_path / "docs.txt.zst"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notext.csv", b"body,n\nx,1\n",
         "notext.csv: no column 'text' (set --text-field); columns are ['body', 'n']"),
        ("notext.parquet", parquet_file(pa.table({"body": ["x"]})),
         "notext.parquet: no column 'text' (set --text-field)"),
        # a schema without the column is named as such even when the file has no rows
        ("none.parquet", parquet_file(pa.table({"body": pa.array([], pa.string())})), "none.parquet: no column 'text'"),
        ("bytes.parquet", parquet_file(pa.table({"text": [b"x"]})),
         "bytes.parquet: column 'text' has type binary, expected strings"),
        ("bad.json", b'[{"text": "a"},\n {"text": }]', "bad.json: line 2 is not valid JSON"),
        ("latin1.json", b'[{"text": "a"},\n {"text": "caf\xe9"}]', "latin1.json: line 2 is not valid UTF-8"),
        ("cut.txt.gz", gzip.compress(b"line\n" * 1000)[:-40], "cut.txt.gz: cannot read (Compressed file ended"),
        ("noise.jsonl.gz", b"\x1f\x8b" + bytes(range(200)), "noise.jsonl.gz: cannot read"),
        ("blank-lines.jsonl", b'{"text": "a"}\n\n\n{"body": "b"}\n', "blank-lines.jsonl: line 4 has no field 'text'"),
    ],
)
def test_bad_files_name_the_file_and_the_place(tmp_path, name, content, message):
    shard = shard_of(tmp_path, name, content)
    with pytest.raises(InputError) as info:
        rows_of(shard)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_id_and_keep_columns_name_their_flag(tmp_path):
    shard = shard_of(tmp_path, "a.jsonl", b'{"text": "x", "doc": "D1"}\n{"text": "y", "doc": null}\n')
    with pytest.raises(InputError, match=r"a.jsonl: line 1 has no field 'n' \(see --keep-columns\)"):
        rows_of(shard, ReadSpec("text", None, ("n",), "strict", {}))
    with pytest.raises(InputError, match=r"a.jsonl: row 1 has no value in --id-field 'doc'"):
        rows_of(shard, ReadSpec("text", "doc", (), "strict", {}))
    csv = shard_of(tmp_path, "b.csv", b"text\nx\n")
    with pytest.raises(InputError, match=r"b.csv: no column 'doc' \(set --id-field\)"):
        rows_of(csv, ReadSpec("text", "doc", (), "strict", {}))


LATIN1_STRINGS = pa.array(["ok".encode(), "caf\xe9".encode("latin-1")], pa.binary()).view(pa.string())


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("latin1.csv", b"text,k\nok,1\ncaf\xe9,2\n", "latin1.csv: row 1, column 'text', is not valid UTF-8"),
        ("kept.csv", b"text,k\nok,caf\xe9\n", "kept.csv: row 0, column 'k', is not valid UTF-8"),
        # Parquet and Arrow readers do not check UTF-8; unchecked bytes would fail later, in a worker
        ("latin1.parquet", parquet_file(pa.table({"text": LATIN1_STRINGS, "k": ["1", "2"]})),
         "latin1.parquet: row 1, column 'text'"),
    ],
)
def test_invalid_utf8_in_columns_names_the_row_unless_replaced(tmp_path, name, content, message):
    shard = shard_of(tmp_path, name, content)
    with pytest.raises(InputError) as info:
        rows_of(shard, ReadSpec("text", None, ("k",), "strict", {}))
    assert message in str(info.value) and "--encoding-errors replace" in str(info.value)
    rows = rows_of(shard, ReadSpec("text", None, ("k",), "replace", {}))
    assert "\ufffd" in "".join(str(r["text"]) + str(r["k"]) for r in rows)
    assert all(r["_valid"] for r in rows)


INVALID = ReadSpec("text", None, (), "strict", {}, on_invalid="error")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.txt", b"one\ntwo\n\nfour\n", "a.txt: row 2 (line 3) has empty text"),
        ("b.jsonl", b'{"text": "x"}\n\n{"text": null}\n', "b.jsonl: row 1 (line 3) has null text"),
        ("c.csv", b'text\nx\n" "\n', "c.csv: row 1 has blank text"),
        ("d.parquet", parquet_file(pa.table({"text": ["x", "y", None]})), "d.parquet: row 2 has null text"),
        ("e.json", b'[{"text": "x"}, {"text": "\\t"}]', "e.json: row 1 has blank text"),
    ],
)
def test_on_invalid_error_names_shard_and_row(tmp_path, name, content, message):
    shard = shard_of(tmp_path, name, content)
    with pytest.raises(InputError) as info:
        rows_of(shard, INVALID)
    assert str(info.value) == f"{message}; use --on-invalid skip to skip such rows and count them"
    assert [r["_valid"] for r in rows_of(shard)].count(False) == 1  # skipped (and counted) by default


def test_on_invalid_error_counts_rows_across_read_batches(tmp_path, monkeypatch):
    import pipeline.storage.formats as formats

    monkeypatch.setattr(formats, "READ_BATCH_ROWS", 4)
    shard = shard_of(tmp_path, "long.txt", b"".join(b"doc %d\n" % i for i in range(9)) + b"  \n")
    with pytest.raises(InputError, match=r"long.txt: row 9 \(line 10\) has blank text"):
        rows_of(shard, INVALID)


def test_a_broken_datasets_directory_is_named(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "ds" / "state.json").write_text('{"_data_files": [{"file": "x"}]}')
    with pytest.raises(InputError, match=r"ds/state.json: not a valid `datasets` metadata file \(KeyError"):
        discover_shards(str(tmp_path / "ds"))


def test_a_group_is_done_without_reading_it_when_its_files_show_its_end():
    from pipeline.storage.sources import Shard, group_done

    shard = Shard(key="docs/a.txt", path="/x/docs/a.txt", format="txt", size=1)
    one = {"docs__a.txt.parquet": {"rows": 7}}
    assert group_done(shard, one, 10)
    assert not group_done(shard, {}, 10)
    parts = {f"docs__a.txt-{k:05d}.parquet": {"rows": r, "last": k == 2} for k, r in enumerate([10, 10, 10])}
    assert group_done(shard, parts, 10)  # file 2 says it is the last
    assert not group_done(shard, {k: v for k, v in parts.items() if "00001" not in k}, 10)  # a gap
    assert not group_done(shard, {k: v for k, v in parts.items() if "00002" not in k}, 10)  # file 1 is not the last
    assert not group_done(shard, {**parts, "docs__a.txt-00002.parquet": None}, 10)  # no statistics to tell
    # files of versions before `last`: a short file ends a shard; a full one cannot tell
    old = {f"docs__a.txt-{k:05d}.parquet": {"rows": r} for k, r in enumerate([10, 10, 4])}
    assert group_done(shard, old, 10)
    assert not group_done(shard, {k: v for k, v in old.items() if "00002" not in k}, 10)
    packed = Group((shard, Shard(key="docs/b.txt", path="/x/docs/b.txt", format="txt", size=1)))
    assert packed.file_name(0, multi=True) == "docs__a.txt+1-00000.parquet"
    assert not group_done(packed, {"docs__a.txt+1-00000.parquet": {"rows": 4}}, 10)  # a short file is no end here


@pytest.mark.slow  # three runs (~40 s); group_done's rule is checked above in make test
def test_a_resume_reads_only_the_shards_it_still_needs(ray_cluster, tmp_path, tiny_model):
    from pipeline import EmbedConfig, read_embeddings
    from pipeline.commands.embed import run_embed
    from pipeline.storage.packing import pack_shards
    from tests.conftest import committed, write_lines

    src = tmp_path / "in"
    src.mkdir()
    # twelve small shards of 4 lines (~600 bytes): packed four to a group (rows_per_file 10 x 256 bytes), each
    # group cut into two files of two shards; t.txt (20 lines, ~3 KB) is a group of its own, two full files
    sizes = {**{f"s{k:02d}.txt": 4 for k in range(12)}, "t.txt": 20}
    for name, n in sizes.items():
        write_lines(src / name, [f"{name} line {i} " + "word " * 27 for i in range(n)])
    groups = pack_shards(discover_shards(str(src)), 10)
    assert len(groups) >= 3 and sum(g.packed for g in groups) >= 2 and [s.key for s in groups[-1].shards] == ["t.txt"]
    out = tmp_path / "out"
    config = EmbedConfig(input=str(src), output=str(out), model=tiny_model, rows_per_file=10, num_encoders=1,
                         quiet=True)
    first = run_embed(config)
    assert first.manifest["shards_read"] == len(sizes)
    plan = json.loads((out / "_plan.json").read_text())
    assert [[entry[0] for entry in group] for group in plan["groups"]] == [[s.key for s in g.shards] for g in groups]
    target = groups[1]  # a packed group in the middle: delete the first of its files
    files = sorted(f for f in committed(out) if f.startswith(f"{target.stem}-"))
    assert len(files) >= 2 and files[0] == target.file_name(0, multi=True), files
    (out / files[0]).unlink()
    before = committed(out)
    resumed = run_embed(config)
    # only that group is read again (its other files are skipped, not rewritten); every other group is done,
    # t.txt too, whose full last file says it is the last
    assert resumed.manifest["shards_read"] == len(target.shards) and resumed.files_written == 1
    after = committed(out)
    assert set(after) == set(before) | {files[0]} and {f: after[f] for f in before} == before
    (out / "t.txt-00000.parquet").unlink()  # a shard cut into several files, one of them missing
    again = run_embed(config)
    assert again.manifest["shards_read"] == 1 and again.files_written == 1
    ids, _ = read_embeddings(str(out))
    assert len(ids) == len(set(ids)) == sum(sizes.values())
