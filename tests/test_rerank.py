"""`embedpipe rerank`: scores equal to CrossEncoder.predict, the join by embed's ids, the CLI, bad input.

The cross-encoder is a tiny random BertForSequenceClassification (hidden 32,
2 layers, MiniLM's tokenizer, one label) saved by CrossEncoder itself. Its
weights are drawn wide (initializer_range 0.5) so that scores spread over
(0, 1) instead of all sitting at sigmoid(0) = 0.5, where any bug would hide.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.errors import InputError, UsageError
from tests.conftest import REPO, assert_one_line_error, sample_texts, snapshot
from tests.conftest import run_main, save_cross_encoder


@pytest.fixture(scope="session")
def reference(cross_encoder_dir):
    """CrossEncoder.predict on the same directory: the scores rerank must reproduce."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(cross_encoder_dir, device="cpu")
    return lambda pairs: model.predict([list(p) for p in pairs], batch_size=32)


# --------------------------------------------------------------------------- corpus and pairs


def write_corpus(directory) -> dict[str, str]:
    """Three shards in three formats, with short, long (truncated) and non-Latin texts; {id: text} as embed assigns ids."""
    texts = sample_texts()
    directory.mkdir(parents=True, exist_ok=True)
    en = [t for t in texts[:60]] + [" ".join(texts[100:130])]  # the last one far longer than 128 tokens
    (directory / "en.txt").write_text("".join(t + "\n" for t in en), encoding="utf-8")
    de = texts[1000:1040]
    (directory / "sub").mkdir(exist_ok=True)
    (directory / "sub" / "de.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in de), encoding="utf-8")
    zh = texts[1300:1340]
    with open(directory / "zh.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["text"], *[[t] for t in zh]])
    corpus = {f"en.txt:{i}": t for i, t in enumerate(en)}
    corpus.update({f"sub/de.jsonl:{i}": t for i, t in enumerate(de)})
    corpus.update({f"zh.csv:{i}": t for i, t in enumerate(zh)})
    return corpus


def write_pairs(directory, corpus: dict[str, str], n: int, seed: int = 0) -> pa.Table:
    """n distinct random pairs of corpus ids, scored and sorted best first, as `mine` writes them."""
    rng = np.random.default_rng(seed)
    ids = sorted(corpus)
    chosen: set[tuple[str, str]] = set()
    while len(chosen) < n:
        a, b = rng.choice(len(ids), 2, replace=False)
        chosen.add((ids[a], ids[b]))
    rows = sorted(chosen)
    scores = np.sort(rng.random(n).astype(np.float32))[::-1]
    table = pa.table({"id_a": [a for a, _ in rows], "id_b": [b for _, b in rows], "score": pa.array(scores, pa.float32())})
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / "pairs.parquet")
    (directory / "_manifest.json").write_text("{}")
    return table


def read_reranked(out) -> pa.Table:
    return pq.read_table(out / "pairs.parquet")


def assert_reranked(out, pairs: pa.Table, corpus: dict[str, str], reference) -> dict:
    """Every pair of `pairs` once, its bi-encoder score kept, rerank_score = predict on its texts, sorted."""
    table = read_reranked(out)
    assert table.schema == pa.schema(
        [("id_a", pa.string()), ("id_b", pa.string()), ("score", pa.float32()), ("rerank_score", pa.float32())]
    )
    got = {(a, b): (s, r) for a, b, s, r in zip(*(table[c].to_pylist() for c in table.column_names))}
    want = dict(zip(zip(pairs["id_a"].to_pylist(), pairs["id_b"].to_pylist()), pairs["score"].to_pylist()))
    assert len(got) == table.num_rows == len(want) and set(got) == set(want)
    assert all(got[p][0] == want[p] for p in want)
    keys = list(zip(table["id_a"].to_pylist(), table["id_b"].to_pylist()))
    expected = reference([(corpus[a], corpus[b]) for a, b in keys])
    assert np.abs(table["rerank_score"].to_numpy() - expected).max() <= 1e-5
    rerank = table["rerank_score"].to_pylist()
    assert rerank == sorted(rerank, reverse=True)
    assert expected.std() > 0.05  # the scores differ from pair to pair: the check above means something
    return json.loads((out / "_manifest.json").read_text())


# --------------------------------------------------------------------------- the stage and the join, in process


def test_stage_scores_equal_predict_over_many_micro_batches(cross_encoder_dir, reference):
    """CrossEncodeStage alone: a 50-token budget cuts 300 pairs into many micro-batches of uneven width."""
    from pipeline.stages.cross_encode import CrossEncodeStage
    from pipeline.commands.rerank import RerankConfig

    texts = sample_texts()
    rng = np.random.default_rng(1)
    pairs = [(texts[i], texts[j]) for i, j in rng.integers(0, len(texts), (300, 2))]
    pairs += [(" ".join(texts[:40]), "kurz"), ("", "empty first text"), ("猫", "cat")]  # truncated, empty, one token
    config = RerankConfig(pairs="p", texts="t", model=cross_encoder_dir, output="o", max_batch_tokens=50)
    stage = CrossEncodeStage(config, "cpu", 1)
    batch = pa.table({"pair": np.arange(len(pairs)), "text_a": [a for a, _ in pairs], "text_b": [b for _, b in pairs]})
    out = stage(batch)
    assert out["pair"].to_pylist() == list(range(len(pairs)))
    assert np.abs(out["rerank_score"].to_numpy() - reference(pairs)).max() <= 1e-5
    assert out["n_tokens"].to_numpy().max() == 128  # the long pair was truncated to max_seq_length


def test_join_by_id_field_over_several_parts(tmp_path):
    """The join's tasks run in process: ids from --id-field, 3 parts, every pair gets both its texts."""
    from pipeline.storage.pair_texts import join_first, join_second, pick_texts
    from pipeline.storage.sources import ReadSpec, discover_shards

    src = tmp_path / "in"
    src.mkdir()
    docs = {f"doc-{k}": f"text number {k}" for k in range(50)}
    items = list(docs.items())
    for s in range(2):
        part = items[s::2]
        (src / f"s{s}.jsonl").write_text("".join(json.dumps({"key": k, "text": t}) + "\n" for k, t in part))
    (src / "s1.jsonl").open("a").write(json.dumps({"key": "blank", "text": "  "}) + "\n")
    pairs = [("doc-1", "doc-2"), ("doc-49", "doc-0"), ("doc-7", "doc-7x"), ("doc-10", "doc-1")]
    wanted = pa.array(sorted({i for p in pairs for i in p} - {"doc-7x"}))
    spec = ReadSpec("text", "key", (), "strict")
    parts = 3
    picked = [pick_texts(shard, spec, wanted, parts) for shard in discover_shards(str(src))]
    found = np.sort(np.concatenate([p[-1] for p in picked]))
    assert found.tolist() == list(range(len(wanted)))  # each wanted id once, the blank row never
    ok = [p for p in pairs if "doc-7x" not in p]
    index = {v: k for k, v in enumerate(wanted.to_pylist())}
    keyed = pa.table({"pair": np.arange(len(ok)), "pos_a": [index[a] for a, _ in ok], "pos_b": [index[b] for _, b in ok]})
    pos_a = keyed["pos_a"].to_numpy()
    firsts = [join_first(parts, keyed.filter(pa.array(pos_a % parts == p)), *[t[p] for t in picked]) for p in range(parts)]
    blocks = []
    for q in range(parts):
        got = join_second(parts, 2, len(picked), *[t[q] for t in picked], *[f[q] for f in firsts])
        blocks += got if isinstance(got, list) else [got]
    joined = pa.concat_tables(blocks).sort_by("pair")
    assert joined.column_names == ["pair", "text_a", "text_b"]
    assert list(zip(joined["text_a"].to_pylist(), joined["text_b"].to_pylist())) == [(docs[a], docs[b]) for a, b in ok]


def test_missing_and_repeated_ids_are_named():
    from pipeline.storage.pair_texts import _check_found

    wanted = pa.array(["a", "b", "c", "d"])
    with pytest.raises(InputError, match=r"--texts x: 2 of the 4 ids named by the pairs are not in it \(e.g. 'b'\)"):
        _check_found(np.array([0, 2]), wanted, "--texts x")
    with pytest.raises(InputError, match=r"id 'c' is on 2 rows \(1 ids repeated\)"):
        _check_found(np.array([0, 1, 2, 2, 3]), wanted, "--texts x")


# --------------------------------------------------------------------------- on the Ray cluster


def test_rerank_on_the_cluster_equals_predict_and_keeps_the_top(ray_cluster, tmp_path, capsys, cross_encoder_dir, reference):
    """The 120 best of 150 pairs over 3 shards, a join in 3 parts, blocks of 16 pairs for 2 replicas: predict's scores."""
    corpus = write_corpus(tmp_path / "in")
    pairs = write_pairs(tmp_path / "pairs", corpus, 150)
    out = tmp_path / "out"
    run = run_main(capsys, "rerank", "--pairs", str(tmp_path / "pairs"), "--texts", str(tmp_path / "in"), "--model",
                   cross_encoder_dir, "--output", str(out), "--top", "120", "--block-pairs", "16", "--join-parts", "3")
    assert run.returncode == 0, run.stderr
    assert "reranked 120 pairs in " in run.stdout and str(out) in run.stdout
    manifest = assert_reranked(out, pairs.slice(0, 120), corpus, reference)
    assert manifest["format"] == "embedpipe/reranked-pairs" and manifest["top"] == 120
    assert manifest["rows"]["pairs_in"] == 150 and manifest["rows"]["reranked"] == 120
    assert manifest["rows"]["tokens"] > 120 * 4
    assert manifest["pairs_input"] == str(tmp_path / "pairs") and manifest["texts"] == str(tmp_path / "in")
    model = manifest["model"]
    assert model["path"] == cross_encoder_dir and model["num_labels"] == 1 and model["fingerprint"].startswith("sha256:")
    assert model["activation_fn"] == "torch.nn.modules.activation.Sigmoid" and model["max_seq_length"] == 128
    assert manifest["config"]["join_parts"] == 3 and "storage_options" not in manifest["config"]
    resources = manifest["resources"]
    assert resources["num_encoders"] == 2 and resources["block_pairs"] <= 16 and resources["join_parts"] == 3
    assert resources["blocks"] >= 8 and manifest["timings"]["score_s"] > 0

    shown = run_main(capsys, "info", str(out), "--rows", "1")  # info reads a rerank output too
    assert shown.returncode == 0, shown.stderr
    assert '"format": "embedpipe/reranked-pairs"' in shown.stdout and '"reranked": 120' in shown.stdout
    best = pq.read_table(out / "pairs.parquet").slice(0, 1).to_pylist()[0]
    assert f"rerank {best['rerank_score']:.4f}  {best['id_a']} <-> {best['id_b']}" in shown.stdout


def test_any_parquet_of_id_pairs_is_reranked_a_score_column_being_optional(ray_cluster, tmp_path, capsys,
                                                                            cross_encoder_dir, reference):
    corpus = write_corpus(tmp_path / "in")
    pairs = write_pairs(tmp_path / "mined", corpus, 40).drop_columns(["score"])
    (tmp_path / "mine").mkdir()
    pq.write_table(pairs.slice(0, 25), tmp_path / "mine" / "a.parquet")  # a directory of the user's own files
    pq.write_table(pairs.slice(25), tmp_path / "mine" / "b.parquet")
    out = tmp_path / "out"
    args = ["rerank", "--pairs", str(tmp_path / "mine"), "--texts", str(tmp_path / "in"), "--model", cross_encoder_dir,
            "--output", str(out)]
    refused = run_main(capsys, *args, "--top", "5")
    assert_one_line_error(refused, 2, f"--top 5: --pairs {tmp_path / 'mine'} has no 'score' column to choose the best pairs by")
    assert run_main(capsys, *args).returncode == 0
    table = read_reranked(out)
    assert table.num_rows == 40 and table["score"].null_count == 40
    assert {(a, b) for a, b in zip(table["id_a"].to_pylist(), table["id_b"].to_pylist())} == set(
        zip(pairs["id_a"].to_pylist(), pairs["id_b"].to_pylist()))
    expected = reference([(corpus[a], corpus[b]) for a, b in zip(table["id_a"].to_pylist(), table["id_b"].to_pylist())])
    assert np.abs(table["rerank_score"].to_numpy() - expected).max() <= 1e-5
    assert json.loads((out / "_manifest.json").read_text())["score"] == "none: the pairs had no score"


def test_embed_mine_rerank_through_the_cli(ray_cluster, tmp_path, capsys, cross_encoder_dir, reference):
    """As a user runs it: embed with the default model, then mine --rerank-model (texts from the embeddings' manifest)."""
    corpus = write_corpus(tmp_path / "in")
    src, emb, pairs_dir = (str(tmp_path / n) for n in ("in", "emb", "pairs"))
    assert main(["embed", "--input", src, "--output", emb, "--quiet", "--num-encoders", "1"]) == 0
    run = run_main(capsys, "mine", "--embeddings", emb, "--output", pairs_dir, "--top-k", "3",
                   "--rerank-model", cross_encoder_dir)
    assert run.returncode == 0, run.stderr
    mined = pq.read_table(os.path.join(pairs_dir, "pairs.parquet"))
    assert mined.num_rows > 50 and f"reranked {mined.num_rows:,} pairs" in run.stdout
    manifest = assert_reranked(tmp_path / "pairs-reranked", mined, corpus, reference)
    assert manifest["texts"] == src and manifest["pairs_input"] == pairs_dir and manifest["top"] is None
    assert manifest["rows"]["pairs_in"] == manifest["rows"]["reranked"] == mined.num_rows
    assert_manifest_sections(emb, "dense")
    assert_manifest_sections(pairs_dir, "pairs")
    assert_manifest_sections(tmp_path / "pairs-reranked", "reranked")

    before = snapshot(tmp_path / "pairs-reranked")  # rerank into it again: refused, nothing clobbered
    out = pairs_dir + "-reranked"
    again = run_main(capsys, "rerank", "--pairs", pairs_dir, "--texts", src, "--model", cross_encoder_dir, "--output", out)
    assert_one_line_error(again, 2, f"--output {out} already holds pairs.parquet and _manifest.json; use --overwrite")
    assert snapshot(tmp_path / "pairs-reranked") == before


def assert_manifest_sections(directory, kind):
    """One shape for every output (pipeline.manifest): the common sections, then only documented keys."""
    from pipeline.manifest import COMMON_KEYS, FORMAT_VERSION, KEYS, SECTION

    manifest = json.loads((Path(directory) / "_manifest.json").read_text())
    assert manifest["kind"] == kind and manifest["format_version"] == FORMAT_VERSION
    assert set(COMMON_KEYS) <= set(manifest) <= set(COMMON_KEYS) | set(KEYS[SECTION[kind]])
    assert manifest["config"] and manifest["versions"]["embedpipe"] and manifest["timings"]["seconds"] >= 0
    for entry in manifest["files"]:
        assert pq.read_metadata(Path(directory) / entry["file"]).num_rows == entry["rows"]


@pytest.mark.slow  # a second embed of the corpus; the chained path itself runs above through mine --rerank-model
def test_embed_mine_rerank_in_one_command(ray_cluster, tmp_path, capsys, cross_encoder_dir, reference):
    corpus = write_corpus(tmp_path / "in")
    run = run_main(capsys, "embed", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "emb"), "--mine",
                   "--mine-top-k", "2", "--rerank-model", cross_encoder_dir, "--rerank-top", "20")
    assert run.returncode == 0, run.stderr
    assert "embedded " in run.stdout and "mined " in run.stdout and "reranked 20 pairs" in run.stdout
    mined = pq.read_table(tmp_path / "emb-pairs" / "pairs.parquet").slice(0, 20)
    assert_reranked(tmp_path / "emb-pairs-reranked", mined, corpus, reference)


# --------------------------------------------------------------------------- bad input: exit 2, one line, nothing written


@pytest.fixture
def good(tmp_path):
    """A small corpus and pairs of its ids; the output directory exists and is empty."""
    corpus = write_corpus(tmp_path / "in")
    write_pairs(tmp_path / "pairs", corpus, 10)
    (tmp_path / "out").mkdir()
    return tmp_path


def rerank_args(tmp_path, model: str, *extra: str) -> list[str]:
    return ["rerank", "--pairs", str(tmp_path / "pairs"), "--texts", str(tmp_path / "in"), "--model", model,
            "--output", str(tmp_path / "out"), "--quiet", *extra]


@pytest.fixture(scope="module")
def two_label_dir(tmp_path_factory, default_model_path) -> str:
    return save_cross_encoder(default_model_path, str(tmp_path_factory.mktemp("two-labels") / "ce"), num_labels=2)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-pairs", "--pairs {tmp}/nope: no such file or directory"),
        ("pairs-without-file", "--pairs {tmp}/in: holds no Parquet file of pairs (pairs.parquet from `embedpipe mine`, or any with id_a and id_b columns)"),
        ("pairs-without-id_b", "pairs.parquet has no 'id_b' column"),
        ("bi-encoder", "--model all-MiniLM-L6-v2: a sentence-transformers bi-encoder (it has a Pooling module), not a cross-encoder"),
        ("no-head", "not a cross-encoder: its model is BertModel, without a sequence-classification head"),
        ("two-labels", "has 2 labels; rerank needs a single-score cross-encoder (num_labels 1)"),
        ("top-0", "--top must be a positive integer, got 0"),
        ("missing-texts", "--texts {tmp}/nothing-*.txt: the glob matches no files"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(good, capsys, cross_encoder_dir, tiny_bert_dir, two_label_dir, case, message):
    tmp = good
    model, extra = cross_encoder_dir, []
    args = rerank_args(tmp, model)
    if case == "missing-pairs":
        args[2] = str(tmp / "nope")
    elif case == "pairs-without-file":
        args[2] = str(tmp / "in")
    elif case == "pairs-without-id_b":
        pq.write_table(pa.table({"id_a": ["en.txt:0"], "other": ["en.txt:1"], "score": [0.5]}), tmp / "pairs" / "pairs.parquet")
    elif case == "bi-encoder":
        args[6] = "all-MiniLM-L6-v2"
    elif case == "no-head":
        args[6] = tiny_bert_dir
    elif case == "two-labels":
        args[6] = two_label_dir
    elif case == "top-0":
        extra = ["--top", "0"]
    elif case == "missing-texts":
        args[4] = str(tmp / "nothing-*.txt")
    run = run_main(capsys, *args, *extra)
    assert_one_line_error(run, 2, message.format(tmp=tmp))
    assert os.listdir(tmp / "out") == []


def test_unknown_ids_are_counted_and_one_is_named(ray_cluster, good, capsys, cross_encoder_dir):
    table = pq.read_table(good / "pairs" / "pairs.parquet")
    ids_b = table["id_b"].to_pylist()
    ids_b[3], ids_b[5] = "en.txt:999", "zh.csv:-1"
    pq.write_table(table.set_column(1, "id_b", pa.array(ids_b)), good / "pairs" / "pairs.parquet")
    run = run_main(capsys, *rerank_args(good, cross_encoder_dir))
    assert_one_line_error(run, 2, f"--texts {good / 'in'}: 2 of the ")
    assert "ids named by the pairs are not in it (e.g. 'en.txt:999')" in run.stderr
    assert os.listdir(good / "out") == []


def test_no_pairs_give_an_empty_output_without_starting_ray(good, capsys, cross_encoder_dir):
    pq.write_table(pq.read_table(good / "pairs" / "pairs.parquet").slice(0, 0), good / "pairs" / "pairs.parquet")
    run = run_main(capsys, *rerank_args(good, cross_encoder_dir))
    assert run.returncode == 0, run.stderr
    assert read_reranked(good / "out").num_rows == 0
    manifest = json.loads((good / "out" / "_manifest.json").read_text())
    assert manifest["rows"]["reranked"] == 0 and manifest["resources"] is None


def test_rerank_options_need_their_command(tmp_path):
    from pipeline.config import build_config
    from pipeline.commands.mine import MineConfig

    with pytest.raises(UsageError, match="--rerank-model needs --mine"):
        build_config(input="i", output="o", rerank_model="m")
    with pytest.raises(UsageError, match="--rerank-top is only used with --rerank-model"):
        build_config(input="i", output="o", mine=True, rerank_top=3)
    with pytest.raises(UsageError, match="--texts is only used with --rerank-model"):
        MineConfig("e", "o", texts="t")
    with pytest.raises(UsageError, match="--rerank-top must be a positive integer, got 0"):
        MineConfig("e", "o", rerank_model="m", rerank_top=0)


def test_rerank_config_loads_through_the_cli_validation_and_documents_every_field(tmp_path):
    from pipeline.config import RerankConfig, build_rerank_config

    path = os.path.join(REPO, "configs", "rerank.yaml")
    config = build_rerank_config(path, model="some/dir")
    assert config.pairs and config.texts and config.output and config.top is None
    assert build_rerank_config(path, model="m", top=5).top == 5  # flags override the file
    text = open(path, encoding="utf-8").read()
    undocumented = [f.name for f in fields(RerankConfig) if not re.search(rf"^#? ?{f.name}:.*#", text, re.M)]
    assert not undocumented
    (tmp_path / "r.yaml").write_text("rerank:\n  pairs: p\n  texts: t\n  model: m\n  output: o\n  topn: 3\n")
    with pytest.raises(UsageError, match="unknown key 'topn'"):
        build_rerank_config(str(tmp_path / "r.yaml"))
