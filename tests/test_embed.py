"""`embedpipe embed` (pipeline.commands.embed) on the local Ray cluster: every format exactly once,
resume, manifest, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import EmbedConfig, read_embeddings
from pipeline.errors import InputError, UsageError
from pipeline.commands.embed import run_embed
from tests.conftest import snapshot, write_lines


def write_formats(d):
    """Seven shards in every format; returns the expected ids of valid rows."""
    import datasets

    (d / "nested").mkdir(parents=True)
    expected = []
    (d / "a.txt").write_text("".join(f"txt doc {i}\n" if i % 7 else "\n" for i in range(40)))
    expected += [f"a.txt:{i}" for i in range(40) if i % 7]
    with open(d / "b.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"json doc {i}" if i != 3 else None, "n": i}) + "\n")
    expected += [f"b.jsonl:{i}" for i in range(30) if i != 3]
    (d / "c.csv").write_text("text,n\n" + "".join(f"csv doc {i},{i}\n" for i in range(25)))
    expected += [f"c.csv:{i}" for i in range(25)]
    pq.write_table(pa.table({"text": [f"pq doc {i}" for i in range(33)], "n": list(range(33))}), d / "nested" / "d.parquet")
    expected += [f"nested/d.parquet:{i}" for i in range(33)]
    (d / "e.json").write_text(json.dumps([{"text": f"arr doc {i}", "n": i} for i in range(12)]))
    expected += [f"e.json:{i}" for i in range(12)]
    datasets.Dataset.from_dict({"text": [f"hf doc {i}" for i in range(20)], "n": list(range(20))}).save_to_disk(str(d / "hf"))
    expected += [f"hf/data-00000-of-00001.arrow:{i}" for i in range(20)]
    return expected


def test_every_format_every_row_exactly_once(ray_cluster, tmp_path, tiny_model):
    src = tmp_path / "in"
    expected = write_formats(src)
    out = tmp_path / "out"
    result = run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, quiet=True))
    ids, vectors = read_embeddings(str(out))
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert vectors.shape == (len(expected), 32) and vectors.dtype == "float32"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"]["embedded"] == len(expected)
    assert manifest["rows"]["invalid"] == 6 + 1
    assert manifest["rows"]["documents"] == len(expected) + 7
    # six small shards, packed into one group (storage.packing): one file, named after the first
    assert manifest["input"] == {"files": 6, "bytes": manifest["input"]["bytes"], "groups": 1, "packed_groups": 1}
    assert manifest["shards"] == [{"shard": "a.txt", "last_shard": "nested/d.parquet", "count": 6,
                                   "files": ["a.txt+5.parquet"], "rows": len(expected) + 7, "embedded": len(expected)}]
    assert [(f["shard"], f["last_shard"], f["shards"], f["last"]) for f in manifest["files"]] == [
        ("a.txt", "nested/d.parquet", 6, True)]
    for entry in manifest["files"]:
        assert (out / entry["file"]).is_file()
    assert manifest["model"]["fingerprint"].startswith("sha256:")
    assert "storage_options" not in manifest["config"]
    assert result.embedded == len(expected)
    assert sorted(os.listdir(out)) == sorted([e["file"] for e in manifest["files"]] + ["_manifest.json", "_plan.json",
                                                                                      "_run.json"])
    assert_replicas_recorded(ray_cluster, manifest)


def test_a_separate_writer_builds_the_same_files_outside_the_encoder(ray_cluster, tmp_path, tiny_model):
    """--writer separate (the default on GPUs): every file goes out of the encoder as pieces and the
    driver builds it; the files are those the encoder writes itself, and no piece is left."""
    src = tmp_path / "in"
    src.mkdir()
    expected = []
    for k in range(3):  # three shards of two files each, each file wholly inside one block
        write_lines(src / f"s{k}.txt", [f"shard {k} line {i} " + "w " * (i % 5) for i in range(60)])
        expected += [f"s{k}.txt:{i}" for i in range(60)]
    tables = {}
    for writer in ("encoder", "separate"):
        out = tmp_path / writer
        run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, quiet=True, writer=writer,
                              pack_files=False, rows_per_file=50))
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["resources"]["writer"] == writer
        assert sorted(os.listdir(out)) == sorted([f["file"] for f in manifest["files"]] + [
            "_manifest.json", "_plan.json", "_run.json"])  # no _pieces left
        tables[writer] = {f["file"]: pq.read_table(out / f["file"]) for f in manifest["files"]}
    assert sorted(tables["encoder"]) == sorted(tables["separate"]) and len(tables["encoder"]) == 6
    for name, table in tables["encoder"].items():
        other = tables["separate"][name]
        assert table["id"].equals(other["id"])
        np.testing.assert_allclose(np.stack(table["embedding"].to_numpy(zero_copy_only=False)),
                                   np.stack(other["embedding"].to_numpy(zero_copy_only=False)), atol=1e-6)
    assert sorted(read_embeddings(str(tmp_path / "separate"))[0]) == sorted(expected)


def assert_replicas_recorded(ray_cluster, manifest):
    """The manifest says where each replica ran: here, the encoders and the tokenizer on the one node.

    The plan has one encoder per core; on this small input the run may end before Ray has
    started the second (the 3-node test in test_cluster waits for the whole pool and checks it).
    """
    node = ray_cluster.get_runtime_context().get_node_id()  # the local cluster's only node
    replicas = manifest["replicas"]
    assert manifest["resources"]["num_encoders"] == 2  # one per core of the 2-CPU cluster
    encoders = replicas["encode"]["actors"]
    assert 1 <= len(encoders) <= 2 and replicas["encode"]["per_node"] == {node: len(encoders)}
    assert replicas["tokenize"]["per_node"] == {node: manifest["resources"]["num_tokenizers"]}
    # the tokenizer actors ran the model's Rust tokenizer alone (pipeline.models.fast_tokenizer), no torch
    assert {t["tokenizer"] for t in replicas["tokenize"]["actors"]} == {"tokenizers"}
    for encoder in encoders:
        assert encoder["device"] == "cpu" and encoder["dtype"] == "float32" and encoder["gpu_ids"] == []
        assert encoder["node_id"] == node and encoder["node_ip"]


def test_rerun_resumes_and_leaves_committed_files_untouched(ray_cluster, tmp_path, tiny_model):
    """Also: an id field, kept columns and float16 vectors, which the resumed files must have too."""
    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        (src / f"s{k}.jsonl").write_text(
            "".join(json.dumps({"text": f"shard {k} doc {i}", "lang": "en", "doc": f"s{k}:{i}"}) + "\n" for i in range(20))
        )
    out = tmp_path / "out"
    config = EmbedConfig(input=str(src), output=str(out), model=tiny_model, id_field="doc", num_encoders=1,
                         keep_columns=("text", "lang"), precision="float16", quiet=True,  # one encoder loads faster
                         pack_files=False)  # --no-pack-files: a file per shard, named after it
    run_embed(config)
    os.remove(out / "s1.jsonl.parquet")  # as if the run had died before this shard
    before = {f: os.stat(out / f).st_mtime_ns for f in ("s0.jsonl.parquet", "s2.jsonl.parquet")}
    result = run_embed(config)
    assert result.files_written == 1 and result.files_skipped == 2
    assert {f: os.stat(out / f).st_mtime_ns for f in before} == before
    ids, _ = read_embeddings(str(out))
    assert sorted(ids) == sorted(f"s{k}:{i}" for k in range(3) for i in range(20))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"]["embedded"] == 60
    table = pq.read_table(out / "s1.jsonl.parquet")
    assert table.column_names == ["id", "embedding", "text", "lang"]
    assert table["id"].to_pylist() == [f"s1:{i}" for i in range(20)]
    assert table["text"].to_pylist() == [f"shard 1 doc {i}" for i in range(20)]
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 32)


@pytest.mark.slow  # make test-all; test_int8 shows a refused resume (float32 onto int8 vectors) in make test
def test_rerun_with_other_settings_is_refused(ray_cluster, tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("alpha\nbeta\n")
    out = tmp_path / "out"
    run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, quiet=True))
    before = snapshot(out)
    with pytest.raises(UsageError, match="pooling='mean', this run has 'cls'"):
        run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, pooling="cls", quiet=True))
    assert snapshot(out) == before  # --overwrite, which would replace it, is tested in test_reliability


@pytest.mark.slow  # make test-all; test_cli checks the same worker-side error as the user sees it
def test_error_inside_a_worker_reaches_the_user_and_keeps_prior_output(ray_cluster, tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.jsonl").write_text('{"text": "fine"}\n')
    out = tmp_path / "out"
    run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, quiet=True))
    before = snapshot(out)
    (src / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(InputError, match="bad.jsonl: line 2 is not valid JSON"):
        run_embed(EmbedConfig(input=str(src), output=str(out), model=tiny_model, quiet=True))
    after = snapshot(out)
    # every file as it was; the plan keeps its groups (the failed run added its new shard's group before reading it)
    plan_before, plan_after = (json.loads(s.pop("_plan.json")) for s in (before, after))
    assert after == before
    assert plan_after["groups"][: len(plan_before["groups"])] == plan_before["groups"]


def test_asking_for_gpus_on_a_cluster_without_any_is_an_error_up_front(ray_cluster, tmp_path, tiny_model):
    write_lines(tmp_path / "a.txt", ["one", "two"])
    with pytest.raises(UsageError, match="--device cuda: the Ray cluster has no GPUs"):
        run_embed(EmbedConfig(input=str(tmp_path / "a.txt"), output=str(tmp_path / "out"), model=tiny_model,
                              device="cuda", quiet=True))
