"""`embed --format lance` (pipeline.storage.lance_sink): the output is a Lance dataset, each unit of
commit one fragment, committed exactly once; read by Lance, LanceDB, `info` and `read_embeddings`."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

import pipeline
from pipeline import EmbedConfig, read_embeddings
from pipeline.commands.embed import run_embed
from pipeline.storage import lance_sink
from pipeline.storage.lance_sink import COMMITTED_DIR, PENDING_DIR, LanceCommitter
from pipeline.storage.sink import SinkSpec, commit_block, merge_pieces
from tests.conftest import assert_same, cli, kill_cli_when, run_main, sample_texts, write_lines

lance = pytest.importorskip("lance")


def corpus(src, shards: int = 2, rows: int = 30) -> list[str]:
    """`shards` .txt shards of real sample texts; the ids of their rows."""
    src.mkdir(parents=True, exist_ok=True)
    texts, ids = sample_texts(), []
    for k in range(shards):
        write_lines(src / f"s{k}.txt", texts[k * rows:(k + 1) * rows])
        ids += [f"s{k}.txt:{i}" for i in range(rows)]
    return ids


def dataset_ids(out) -> list[str]:
    return lance.dataset(str(out)).to_table(columns=["id"])["id"].to_pylist()


def markers(out, where: str = COMMITTED_DIR) -> dict[str, dict]:
    folder = out / where
    if not folder.is_dir():
        return {}
    return {p.name[:-5]: json.loads(p.read_text()) for p in folder.iterdir() if p.suffix == ".json"}


def data_files(marker: dict) -> list[str]:
    return [d["path"] for f in marker["fragments"] for d in f["files"]]


def test_cli_lance_output_equals_sentence_transformers_and_opens_in_lancedb(ray_cluster, tmp_path, capsys,
                                                                              default_model_path):
    expected = corpus(tmp_path / "in")
    out = tmp_path / "vectors.lance"
    run = run_main(capsys, "embed", "--input", str(tmp_path / "in"), "--output", str(out), "--format", "lance",
                   "--rows-per-file", "20", "--keep-columns", "text", "--quiet")
    assert run.returncode == 0, run.stderr[-2000:]
    ids = dataset_ids(out)
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))  # every id once
    # each shard (~3 KB) is a group of its own: together they pass 20 rows x 256 bytes (storage.packing)
    assert sorted(markers(out)) == ["s0.txt-00000.parquet", "s0.txt-00001.parquet", "s1.txt-00000.parquet",
                                    "s1.txt-00001.parquet"]
    assert not (out / PENDING_DIR).exists() and not [p for p in os.listdir(out) if p.endswith(".parquet")]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["table_format"] == "lance" and manifest["rows"]["embedded"] == len(expected)

    from sentence_transformers import SentenceTransformer

    table = lance.dataset(str(out)).to_table()
    assert table.schema.field("embedding").type.list_size == 384 and "text" in table.column_names
    texts = dict(zip(table["id"].to_pylist(), table["text"].to_pylist()))
    read_ids, vectors = read_embeddings(str(out))
    assert read_ids == sorted(expected, key=lambda i: (i.split(":")[0], int(i.split(":")[1])))  # unit after unit
    reference = SentenceTransformer(default_model_path, device="cpu").encode([texts[i] for i in read_ids])
    assert_same(vectors, reference)

    info = run_main(capsys, "info", str(out), "--rows", "2")
    assert info.returncode == 0, info.stderr
    assert '"table_format": "lance"' in info.stdout and "s0.txt:0: [" in info.stdout

    lancedb = pytest.importorskip("lancedb")
    assert lancedb.connect(str(tmp_path)).open_table("vectors").count_rows() == len(expected)


def test_a_run_killed_around_its_commits_is_completed_exactly_once(ray_cluster, tmp_path, tiny_model, monkeypatch):
    """The two crash points of a unit: its fragments appended but its marker not yet moved (kept), and
    its fragments written but not appended (embedded again). No committed unit is rewritten."""
    expected = corpus(tmp_path / "in", shards=2, rows=30)
    out = tmp_path / "out.lance"
    config = EmbedConfig(input=str(tmp_path / "in"), output=str(out), model=tiny_model, format="lance",
                         rows_per_file=10, quiet=True, pack_files=False)  # units named after each shard
    appended_only, not_appended = "s0.txt-00001.parquet", "s1.txt-00002.parquet"
    real, calls = LanceCommitter.__call__, []

    def killed_after_the_last_unit(self, name):
        calls.append(name)
        if name == appended_only:  # step 3 done, the run dies before step 4
            self._append(name, json.loads((out / PENDING_DIR / f"{name}.json").read_text()))
        elif name != not_appended:  # the run dies before this unit's step 3
            real(self, name)
        if len(calls) == 6:
            raise KeyboardInterrupt  # the "kill": nothing after this point runs (no manifest)

    monkeypatch.setattr(LanceCommitter, "__call__", killed_after_the_last_unit)
    with pytest.raises(KeyboardInterrupt):
        run_embed(config)
    monkeypatch.undo()
    assert not (out / "_manifest.json").exists()
    # what a reader of the killed run sees: a readable dataset of whole units, each once
    seen = dataset_ids(out)
    assert len(seen) == len(set(seen)) == 50 and not {f"s1.txt:{r}" for r in range(20, 30)} & set(seen)
    before = markers(out)
    assert len(before) == 4 and set(markers(out, PENDING_DIR)) == {appended_only, not_appended}
    orphan = data_files(markers(out, PENDING_DIR)[not_appended])

    result = run_embed(config)
    assert result.files_written == 1 and result.files_skipped == 5  # only the unit never appended
    ids, vectors = read_embeddings(str(out))
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids)) and vectors.shape == (60, 32)
    after = markers(out)
    assert set(after) == {f"s{k}.txt-{c:05d}.parquet" for k in range(2) for c in range(3)}
    assert {n: data_files(after[n]) for n in before} == {n: data_files(m) for n, m in before.items()}  # not rewritten
    assert data_files(after[not_appended]) != orphan
    assert not [p for p in orphan if (out / "data" / p).exists()]  # the uncommitted data files are gone
    assert not (out / PENDING_DIR).exists()
    assert json.loads((out / "_manifest.json").read_text())["rows"]["embedded"] == 60


def test_resume_with_other_settings_or_as_parquet_is_refused(ray_cluster, tmp_path, tiny_model, capsys):
    corpus(tmp_path / "in", shards=1, rows=12)
    lance_out = tmp_path / "a.lance"
    base = ["embed", "--input", str(tmp_path / "in"), "--model", tiny_model, "--quiet"]
    assert run_main(capsys, *base, "--output", str(lance_out), "--format", "lance").returncode == 0

    other = run_main(capsys, *base, "--output", str(lance_out), "--format", "lance", "--truncate-dim", "16")
    assert other.returncode == 2 and "truncate_dim=None, this run has 16" in other.stderr
    to_parquet = run_main(capsys, *base, "--output", str(lance_out))
    assert to_parquet.returncode == 2
    assert "holds a lance output (--format lance), this run writes --format parquet" in to_parquet.stderr
    assert "Traceback" not in other.stderr + to_parquet.stderr

    mined = run_main(capsys, "mine", "--embeddings", str(lance_out), "--output", str(tmp_path / "pairs"))
    assert mined.returncode == 2 and "a Lance dataset (embed --format lance)" in mined.stderr
    assert len(dataset_ids(lance_out)) == 12  # the refused runs left it as it was


def test_a_parquet_output_is_not_resumed_as_lance_but_overwritten(ray_cluster, tmp_path, tiny_model, capsys):
    expected = corpus(tmp_path / "in", shards=1, rows=12)
    out = tmp_path / "out"
    run_embed(EmbedConfig(input=str(tmp_path / "in"), output=str(out), model=tiny_model, quiet=True))
    to_lance = run_main(capsys, "embed", "--input", str(tmp_path / "in"), "--output", str(out), "--model", tiny_model,
                        "--format", "lance")
    assert to_lance.returncode == 2 and "Traceback" not in to_lance.stderr
    assert "holds a parquet output (--format parquet), this run writes --format lance" in to_lance.stderr
    pipeline.embed(input=str(tmp_path / "in"), output=str(out), model=tiny_model, quiet=True, format="lance",
                   precision="float16", overwrite=True)  # the public API
    assert not [p for p in os.listdir(out) if p.endswith(".parquet") or p == "_overwrite"]
    assert lance.dataset(str(out)).schema.field("embedding").type.value_type == pa.float16()
    ids, vectors = read_embeddings(str(out))
    assert sorted(ids) == sorted(expected) and vectors.shape == (12, 32)
    run_embed(EmbedConfig(input=str(tmp_path / "in"), output=str(out), model=tiny_model, quiet=True, overwrite=True))
    assert not set(os.listdir(out)) & {*lance_sink.LANCE_DIRS, "_overwrite"}
    assert sorted(read_embeddings(str(out))[0]) == sorted(expected)


def sink_block(rows: list[int], chunk_rows: int, name: str = "docs-00000.parquet") -> pa.Table:
    """A block as it reaches the sink: rows `rows` of unit `name`, vector [r, r + 0.5, -r]; row 4 blank."""
    valid = [r != 4 for r in rows]
    vectors = np.array([[r, r + 0.5, -r] for r in rows], np.float32).reshape(-1)
    return pa.table({
        "id": [f"docs.txt:{r}" for r in rows], "title": [f"title {r}" for r in rows], "_valid": valid,
        "_row": pa.array(rows, pa.int64()), "_shard": ["docs.txt"] * len(rows), "_file": [name] * len(rows),
        "_chunk_rows": pa.array([chunk_rows] * len(rows), pa.int64()),
        "_n_tokens": pa.array([r + 2 for r in rows], pa.int32()), "_truncated": [False] * len(rows),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors), 3),
    })


def test_a_unit_split_across_blocks_is_joined_then_committed(tmp_path):
    """Without Ray: pieces from two blocks (pipeline.storage.sink), joined and committed as one fragment."""
    sink = SinkSpec(output=str(tmp_path / "out.lance"), text_field="text", keep_columns=("title",), format="lance")
    for rows in ([5, 3, 4], [2, 0, 1]):
        assert commit_block(sink_block(rows, 6), sink)["kind"].to_pylist() == ["piece"]
    stats = merge_pieces(sink, "docs-00000.parquet", 6)
    assert stats["rows"] == 6 and stats["embedded"] == 5  # row 4 is blank: counted, not written
    LanceCommitter(sink.output)("docs-00000.parquet")
    table = lance.dataset(sink.output).to_table()
    assert table["id"].to_pylist() == [f"docs.txt:{r}" for r in (0, 1, 2, 3, 5)]
    assert np.allclose(np.stack(table["embedding"].to_numpy(zero_copy_only=False))[:, 0], [0, 1, 2, 3, 5])
    assert list(markers(tmp_path / "out.lance")) == ["docs-00000.parquet"]


@pytest.mark.slow
def test_kill_9_of_a_lance_run_then_rerun_gives_every_document_once(tmp_path, tiny_bert_dir):
    from tests.slow_model import make_slow_model

    model = make_slow_model(tiny_bert_dir, str(tmp_path / "slow"), delay=0.5)
    expected = corpus(tmp_path / "in", shards=1, rows=120)
    out = tmp_path / "out.lance"
    args = ["embed", "--input", str(tmp_path / "in"), "--output", str(out), "--model", model, "--trust-remote-code",
            "--format", "lance", "--rows-per-file", "2", "--max-batch-tokens", "4096", "--quiet"]
    # 60 units of 2 rows: the block's units are appended one Lance commit after another by the driver,
    # so the kill lands among them (with 6 units a fast machine appended them all before the kill)
    assert kill_cli_when(args, ready=lambda: len(markers(out)) >= 1), "the run finished before the kill"
    before = markers(out)
    assert 1 <= len(before) < 60 and not (out / "_manifest.json").exists()
    seen = dataset_ids(out)
    assert len(seen) == len(set(seen))  # readable after the kill: whole units, each once
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = dataset_ids(out)
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert {n: data_files(markers(out)[n]) for n in before} == {n: data_files(m) for n, m in before.items()}
