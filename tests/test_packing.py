"""Groups of small shards (pipeline.storage.packing), one listing, a file as a document: without Ray."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pytest

from pipeline.errors import InputError
from pipeline.storage.discovery import Shard
from pipeline.storage.filesystems import get_fs
from pipeline.storage.packing import (
    PLAN_FILE, Group, group_bytes, pack_shards, planned_groups, read_plan, write_plan,
)
from pipeline.storage.sources import ReadSpec, discover_shards, read_chunks

SPEC = ReadSpec("text", None, (), "strict", {})


def shard(key: str, size: int) -> Shard:
    return Shard(path=f"/in/{key}", key=key, format="txt", size=size)


def test_small_shards_are_packed_by_bytes_in_key_order_and_a_big_one_stays_alone():
    budget = group_bytes(10)  # 10 rows x ROW_BYTES
    shards = [shard("a", budget // 2), shard("b", budget // 2), shard("c", 1), shard("d", budget * 3), shard("e", 5)]
    groups = pack_shards(shards, 10)
    assert [[s.key for s in g.shards] for g in groups] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [g.stem for g in groups] == ["a+1", "c", "d", "e"]
    assert groups[0].file_name(0, multi=False) == "a+1.parquet" and groups[0].file_name(3, True) == "a+1-00003.parquet"
    assert groups[2].file_name(1, multi=True) == "d-00001.parquet"  # a group of one shard keeps the shard's names


def write_small(directory, counts: dict[str, int]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    ids = []
    for name, n in counts.items():
        (directory / name).write_text("".join(f"{name} line {i}\n" for i in range(n)))
        ids += [f"{name}:{i}" for i in range(n)]
    return ids


def test_a_packed_group_is_cut_between_shards_and_a_long_small_shard_within_itself(tmp_path):
    ids = write_small(tmp_path / "in", {"a.txt": 4, "b.txt": 4, "c.txt": 3, "d.txt": 12, "e.txt": 2})
    group = Group(tuple(discover_shards(str(tmp_path / "in"))))
    tables = list(read_chunks(group, SPEC, 10, frozenset()))
    names = [t["_file"][0].as_py() for t in tables]
    assert names == [f"a.txt+4-{k:05d}.parquet" for k in range(4)]
    per_file = [sorted(set(t["_shard"].to_pylist())) for t in tables]
    # a+b+c = 11 rows > 10: c starts the next file; d (12 rows) alone is cut after 10; e follows d's rest
    assert per_file == [["a.txt", "b.txt"], ["c.txt"], ["d.txt"], ["d.txt", "e.txt"]]
    assert [t.num_rows for t in tables] == [8, 3, 10, 4]
    assert [t["_last"][0].as_py() for t in tables] == [False, False, False, True]
    assert [t["_chunk_rows"][0].as_py() for t in tables] == [8, 3, 10, 4]
    rows = pa.concat_tables(tables).sort_by("_row")
    assert rows["_row"].to_pylist() == list(range(len(ids)))  # counted across the group: unique in every file
    assert rows["id"].to_pylist() == ids  # ids stay the shard's own
    # committed files are skipped, the others cut in the same places
    again = list(read_chunks(group, SPEC, 10, frozenset({"a.txt+4-00001.parquet"})))
    assert [t["_file"][0].as_py() for t in again] == ["a.txt+4-00000.parquet", "a.txt+4-00002.parquet", "a.txt+4-00003.parquet"]


def test_a_packed_group_that_fits_one_file_is_named_without_a_number(tmp_path):
    write_small(tmp_path / "in", {"a.txt": 2, "b.txt": 2})
    group = Group(tuple(discover_shards(str(tmp_path / "in"))))
    (table,) = read_chunks(group, SPEC, 10, frozenset())
    assert table["_file"][0].as_py() == "a.txt+1.parquet" and table["_last"][0].as_py()


def test_an_empty_shard_in_a_group_is_named(tmp_path):
    write_small(tmp_path / "in", {"a.txt": 2})
    (tmp_path / "in" / "b.jsonl").write_text("\n\n")  # bytes, but no record
    group = Group(tuple(discover_shards(str(tmp_path / "in"))))
    with pytest.raises(InputError, match=r"^b.jsonl: the file is empty \(no rows\)$"):
        list(read_chunks(group, SPEC, 10, frozenset()))


# --------------------------------------------------------------------------- the plan across runs


def planned(tmp_path, shards, committed, pack=True):
    fs, root = get_fs(str(tmp_path))
    return planned_groups(fs, root, shards, 10, committed, pack)


def test_a_fresh_output_packs_and_an_unbound_plan_is_made_again(tmp_path):
    shards = [shard("a", 10), shard("b", 10)]
    groups, write = planned(tmp_path, shards, {})
    assert [g.stem for g in groups] == ["a+1"] and write
    fs, root = get_fs(str(tmp_path))
    write_plan(fs, root, [Group((s,)) for s in shards], 10)  # a killed run's plan, with nothing committed
    assert [g.stem for g in planned(tmp_path, shards, {})[0]] == ["a+1"]  # binds nothing
    assert [g.stem for g in planned(tmp_path, shards, {}, pack=False)[0]] == ["a", "b"]  # --no-pack-files


def test_an_output_without_a_plan_keeps_one_group_per_shard(tmp_path):
    shards = [shard("a", 10), shard("b", 10)]
    groups, write = planned(tmp_path, shards, {"a.parquet": {"rows": 3}})  # committed by a version without plans
    assert [g.stem for g in groups] == ["a", "b"] and write


def test_a_stored_plan_is_kept_and_new_shards_become_new_groups(tmp_path):
    fs, root = get_fs(str(tmp_path))
    old = [shard("b", 10), shard("d", 10)]
    write_plan(fs, root, [Group(tuple(old))], 10)
    committed = {"b+1.parquet": {"rows": 5, "last": True}}
    shards = [shard("a", 10), shard("b", 10), shard("c", 10), shard("d", 10), shard("e", 10)]
    groups, write = planned(tmp_path, shards, committed)
    assert [[s.key for s in g.shards] for g in groups] == [["b", "d"], ["a", "c", "e"]]  # the old group as it was
    assert write
    assert read_plan(fs, root)["groups"] == [[["b", 10, ""], ["d", 10, ""]]]  # only the run writes it
    assert planned(tmp_path, old, committed) == ([Group(tuple(old))], False)  # nothing new: nothing to write


def test_a_changed_shard_of_an_unfinished_group_is_refused(tmp_path):
    fs, root = get_fs(str(tmp_path))
    write_plan(fs, root, [Group((shard("a", 10), shard("b", 10))), Group((shard("c", 999),))], 10)
    committed = {"a+1-00000.parquet": {"rows": 10, "last": False}, "c.parquet": {"rows": 3}}
    with pytest.raises(InputError, match=r"^b has changed size \(10 -> 11 bytes\) since this output planned its "
                                         r"files, and its group's files \(a\+1…, 2 shard\(s\)\) are only partly "
                                         r"committed: .*restore it, or use --overwrite"):
        planned(tmp_path, [shard("a", 10), shard("b", 11), shard("c", 999)], committed)
    with pytest.raises(InputError, match=r"^b is gone since"):
        planned(tmp_path, [shard("a", 10), shard("c", 999)], committed)


def test_a_shard_edited_to_the_same_size_is_seen_by_its_version(tmp_path):
    """One changed shard of a packed group moves every later cut: a same-size edit must be caught too
    (S3's ETag, a local file's mtime), or files would be skipped that now hold other rows."""
    fs, root = get_fs(str(tmp_path))
    old = [Shard(path="/in/a", key="a", format="txt", size=6, version="v1"), shard("b", 6), shard("c", 6)]
    write_plan(fs, root, [Group(tuple(old))], 10)
    committed = {"a+2-00000.parquet": {"rows": 3, "last": False}}
    edited = [Shard(path="/in/a", key="a", format="txt", size=6, version="v2"), shard("b", 6), shard("c", 6)]
    with pytest.raises(InputError, match=r"^a has changed \(its listing's ETag or modification time\) since"):
        planned(tmp_path, edited, committed)
    assert planned(tmp_path, old, committed)[0] == [Group(tuple(old))]  # the same version: kept


def test_a_changed_group_with_nothing_committed_is_planned_again(tmp_path):
    fs, root = get_fs(str(tmp_path))
    write_plan(fs, root, [Group((shard("a", 10), shard("b", 10))), Group((shard("c", 999),))], 10)
    committed = {"c.parquet": {"rows": 3}}  # the output is bound, but nothing of a+1 is committed
    groups, write = planned(tmp_path, [shard("a", 12), shard("c", 999), shard("d", 5)], committed)
    assert [g.stem for g in groups] == ["c", "a+1"] and write  # a (changed) and d (new) packed anew; b gone


def test_a_finished_group_whose_shards_changed_is_kept_with_a_warning(tmp_path, caplog):
    fs, root = get_fs(str(tmp_path))
    write_plan(fs, root, [Group((shard("a", 10), shard("b", 10))), Group((shard("c", 999),))], 10)
    committed = {"a+1.parquet": {"rows": 4, "last": True}, "c.parquet": {"rows": 3}}
    with caplog.at_level(logging.WARNING):
        groups, write = planned(tmp_path, [shard("a", 12), shard("c", 999)], committed)
    assert [g.stem for g in groups] == ["a+1", "c"] and not write
    assert "2 input shard(s) have changed or are gone since their files were committed, e.g. a (10 -> 12 bytes)" in caplog.text


def test_a_plan_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / PLAN_FILE).write_text(json.dumps({"groups": []}))
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match="not an embedpipe plan; use --overwrite"):
        planned(tmp_path, [shard("a", 1)], {"a.parquet": {"rows": 1}})


# --------------------------------------------------------------------------- one listing


def test_a_directory_is_listed_once_with_its_sizes(tmp_path, monkeypatch):
    import fsspec.implementations.local as local

    write_small(tmp_path / "in", {f"f{i}.txt": 1 for i in range(50)})
    (tmp_path / "in" / "_hidden.txt").write_text("x\n")
    (tmp_path / "in" / ".git").mkdir()
    (tmp_path / "in" / ".git" / "x.txt").write_text("x\n")
    calls = []
    monkeypatch.setattr(local.LocalFileSystem, "isfile", lambda self, p: calls.append(p) or False)
    shards = discover_shards(str(tmp_path / "in"))
    assert len(shards) == 50 and not [c for c in calls if c.endswith(".txt")]  # no request per file
    assert {s.size for s in shards} == {len("f0.txt line 0\n"), len("f10.txt line 0\n")}


# --------------------------------------------------------------------------- a file as one document


def test_packed_shards_with_ids_of_other_types_are_read_and_kept_columns_that_clash_are_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a", "id": 1, "k": 1}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "b", "id": "k1", "k": "x"}\n')
    group = Group(tuple(discover_shards(str(tmp_path))))
    rows = pa.concat_tables(read_chunks(group, ReadSpec("text", "id", (), "strict", {}), 10, frozenset()))
    assert sorted(rows["id"].to_pylist()) == ["1", "k1"]  # as each shard alone gives them
    with pytest.raises(InputError, match=r"^the shards a.jsonl .. b.jsonl: a kept column has types that do not go "
                                         r"together in one file \(.*\); give it one type, or use --no-pack-files"):
        list(read_chunks(group, ReadSpec("text", "id", ("k",), "strict", {}), 10, frozenset()))


def test_folder_markers_of_a_listing_are_not_files():
    from pipeline.storage.discovery import _files

    listing = {"b/in/sub/": {"type": "file", "size": 0}, "b/in/sub": {"type": "file", "size": 0},
               "b/in/sub/a.txt": {"type": "file", "size": 3, "ETag": '"e1"'}, "b/in/d": {"type": "directory", "size": 0}}
    assert _files(listing) == {"b/in/sub/a.txt": (3, "e1")}


def test_a_file_is_one_document_with_its_path_as_id(tmp_path):
    d = tmp_path / "docs"
    (d / "pkg").mkdir(parents=True)
    (d / "pkg" / "METADATA").write_text("Metadata-Version: 2.1\nName: pkg\n\nA package.\n")
    (d / "README.md").write_text("# Title\n\nSome *markdown*.\n")
    (d / "page.html").write_text("<p>html as text</p>")
    (d / "notes.rst").write_text("")  # empty: counted, not embedded
    (d / "data.jsonl").write_text('{"text": "skipped"}\n')  # not a text file: skipped
    (d / "app").mkdir()
    (d / "app" / "state.json").write_text("[]")  # not a `datasets` folder here: an app's state, skipped
    (d / "app" / "notes.txt").write_text("app notes")
    shards = discover_shards(str(d), documents=True)
    assert [(s.key, s.format) for s in shards] == [
        ("README.md", "document"), ("app/notes.txt", "document"), ("notes.rst", "document"), ("page.html", "document"),
        ("pkg/METADATA", "document")]
    rows = pa.concat_tables(read_chunks(Group(tuple(shards)), SPEC, 10, frozenset())).sort_by("_row").to_pylist()
    assert [(r["id"], r["text"], r["_valid"]) for r in rows] == [
        ("README.md", "# Title\n\nSome *markdown*.\n", True), ("app/notes.txt", "app notes", True), ("notes.rst", "", False),
        ("page.html", "<p>html as text</p>", True), ("pkg/METADATA", "Metadata-Version: 2.1\nName: pkg\n\nA package.\n", True)]


def test_a_document_that_is_not_utf8_follows_encoding_errors(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (shard_,) = discover_shards(str(tmp_path / "latin1.txt"), documents=True)
    with pytest.raises(InputError, match=r"^latin1.txt: byte 3 is not valid UTF-8 \(use --encoding-errors replace"):
        list(read_chunks(shard_, SPEC, 10, frozenset()))
    replace = ReadSpec("text", None, (), "replace", {})
    (table,) = read_chunks(shard_, replace, 10, frozenset())
    assert table["text"].to_pylist() == ["caf\ufffd au lait"] and table["id"].to_pylist() == ["latin1.txt"]


def test_document_mode_refuses_fields(tmp_path):
    from pipeline import EmbedConfig
    from pipeline.errors import UsageError

    with pytest.raises(UsageError, match="^--id-field: with --document-per-file a document is a whole file"):
        EmbedConfig(input="x", output="y", document_per_file=True, id_field="id")
    with pytest.raises(UsageError, match="^--keep-columns: with --document-per-file"):
        EmbedConfig(input="x", output="y", document_per_file=True, keep_columns=("title",))
    EmbedConfig(input="x", output="y", document_per_file=True, keep_columns=("text",))


def test_output_names_never_clash_nor_hide():
    from pipeline.storage.discovery import output_stem
    from pipeline.storage.packing import check_names
    assert output_stem("_a.txt") == "+_a.txt" and output_stem(".a.txt") == "+.a.txt"  # readers skip _ and . names
    assert output_stem("d/_a.txt") == "d___a.txt"
    ok = [Group((shard("a/b.txt", 1),)), Group((shard("a_b.txt", 1),))]
    assert check_names(ok) == ok
    with pytest.raises(InputError, match=r"inputs a/b.txt and a__b.txt would both write the output file a__b.txt"):
        check_names([Group((shard("a/b.txt", 1),)), Group((shard("a__b.txt", 1),))])
    with pytest.raises(InputError, match=r"inputs notes and notes-00001 would both write .*notes-00001.parquet"):
        check_names([Group((shard("notes", 1),)), Group((shard("notes-00001", 1),))])
    # `notes` wrote its one file `notes.parquet`: it owns no `notes-00001.parquet`
    assert check_names([Group((shard("notes", 1),)), Group((shard("notes-00001", 1),))], {"notes.parquet"})
    with pytest.raises(InputError, match=r"already holds files of one of them: use --overwrite"):
        check_names([Group((shard("a/b.txt", 1),)), Group((shard("a__b.txt", 1),))], {"a__b.txt.parquet"})
    packed = [Group((shard("k", 1), shard("l", 1))), Group((shard("k+1", 1),))]  # a file named like a packed group
    with pytest.raises(InputError, match=r"k and k\+1 would both write the output file k\+1.parquet"):
        check_names(packed)
