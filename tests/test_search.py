"""`embedpipe search` and `pipeline.search`: exact top-k by cosine over a real embed output, the same
answer as util.semantic_search on the output's vectors and the queries encoded as encode_query does;
quantised outputs scored as `mine` reads them; the output read a block at a time; query files to
results.parquet; one clear line for every bad input."""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers.util import semantic_search as st_search

import pipeline
from pipeline.commands.search import RESULTS_FILE, RESULTS_SCHEMA
from pipeline.config import SearchConfig, build_search_config
from pipeline.errors import UsageError
from pipeline.quantization import ranges_of
from pipeline.storage.readers import output_format
from tests.conftest import (
    REPO, assert_one_line_error, assert_same_search, cli, make_st_dir, run_main, sample_texts, write_lines,
)

TEXTS = sample_texts()[::10]  # 150 English, German and Chinese texts
QUERIES = ["a cat sleeping in the sun", "Liebe und Ehe", "money cannot buy happiness", TEXTS[7]]


@pytest.fixture(scope="module")
def st_model(default_model_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(default_model_path, device="cpu")


@pytest.fixture(scope="module")
def corpus(ray_cluster, tmp_path_factory):
    """The default model's float32 output of TEXTS in 5 files (2 input files, 40 rows a file)."""
    src = tmp_path_factory.mktemp("search-in")
    write_lines(src / "a.txt", TEXTS[:90])
    write_lines(src / "b.txt", TEXTS[90:])
    out = src.parent / (src.name + "-vectors")
    pipeline.embed(input=str(src), output=str(out), quiet=True, num_encoders=1, rows_per_file=40)
    return src, out


def text_of(doc_id: str) -> str:
    name, row = doc_id.rsplit(":", 1)
    return TEXTS[int(row) + (90 if name == "b.txt" else 0)]


def reference(st_model, out, queries, top_k, **encode):
    """semantic_search on the output's vectors as read_embeddings reads them (int8 as bucket centres,
    binary as +1/-1) and the queries encoded by encode_query, stored and read back as the output's."""
    ids, docs = pipeline.read_embeddings(str(out), dequantize=True)
    vectors = st_model.encode_query(queries, **encode) if not encode else st_model.encode(queries, **encode)
    stored = output_format(str(out)).decode(pipeline.quantize_queries(vectors, str(out)))
    return ids, st_search(stored, docs, top_k=top_k)


def test_equals_semantic_search_on_the_default_models_output(corpus, st_model, tmp_path):
    src, out = corpus
    queries = write_lines(tmp_path / "q.txt", QUERIES)
    result = pipeline.search(embeddings=str(out), queries=queries, top_k=5)
    ids, ref = reference(st_model, out, QUERIES, 5)
    assert_same_search(result.results, ref, tol=1e-6)
    assert [[h["id"] for h in hits] for hits in result.results] == [[ids[h["corpus_id"]] for h in hits] for hits in ref]
    assert result.query_ids == ["0", "1", "2", "3"] and result.documents == len(TEXTS) == len(ids)
    top = result.hits(3)[0]  # a document's own text finds it first
    assert top["id"] == "a.txt:7" and top["score"] > 0.9999 and top["rank"] == 1
    # read a block of 7 rows at a time (blocks within files, files one after another): the same answer
    blocked = pipeline.search(SearchConfig(embeddings=str(out), queries=queries, top_k=5, block_size=7))
    assert_same_search(blocked.results, ref, tol=1e-6)
    everything = pipeline.search(embeddings=str(out), query="cats", top_k=1000)  # top_k beyond the rows
    assert len(everything.hits(0)) == len(TEXTS)
    assert_same_search(everything.results, reference(st_model, out, ["cats"], 1000)[1], tol=1e-6)


def test_cli_prints_ids_scores_and_texts(corpus, capsys):
    src, out = corpus
    run = run_main(capsys, "search", str(out), "money cannot buy happiness", "--top-k", "3", "--texts", str(src))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "query: money cannot buy happiness" and len(lines) == 4
    expected = pipeline.search(embeddings=str(out), query="money cannot buy happiness", top_k=3).hits(0)
    for line, hit in zip(lines[1:], expected):
        rank, score, doc_id, text = re.fullmatch(r"\s*(\d+)  (\d\.\d{4})  (\S+)  (.*)", line).groups()
        assert (int(rank), doc_id, score) == (hit["rank"], hit["id"], f"{hit['score']:.4f}")
        assert text.rstrip("…") in " ".join(text_of(doc_id).split())
    plain = run_main(capsys, "search", str(out), "money cannot buy happiness", "--top-k", "3")
    assert [line.split()[:3] for line in plain.stdout.splitlines()[1:]] == [line.split()[:3] for line in lines[1:]]


def test_query_files_write_results_parquet_and_a_manifest(corpus, tmp_path, capsys):
    src, out = corpus
    txt = tmp_path / "q.txt"
    txt.write_text("a cat sleeping in the sun\n\n  \nLiebe und Ehe\n", encoding="utf-8")  # ids: line numbers
    results = tmp_path / "results"
    run = run_main(capsys, "search", str(out), "--queries", str(txt), "--output", str(results), "--top-k", "4")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"searched {len(TEXTS)} documents for 2 queries (top 4)")
    table = pq.read_table(results / RESULTS_FILE)
    assert table.schema.remove_metadata() == RESULTS_SCHEMA
    assert [(f.name, f.type) for f in table.schema] == [
        ("query_id", pa.string()), ("id", pa.string()), ("rank", pa.int32()), ("score", pa.float32())]
    assert table["query_id"].to_pylist() == ["0"] * 4 + ["3"] * 4 and table["rank"].to_pylist() == [1, 2, 3, 4] * 2
    api = pipeline.search(embeddings=str(out), queries=str(txt), top_k=4)
    assert table["id"].to_pylist() == api.ids.to_pylist()
    assert np.array_equal(table["score"].to_numpy(), api.scores.reshape(-1))
    manifest = json.loads((results / "_manifest.json").read_text())
    assert (manifest["kind"], manifest["format"], manifest["rows"]) == (
        "search", "embedpipe/search-results", {"queries": 2, "documents": len(TEXTS), "results": 8})
    assert manifest["top_k"] == 4 and manifest["precision"] == "float32" and manifest["queries"] == str(txt)
    assert manifest["model"]["fingerprint"].startswith("sha256:") and manifest["embeddings_identity"].startswith("sha256:")
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"id": "q-cat", "text": "a cat sleeping in the sun"}\n\n{"id": 7, "text": "Liebe und Ehe"}\n')
    run = run_main(capsys, "search", str(out), "--queries", str(jsonl), "--output", str(results), "--top-k", "4",
                   "--quiet")
    assert run.returncode == 0 and run.stdout == "", run.stderr  # the results replaced, no summary line
    again = pq.read_table(results / RESULTS_FILE)
    assert again["query_id"].to_pylist() == ["q-cat"] * 4 + ["7"] * 4 and again["id"].equals(table["id"])
    info = run_main(capsys, "info", str(results), "--rows", "2")
    assert info.returncode == 0 and '"kind": "search"' in info.stdout and "query q-cat    1" in info.stdout


@pytest.mark.parametrize("precision", ["binary", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantised_outputs_are_scored_as_mine_reads_them(ray_cluster, corpus, st_model, tmp_path, precision):
    """Documents and queries as `mine` reads them: int8 as bucket centres between the run's ranges,
    binary as +1/-1 (scored 1 - 2 * Hamming / dim exactly; semantic_search's cosine of the normalised
    +1/-1 vectors is within float32 rounding of it, hence tol 1e-5)."""
    src, out = corpus
    options = {}
    if precision == "int8":  # the float32 output's ranges, from a file: no calibration rows to embed
        np.save(tmp_path / "ranges.npy", ranges_of(pipeline.read_embeddings(str(out))[1]))
        options["calibration"] = str(tmp_path / "ranges.npy")
    quantised = tmp_path / precision
    pipeline.embed(input=str(src), output=str(quantised), quiet=True, num_encoders=1, precision=precision, **options)
    result = pipeline.search(embeddings=str(quantised), queries=write_lines(tmp_path / "q.txt", QUERIES), top_k=8)
    ids, ref = reference(st_model, quantised, QUERIES, 8)
    assert_same_search(result.results, ref, tol=1e-5)
    assert result.hits(3)[0]["id"] == "a.txt:7" and result.hits(3)[0]["score"] > 0.99  # its own stored vector
    if precision == "binary":  # 1 - 2 * Hamming / 384, exactly
        assert all(round((1 - h["score"]) * 384 / 2, 4).is_integer() for hits in result.results for h in hits)
    floats = pipeline.search(embeddings=str(out), query=QUERIES[2], top_k=8).hits(0)
    assert [h["score"] for h in floats] != [h["score"] for h in result.hits(2)]  # not the float32 scores


def test_the_models_query_prompt_is_used_and_can_be_overridden(ray_cluster, tmp_path, tiny_bert_dir):
    from sentence_transformers import SentenceTransformer

    prompts = {"query": "query: ", "document": "passage: "}
    model_dir = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean", prompts=prompts)
    write_lines(tmp_path / "docs.txt", TEXTS[:60])
    out = tmp_path / "out"
    pipeline.embed(input=str(tmp_path / "docs.txt"), output=str(out), model=model_dir, role="document", quiet=True,
                   num_encoders=1)
    model = SentenceTransformer(model_dir, device="cpu")
    queries = write_lines(tmp_path / "q.txt", QUERIES[:3])
    found = pipeline.search(embeddings=str(out), queries=queries, top_k=5)
    assert found.prompt == "query: "
    assert_same_search(found.results, reference(model, out, QUERIES[:3], 5)[1], tol=1e-6)  # encode_query's vectors
    no_prompt = pipeline.search(embeddings=str(out), queries=queries, top_k=5, prompt="")
    assert_same_search(no_prompt.results, reference(model, out, QUERIES[:3], 5, prompt="")[1], tol=1e-6)
    assert np.abs(found.scores - no_prompt.scores).max() > 1e-3  # the prompt changed the query vectors
    named = pipeline.search(embeddings=str(out), queries=queries, top_k=5, prompt_name="document")
    assert named.prompt == "passage: "
    assert_same_search(named.results, reference(model, out, QUERIES[:3], 5, prompt_name="document")[1], tol=1e-6)
    with pytest.raises(UsageError, match=r"--prompt-name 'title': the model has prompts \['document', 'query'\]"):
        pipeline.search(embeddings=str(out), query="x", prompt_name="title")


def test_bad_input_is_one_line_exit_2(corpus, tmp_path, capsys, tiny_model):
    src, out = corpus
    results = tmp_path / "results"
    assert run_main(capsys, "search", str(out), "x", "--output", str(results)).returncode == 0
    empty, csv = tmp_path / "empty.txt", tmp_path / "q.csv"
    empty.write_text("\n \n")
    csv.write_text("text\nx\n")
    bad_jsonl, twice = tmp_path / "bad.jsonl", tmp_path / "twice.jsonl"
    bad_jsonl.write_text('{"id": 1, "text": "x"}\n{"id": 2}\n')
    twice.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\ncaf\xe9\n")
    queries = ["--output", str(tmp_path / "o"), "--queries"]
    cases = [
        ((str(tmp_path / "nope"), "x"), "nope: no such directory"),
        ((str(src), "x"), "no _manifest.json (not an embedpipe output"),
        ((str(results), "x"), "holds search output, expected dense"),
        ((str(out / os.listdir(out)[0]), "x"), "is a file; search takes the output directory"),
        ((str(out), *queries, str(empty)), f"--queries {empty}: holds no queries"),
        ((str(out), *queries, str(csv)), "expected a .txt file (one query a line) or a .jsonl file"),
        ((str(out), *queries, str(bad_jsonl)), f"--queries {bad_jsonl}:2: has no 'text'"),
        ((str(out), *queries, str(twice)), "query id 'a' is given twice (queries 1 and 2)"),
        ((str(out), *queries, str(tmp_path / "missing.txt")), "missing.txt: no such file"),
        ((str(out), *queries, str(latin)), f"--queries {latin}:2: not valid UTF-8"),
        ((str(out), "--queries", str(empty)), "--queries needs --output DIR"),
        ((str(out), "x", "--texts", str(src), "--output", str(results)), "--texts prints the hits' texts"),
        ((str(out), "x", "--queries", str(empty), "--output", str(results)), "give a QUERY or --queries FILE, not both"),
        ((str(out),), "give a QUERY, or --queries FILE"),
        ((), "EMBEDDINGS is required"),
        ((str(out), "  "), "QUERY is empty"),
        ((str(out), "x", "--top-k", "0"), "--top-k must be a positive integer, got 0"),
        ((str(out), "x", "--output", str(out)), "holds a dense output (_manifest.json); search results need a directory"),
        ((str(out), "x", "--model", tiny_model), f"--model {tiny_model}: not the model that made {out}"),
        ((str(out), "x", "--texts", str(tmp_path / "nope")), f"--texts {tmp_path / 'nope'}"),
        ((str(out), "x", "--top-k", "150", "--texts", str(src / "a.txt")), "id 'b.txt:"),
    ]
    for args, message in cases:
        run = run_main(capsys, "search", *args)
        assert_one_line_error(run, 2, message)
    assert sorted(os.listdir(results)) == ["_manifest.json", RESULTS_FILE]  # a refused run touches nothing
    assert_one_line_error(cli("search", str(tmp_path / "nope"), "x"), 2, "nope: no such directory")  # a real process


def test_search_yaml_loads_and_documents_every_field():
    path = os.path.join(REPO, "configs", "search.yaml")
    config = build_search_config(path)
    assert (config.embeddings, config.queries, config.top_k) == ("output/sample", "data/queries.txt", 10)
    assert os.path.isfile(os.path.join(REPO, config.queries))
    assert build_search_config(path, top_k=3).top_k == 3  # flags win over the file
    text = open(path, encoding="utf-8").read()
    undocumented = [f.name for f in fields(SearchConfig) if not re.search(rf"^#? ?{f.name}:.*#", text, re.M)]
    assert not undocumented
