"""A run's identity (pipeline.identity): a resume after a killed first run never mixes two models
or two settings in one output; a file that does not belong is named, by a resume, by `info`, by
`read_embeddings` and by `mine`; outputs written before `_run.json` still resume."""

from __future__ import annotations

import json
import os
import re
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline import EmbedConfig, read_embeddings
from pipeline.errors import InputError, UsageError
from pipeline.identity import RUN_FILE, SETTINGS_KEY, differences
from pipeline.commands.embed import run_embed
from tests.conftest import REPO, assert_one_line_error, cli, committed, kill_cli_when, make_st_dir, snapshot, write_lines
from tests.slow_model import make_slow_model

LEGACY = os.path.join(REPO, "tests", "fixtures", "legacy_output")
LEGACY_TEXTS = {
    "a.txt": ["the cat sat on the mat", "a dog barked at night", "rain fell on the city"],
    "b.txt": ["stocks rose on monday", "the market closed higher"],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_bert_dir, tiny_model):
    """Two models with 32-dimensional vectors: the same weights, other pooling and a saved prompt
    (another fingerprint), so that only the identity can tell their vectors apart."""
    base = tmp_path_factory.mktemp("models")
    other = make_st_dir(tiny_bert_dir, str(base / "other"), pooling="mean", normalize=True)
    return tiny_model, other


def three_shards(src) -> list[str]:
    src.mkdir()
    ids = []
    for k in range(3):
        write_lines(src / f"s{k}.txt", [f"shard {k} text {i} " + "word " * (i % 5) for i in range(12)])
        ids += [f"s{k}.txt:{i}" for i in range(12)]
    return ids


@pytest.fixture(scope="module")
def first_output(ray_cluster, tmp_path_factory, models):
    """A finished run of models[0] over three shards: (input, output, ids). Tests work on copies."""
    base = tmp_path_factory.mktemp("first")
    ids = three_shards(base / "in")
    # one file per shard (no packing), so a test can remove some of them as kill -9 would have left it
    run_embed(EmbedConfig(input=str(base / "in"), output=str(base / "out"), model=models[0], quiet=True,
                          pack_files=False))
    return base / "in", base / "out", ids


def copy_of(first_output, tmp_path):
    src, out, ids = first_output
    shutil.copytree(out, tmp_path / "out")  # copy2: times kept
    return src, tmp_path / "out", ids


def as_if_killed_after_the_first_commit(out) -> None:
    """What kill -9 leaves after one committed file: no manifest, one file, the run's identity."""
    os.remove(out / "_manifest.json")
    for name in ("s1.txt.parquet", "s2.txt.parquet"):
        os.remove(out / name)


# --------------------------------------------------------------------------- a killed first run


def test_a_first_run_writes_its_identity_before_committing_and_into_every_file(first_output):
    _, out, _ = first_output
    run = json.loads((out / RUN_FILE).read_text())
    manifest = json.loads((out / "_manifest.json").read_text())
    assert run["format"] == "embedpipe/run" and run["format_version"] == 1
    assert run["settings"]["model"] == manifest["model"]["fingerprint"]
    assert run["settings"]["pooling"] == "mean" and run["settings"]["dtype"] == "float32"
    assert manifest["identity"] == {"hash": run["hash"], "settings": run["settings"]}
    for name in committed(out):
        carried = json.loads(pq.read_schema(out / name).metadata[SETTINGS_KEY])
        assert carried["hash"] == run["hash"] and carried["settings"] == run["settings"]
    # the run's file was there before the first Parquet file was committed
    assert os.stat(out / RUN_FILE).st_mtime_ns <= min(committed(out).values())


@pytest.mark.parametrize(
    "change, named",
    [
        ({"model": "other"}, "vectors of another model"),
        ({"pooling": "cls"}, "pooling='mean', this run has 'cls'"),
        ({"prompt": "query: "}, "prompt=None, this run has 'query: '"),
        ({"max_seq_length": 16}, "max_seq_length=64, this run has 16"),
        ({"dtype": "int8"}, "int8 and floating-point vectors are not mixed"),
        ({"dtype": "bfloat16"}, "dtype='float32', this run has 'bfloat16'"),
        ({"precision": "float16"}, "precision='float32', this run has 'float16'"),
        ({"output_dtype": "float16"}, "precision='float32', this run has 'float16'"),  # the deprecated name
        ({"precision": "ubinary"}, "precision='float32', this run has 'ubinary'"),
        ({"truncate_dim": 16}, "truncate_dim=None, this run has 16"),
        ({"rows_per_file": 5}, "rows_per_file=50000, this run has 5"),
    ],
    ids=["model", "pooling", "prompt", "max_seq_length", "int8", "bfloat16", "precision", "output_dtype", "ubinary",
         "truncate_dim", "rows_per_file"],
)
def test_a_resume_after_a_killed_first_run_with_other_settings_is_refused(
    first_output, tmp_path, models, change, named
):
    src, out, _ = copy_of(first_output, tmp_path)
    as_if_killed_after_the_first_commit(out)
    before = snapshot(out)
    if change.get("model") == "other":
        change = {"model": models[1]}
    config = EmbedConfig(**{"input": str(src), "output": str(out), "model": models[0], "quiet": True, **change})
    with pytest.raises(UsageError, match=re.escape(named)) as refused:
        run_embed(config)
    assert "use another output or --overwrite" in str(refused.value)
    assert snapshot(out) == before  # nothing written, nothing removed


def test_a_resume_with_the_same_settings_completes_every_id_once(first_output, tmp_path, models):
    src, out, ids = copy_of(first_output, tmp_path)
    as_if_killed_after_the_first_commit(out)
    kept = committed(out)
    run_before = (out / RUN_FILE).read_bytes()
    result = run_embed(EmbedConfig(input=str(src), output=str(out), model=models[0], quiet=True))
    assert result.files_written == 2 and result.files_skipped == 1
    assert {f: committed(out)[f] for f in kept} == kept
    assert (out / RUN_FILE).read_bytes() == run_before  # the identity is the first run's, kept
    got, _ = read_embeddings(str(out))
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))


def test_a_run_killed_before_its_first_commit_binds_nothing(first_output, tmp_path, models):
    src, out, ids = copy_of(first_output, tmp_path)
    for name in os.listdir(out):
        if name != RUN_FILE:
            os.remove(out / name)  # only the identity was written
    run_embed(EmbedConfig(input=str(src), output=str(out), model=models[0], pooling="cls", quiet=True))
    assert json.loads((out / RUN_FILE).read_text())["settings"]["pooling"] == "cls"
    assert sorted(read_embeddings(str(out))[0]) == sorted(ids)


def test_the_refusal_through_the_cli_is_one_line_exit_2_and_starts_no_cluster(first_output, tmp_path, models):
    src, out, _ = copy_of(first_output, tmp_path)
    as_if_killed_after_the_first_commit(out)
    before = snapshot(out)
    proc = cli("embed", "--input", str(src), "--output", str(out), "--model", models[1], "--quiet")
    assert_one_line_error(proc, 2, f"--output {out} holds vectors of another model ({models[0]}, sha256:")
    assert "Ray" not in proc.stderr  # refused before a local cluster was started
    assert snapshot(out) == before


# --------------------------------------------------------------------------- files that do not belong


def test_a_foreign_or_other_settings_file_is_named_by_resume_info_readers_and_mine(first_output, tmp_path, models):
    import pyarrow as pa

    src, out, _ = copy_of(first_output, tmp_path)
    other = tmp_path / "other"
    config = EmbedConfig(input=str(src), output=str(out), model=models[0], quiet=True)
    read_embeddings(str(out))  # consistent: no complaint

    # 1. a file of another model, copied in by hand
    write_lines(tmp_path / "x.txt", ["one text of another model", "and a second"])
    run_embed(EmbedConfig(input=str(tmp_path / "x.txt"), output=str(other), model=models[1], quiet=True))
    shutil.copy(other / "x.txt.parquet", out / "x.parquet")
    os.remove(out / "s2.txt.parquet")  # so that the rerun has work to do
    with pytest.raises(UsageError, match="x.parquet holds vectors of another model"):
        run_embed(config)
    with pytest.raises(InputError, match="x.parquet: made with model .*other.*the rest of the output with model"):
        read_embeddings(str(out))
    ids, _ = read_embeddings(str(out), allow_mixed=True)  # when asked, all of them
    assert len(ids) == 26
    proc = cli("info", str(out), "--rows", "0")
    assert_one_line_error(proc, 2, "x.parquet: made with model")
    assert '"files_not_belonging"' in proc.stdout
    proc = cli("mine", "--embeddings", str(out), "--output", str(tmp_path / "pairs"))
    assert_one_line_error(proc, 2, f"--embeddings {out}: x.parquet: made with model")
    assert not (tmp_path / "pairs" / "pairs.parquet").exists()

    # 2. a Parquet file that embedpipe did not write at all
    os.remove(out / "x.parquet")
    pq.write_table(pa.table({"id": ["z"], "embedding": pa.array([[0.0] * 32], pa.list_(pa.float32(), 32))}),
                   out / "foreign.parquet")
    before = snapshot(out)
    with pytest.raises(UsageError, match="holds foreign.parquet, which this output's runs did not write"):
        run_embed(config)
    assert snapshot(out) == before
    with pytest.raises(InputError, match="foreign.parquet: not written by embedpipe"):
        read_embeddings(str(out))
    os.remove(out / "foreign.parquet")
    run_embed(config)  # once it is gone, the resume completes
    assert len(read_embeddings(str(out))[0]) == 36


def test_an_overwrite_replaces_the_identity_with_the_new_one(first_output, tmp_path, models):
    src, out, _ = copy_of(first_output, tmp_path)
    run_embed(EmbedConfig(input=str(src), output=str(out), model=models[0], pooling="cls", overwrite=True, quiet=True))
    run = json.loads((out / RUN_FILE).read_text())
    assert run["settings"]["pooling"] == "cls"
    for name in committed(out):
        assert json.loads(pq.read_schema(out / name).metadata[SETTINGS_KEY])["hash"] == run["hash"]
    assert not (out / "_overwrite").exists()
    read_embeddings(str(out))


# --------------------------------------------------------------------------- outputs of earlier versions


def legacy_copy(tmp_path, default_model_path):
    """The fixture (see tests/fixtures/README.md) and its input, with one more shard to embed."""
    from pipeline.models.loading import fingerprint

    src = tmp_path / "in"
    src.mkdir()
    for name, texts in LEGACY_TEXTS.items():
        write_lines(src / name, texts)
    write_lines(src / "c.txt", ["a new shard", "added after the old run"])
    out = tmp_path / "out"
    shutil.copytree(LEGACY, out)
    manifest = json.loads((out / "_manifest.json").read_text())
    current = fingerprint(default_model_path)
    if manifest["model"]["fingerprint"] != current:  # a newer release of the model package: same model
        manifest["model"]["fingerprint"] = current
        (out / "_manifest.json").write_text(json.dumps(manifest))
    return src, out


def test_an_output_of_an_earlier_version_still_resumes(ray_cluster, tmp_path, default_model_path):
    src, out = legacy_copy(tmp_path, default_model_path)
    assert not (out / RUN_FILE).exists() and SETTINGS_KEY not in pq.read_schema(out / "a.txt.parquet").metadata
    old = committed(out)
    read_embeddings(str(out))  # readers accept it as it is
    result = run_embed(EmbedConfig(input=str(src), output=str(out), quiet=True))
    assert result.files_written == 1 and result.files_skipped == 2
    assert {f: committed(out)[f] for f in old} == old
    ids, _ = read_embeddings(str(out))
    assert sorted(ids) == sorted(["a.txt:0", "a.txt:1", "a.txt:2", "b.txt:0", "b.txt:1", "c.txt:0", "c.txt:1"])
    assert (out / RUN_FILE).exists()  # from now on the output has an identity
    run_embed(EmbedConfig(input=str(src), output=str(out), quiet=True))  # and resumes again, old files included
    with pytest.raises(UsageError, match="pooling='mean', this run has 'cls'"):
        run_embed(EmbedConfig(input=str(src), output=str(out), pooling="cls", quiet=True))


def test_an_earlier_versions_output_with_another_setting_is_refused_by_its_manifest(ray_cluster, tmp_path, default_model_path):
    src, out = legacy_copy(tmp_path, default_model_path)
    before = snapshot(out)
    with pytest.raises(UsageError, match="max_seq_length=256, this run has 32"):
        run_embed(EmbedConfig(input=str(src), output=str(out), max_seq_length=32, quiet=True))
    assert snapshot(out) == before


def test_files_with_neither_manifest_nor_identity_are_not_trusted(ray_cluster, tmp_path, default_model_path):
    src, out = legacy_copy(tmp_path, default_model_path)
    os.remove(out / "_manifest.json")  # an earlier version killed before its first manifest
    before = snapshot(out)
    with pytest.raises(UsageError, match=r"holds 2 Parquet file\(s\) \(a.txt.parquet, b.txt.parquet\) and no "
                                         r"_run.json or _manifest.json.*use --overwrite"):
        run_embed(EmbedConfig(input=str(src), output=str(out), quiet=True))
    assert snapshot(out) == before
    run_embed(EmbedConfig(input=str(src), output=str(out), overwrite=True, quiet=True))
    assert len(read_embeddings(str(out))[0]) == 7


# --------------------------------------------------------------------------- the comparison itself


def test_differences_name_each_setting_and_skip_what_is_unknown():
    old = {"model": "sha256:a", "pooling": "mean", "dtype": "float32", "prompt": None}
    assert differences(old, dict(old)) == []
    assert differences(old, {**old, "pooling": "cls"}) == [("pooling", "mean", "cls")]
    unresolved = {k: v for k, v in old.items() if k != "dtype"}  # no cluster: the dtype is not known
    assert differences(old, unresolved) == []
    assert differences({"model": "sha256:a"}, {"model": "sha256:a", "prompt": "q: "}) == []  # not recorded then


# --------------------------------------------------------------------------- the real thing: kill -9


@pytest.mark.slow  # make test-all: a real kill -9 of the CLI's process group, then five refused reruns (~3 min)
def test_kill_9_after_the_first_commit_then_other_settings_are_refused_and_the_same_complete(
    tmp_path, tiny_bert_dir
):
    slow = make_slow_model(tiny_bert_dir, str(tmp_path / "slow"), delay=0.5)
    other = make_st_dir(tiny_bert_dir, str(tmp_path / "other"), pooling="mean")
    src = tmp_path / "in"
    src.mkdir()
    expected = []
    for k in range(6):
        write_lines(src / f"s{k}.txt", [f"shard {k} document {i} " + "word " * (i % 9) for i in range(600)])
        expected += [f"s{k}.txt:{i}" for i in range(600)]
    out = tmp_path / "out"
    args = ["embed", "--input", str(src), "--output", str(out), "--trust-remote-code", "--max-batch-tokens", "4096",
            "--quiet", "--no-pack-files"]  # a file per shard, committed one by one: the kill falls between them
    killed = kill_cli_when([*args, "--model", slow], ready=lambda: len(committed(out)) >= 1)
    assert killed, "the run finished before the kill: nothing was tested"
    assert not (out / "_manifest.json").exists() and (out / RUN_FILE).exists()
    # the killed run's leftovers, and its lock, which the next run takes over as stale (its pid is gone)
    before = {f: b for f, b in snapshot(out).items() if not f.startswith(("_tmp", "_pieces", "_lock"))}
    for change, named in [
        (["--model", other], "holds vectors of another model"),
        (["--model", slow, "--pooling", "cls"], "pooling='mean', this run has 'cls'"),
        (["--model", slow, "--prompt", "query: "], "prompt=None, this run has 'query: '"),
        (["--model", slow, "--max-seq-length", "16"], ", this run has 16"),
        (["--model", slow, "--dtype", "bfloat16"], "dtype='float32', this run has 'bfloat16'"),
    ]:
        proc = cli(*args, *change)
        assert_one_line_error(proc, 2, named)
        now = {f: b for f, b in snapshot(out).items() if not f.startswith(("_tmp", "_pieces", "_lock"))}
        assert now == before, f"{change}: the refused run changed the output"
    proc = cli(*args, "--model", slow)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids, _ = read_embeddings(str(out))
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert {f: (out / f).read_bytes() for f in before if f.endswith(".parquet")} == {
        f: b for f, b in before.items() if f.endswith(".parquet")
    }


def test_identities_written_before_precision_existed_compare_by_their_output_dtype():
    from pipeline.identity import differences

    old = {"model": "sha256:x", "output_dtype": "float32"}  # a _run.json of an earlier embedpipe
    assert differences(old, {"model": "sha256:x", "precision": "float32", "truncate_dim": None, "quantization": None}) == []
    assert differences(old, {"model": "sha256:x", "precision": "int8"}) == [("precision", "float32", "int8")]
