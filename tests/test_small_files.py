"""Corpora of many small files, end to end on Ray: packed output files, exactly once, a file as a document, S3."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline import EmbedConfig, read_embeddings
from pipeline.commands.embed import run_embed
from tests.conftest import assert_one_line_error, cli, cli_env, committed, kill_cli_when, run_main, snapshot


def tiny_shards(directory, count: int, rows: int = 2, prefix: str = "") -> list[str]:
    """`count` .txt files of `rows` lines in a two-level tree (as one file per record arrives); their ids."""
    ids = []
    for k in range(count):
        path = directory / f"part{k // 1000}" / f"{prefix}doc{k:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k} {i} " + "w " * ((k + i) % 3) + "\n" for i in range(rows)))  # ~25 bytes a file
        ids += [f"part{k // 1000}/{prefix}doc{k:05d}.txt:{i}" for i in range(rows)]
    return ids


@pytest.fixture(scope="module")
def many(ray_cluster, tmp_path_factory, tiny_model):
    """5,000 files of 2 lines, embedded once with --rows-per-file 1000: (input, output, ids, result)."""
    base = tmp_path_factory.mktemp("many")
    ids = tiny_shards(base / "in", 5000)
    config = EmbedConfig(input=str(base / "in"), output=str(base / "out"), model=tiny_model, rows_per_file=1000,
                         quiet=True)
    return base / "in", base / "out", ids, run_embed(config)


def test_5000_tiny_shards_make_ten_files_of_whole_shards_with_every_id_once(many):
    src, out, ids, result = many
    names = sorted(committed(out))
    # 5,000 files of ~25 bytes fit one group (rows_per_file x 256 bytes); cut between shards every 1,000 rows
    assert names == [f"part0__doc00000.txt+4999-{k:05d}.parquet" for k in range(10)]
    got, vectors = read_embeddings(str(out))
    assert sorted(got) == sorted(ids) and len(got) == len(set(got)) and vectors.shape == (10_000, 32)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["input"] == {"files": 5000, "bytes": manifest["input"]["bytes"], "groups": 1, "packed_groups": 1}
    assert [(f["rows"], f["shards"]) for f in manifest["files"]] == [(1000, 500)] * 10
    assert [f["last"] for f in manifest["files"]] == [False] * 9 + [True]
    first = manifest["files"][0]
    assert (first["shard"], first["last_shard"]) == ("part0/doc00000.txt", "part0/doc00499.txt")
    assert manifest["shards"] == [{"shard": "part0/doc00000.txt", "last_shard": "part4/doc04999.txt", "count": 5000,
                                   "files": names, "rows": 10_000, "embedded": 10_000}]
    assert len((out / "_manifest.json").read_bytes()) < 20_000  # compact: no entry per input file
    assert result.files_written == 10
    # each file holds whole shards: every shard's rows are in one file, in row order
    table = pq.read_table(out / names[3])
    assert table["id"].to_pylist() == [f"part{k // 1000}/doc{k:05d}.txt:{i}" for k in range(1500, 2000) for i in range(2)]


def test_a_complete_rerun_reads_nothing_and_new_files_become_a_new_group(many, tmp_path, tiny_model):
    src, out, ids, _ = many
    shutil.copytree(src, tmp_path / "in")
    shutil.copytree(out, tmp_path / "out")
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=tiny_model, rows_per_file=1000,
                         quiet=True)
    before = committed(tmp_path / "out")
    plan = json.loads((tmp_path / "out" / "_plan.json").read_text())
    again = run_embed(config)
    assert again.files_written == 0 and again.manifest["shards_read"] == 0
    new_ids = tiny_shards(tmp_path / "in", 30, prefix="new")  # the corpus grows between runs
    grown = run_embed(config)
    assert grown.files_written == 1 and grown.manifest["shards_read"] == 30
    after = committed(tmp_path / "out")
    assert {f: after[f] for f in before} == before  # the old groups' files are not touched
    assert set(after) - set(before) == {"part0__newdoc00000.txt+29.parquet"}
    stored = json.loads((tmp_path / "out" / "_plan.json").read_text())
    assert stored["groups"][:1] == plan["groups"] and len(stored["groups"]) == 2
    got, _ = read_embeddings(str(tmp_path / "out"))
    assert sorted(got) == sorted(ids + new_ids) and len(got) == len(set(got))
    assert grown.manifest["input"]["groups"] == 2 and grown.manifest["rows"]["embedded"] == len(ids) + 60


def test_a_shard_of_an_unfinished_group_changed_is_refused_in_one_line(many, tmp_path, capsys, tiny_model):
    src, out, _, _ = many
    shutil.copytree(src, tmp_path / "in")
    shutil.copytree(out, tmp_path / "out")
    name = sorted(committed(tmp_path / "out"))[-1]
    os.remove(tmp_path / "out" / name)  # as if the run had been killed before its last file
    os.remove(tmp_path / "out" / "_manifest.json")
    (tmp_path / "in" / "part4" / "doc04990.txt").write_text("this shard was edited since\n")
    before = snapshot(tmp_path / "out")
    run = run_main(capsys, "embed", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                   "--model", tiny_model, "--rows-per-file", "1000")
    assert_one_line_error(run, 2, "part4/doc04990.txt has changed size (")
    assert "its group's files (part0__doc00000.txt+4999…, 5000 shard(s)) are only partly committed" in run.stderr
    assert snapshot(tmp_path / "out") == before


def test_dry_run_reports_files_groups_and_output_files(many, capsys, tiny_model):
    src, _, _, _ = many
    run = run_main(capsys, "embed", "--input", str(src), "--output", str(src.parent / "fresh"), "--model", tiny_model,
                   "--rows-per-file", "1000", "--dry-run")
    assert run.returncode == 0, run.stderr
    assert "5000 file(s) (shards)" in run.stdout
    assert "files: 1 group(s) of shards, 1 of them small files packed together" in run.stdout
    # documents: counted in 100 spread shards, the others estimated by size
    assert re.search(r"1 to embed \(5000 shard\(s\)\), about [\d,]+ documents in about 10 output file\(s\)", run.stdout)
    assert not (src.parent / "fresh").exists()


@pytest.mark.slow  # a real process killed and run again (~60 s)
def test_kill_9_among_many_small_files_then_rerun_gives_every_document_once(tmp_path, tiny_bert_dir):
    from tests.slow_model import make_slow_model

    model = make_slow_model(tiny_bert_dir, str(tmp_path / "slow"), delay=0.3)
    ids = tiny_shards(tmp_path / "in", 3000)
    out = tmp_path / "out"
    args = ["embed", "--input", str(tmp_path / "in"), "--output", str(out), "--model", model, "--trust-remote-code",
            "--rows-per-file", "500", "--quiet"]
    assert kill_cli_when(args, ready=lambda: len(committed(out)) >= 1), "the run finished before the kill"
    before = committed(out)
    plan = (out / "_plan.json").read_bytes()
    assert 1 <= len(before) < 12 and not (out / "_manifest.json").exists()
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = committed(out)
    assert len(after) == 12 and {f: after[f] for f in before} == before  # 6,000 rows / 500; none rewritten
    assert (out / "_plan.json").read_bytes() == plan  # the rerun used the killed run's plan
    got, _ = read_embeddings(str(out))
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))


# --------------------------------------------------------------------------- a file as one document


def real_documents(directory, limit: int = 40) -> dict[str, str]:
    """Package METADATA files and Debian copyright files, copied into a tree: {relative path: text}."""
    import site

    found = sorted(glob.glob(os.path.join(site.getsitepackages()[0], "*.dist-info", "METADATA")))[: limit // 2]
    found += sorted(glob.glob("/usr/share/doc/*/copyright"))[: limit // 2]
    docs = {}
    for path in found:
        parts = path.split(os.sep)
        key = f"{parts[-2]}/{parts[-1]}"
        target = directory / key
        target.parent.mkdir(parents=True, exist_ok=True)
        data = open(path, "rb").read()
        target.write_bytes(data)
        docs[key] = data.decode("utf-8", errors="replace")
    assert len(docs) >= min(limit, 20)
    return docs


def test_a_directory_of_real_documents_is_embedded_one_vector_per_file(ray_cluster, tmp_path, default_model_path):
    from sentence_transformers import SentenceTransformer

    from tests.conftest import assert_same

    docs = real_documents(tmp_path / "docs")
    (tmp_path / "docs" / "empty.txt").write_text("")
    out = tmp_path / "out"
    result = run_embed(EmbedConfig(input=str(tmp_path / "docs"), output=str(out), model=default_model_path,
                                   document_per_file=True, encoding_errors="replace", keep_columns=("text",), quiet=True))
    ids, vectors = read_embeddings(str(out))
    assert sorted(ids) == sorted(docs) and result.invalid == 1  # the empty file is counted, not embedded
    table = pq.read_table(out)
    assert dict(zip(table["id"].to_pylist(), table["text"].to_pylist())) == docs
    reference = SentenceTransformer(default_model_path, device="cpu").encode([docs[i] for i in ids])
    assert_same(vectors, reference)
    assert result.manifest["config"]["document_per_file"] is True
    assert result.manifest["rows"]["documents"] == len(docs) + 1



def test_search_gives_each_hit_its_files_text(ray_cluster, tmp_path, tiny_model, capsys):
    docs = real_documents(tmp_path / "docs", limit=20)
    out = tmp_path / "out"
    run_embed(EmbedConfig(input=str(tmp_path / "docs"), output=str(out), model=tiny_model, document_per_file=True,
                          encoding_errors="replace", quiet=True))
    key = sorted(docs)[0]
    run = run_main(capsys, "search", str(out), docs[key][:200], "--top-k", "1", "--texts", str(tmp_path / "docs"))
    assert run.returncode == 0, run.stderr
    assert key in run.stdout and " ".join(docs[key].split())[:40] in run.stdout  # read as a whole file, by its path


def test_document_mode_with_chunks_through_the_cli(ray_cluster, tmp_path, tiny_model):
    docs = real_documents(tmp_path / "docs", limit=10)
    out = tmp_path / "out"
    proc = cli("embed", "--input", str(tmp_path / "docs"), "--output", str(out), "--model", tiny_model,
               "--document-per-file", "--encoding-errors", "replace", "--chunk-tokens", "48", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out)
    assert set(table["doc_id"].to_pylist()) == set(docs)
    assert len(table) > len(docs)  # long files became several chunks
    for doc_id, start, end, chunk in zip(*(table[c].to_pylist() for c in ("doc_id", "start", "end", "chunk"))):
        assert 0 <= start < end <= len(docs[doc_id]) and chunk >= 0


# --------------------------------------------------------------------------- S3


@pytest.mark.slow  # 2,000 uploads to moto and a run (~60 s)
def test_two_thousand_small_objects_on_s3_are_listed_and_embedded_once(moto_s3, tiny_model):
    from pipeline.storage.sources import discover_shards

    s3 = moto_s3.client()
    bucket = moto_s3.new_bucket("small")
    expected = []
    for k in range(2000):
        s3.put_object(Bucket=bucket, Key=f"in/d{k // 500}/o{k:05d}.txt", Body=f"object {k} first\nobject {k} second\n".encode())
        expected += [f"d{k // 500}/o{k:05d}.txt:0", f"d{k // 500}/o{k:05d}.txt:1"]
    shards = discover_shards(f"s3://{bucket}/in", moto_s3.storage_options())  # paginated: 1,000 keys a page
    assert len(shards) == 2000 and all(s.size > 0 for s in shards)
    proc = cli("embed", "--input", f"s3://{bucket}/in", "--output", f"s3://{bucket}/out", "--model", tiny_model,
               "--rows-per-file", "1000", "--quiet", env=cli_env(**moto_s3.env()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids, _ = read_embeddings(f"s3://{bucket}/out", moto_s3.storage_options())
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    names = {k.rsplit("/", 1)[1] for k in (o for o in _keys(s3, bucket, "out/")) if k.endswith(".parquet")}
    assert names == {f"d0__o00000.txt+1999-{k:05d}.parquet" for k in range(4)}


def _keys(s3, bucket: str, prefix: str) -> list[str]:
    from tests.conftest import objects

    return list(objects(s3, bucket, prefix))


def test_a_file_named_like_a_hidden_one_gets_an_output_every_reader_sees(ray_cluster, tmp_path, tiny_model):
    """`_notes.txt` named alone would have given `_notes.txt.parquet`, which Arrow and Parquet readers
    skip as hidden (and a resume did not count): its output file starts with `+` instead."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "_notes.txt").write_text("first line\nsecond line\n")
    run_embed(EmbedConfig(input=str(tmp_path / "in" / "_notes.txt"), output=str(tmp_path / "out"), model=tiny_model,
                          quiet=True))
    assert list(committed(tmp_path / "out")) == ["+_notes.txt.parquet"]
    import pyarrow.dataset as ds
    assert sorted(ds.dataset(str(tmp_path / "out"), format="parquet").to_table()["id"].to_pylist()) == [
        "_notes.txt:0", "_notes.txt:1"]
    assert sorted(read_embeddings(str(tmp_path / "out"))[0]) == ["_notes.txt:0", "_notes.txt:1"]
    again = run_embed(EmbedConfig(input=str(tmp_path / "in" / "_notes.txt"), output=str(tmp_path / "out"),
                                  model=tiny_model, quiet=True))
    assert again.files_written == 0  # the resume counts it as committed
