"""Where long documents are cut (pipeline.stages.chunking), on real long text: the long descriptions
of installed packages (METADATA), and Chinese text without spaces (the sample's proverbs joined)."""

from __future__ import annotations

import csv
import glob
import os
import sysconfig

import numpy as np
import pytest

from pipeline.stages.chunking import OVERLAP_SLACK, boundary_score, chunk_spans, token_offsets
from tests.conftest import SAMPLE


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(default_model_path, "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def long_texts() -> list[str]:
    """The 12 longest package descriptions of this environment (5-60 KB each), and Chinese."""
    site = sysconfig.get_paths()["purelib"]
    texts = [open(p, encoding="utf-8", errors="replace").read() for p in glob.glob(f"{site}/*.dist-info/METADATA")]
    texts = sorted(texts, key=len)[-12:]
    with open(os.path.join(SAMPLE, "zh.csv"), encoding="utf-8", newline="") as f:
        texts.append("".join(row["text"].split(" --")[0].replace(" ", "") for row in csv.DictReader(f)) * 3)  # poems, no attributions
    return texts


def spans_of(tokenizer, text, n, overlap):
    def count(texts):
        return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    encoding = tokenizer.encode(text, add_special_tokens=False)
    offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    return chunk_spans(text, offsets, n, overlap, count), offsets, count


@pytest.mark.parametrize("n, overlap", [(128, 0), (200, 40), (32, 8)])
def test_chunks_fit_cover_every_character_in_order_and_overlap_as_asked(tokenizer, n, overlap):
    for text in long_texts():
        spans, offsets, count = spans_of(tokenizer, text, n, overlap)
        assert len(spans) > 1
        assert max(count([text[s:e] for s, e in spans])) <= n  # each chunk, tokenised again alone, fits
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(spans, spans[1:]))  # in order, moving on
        covered = np.zeros(len(text), bool)
        for s, e in spans:
            covered[s:e] = True
        missed = [i for i in np.flatnonzero(~covered) if not text[i].isspace()]
        assert not missed, f"not embedded: {text[missed[0] - 10: missed[0] + 10]!r}"
        token_starts = offsets[:, 0]
        for (_, end), (start, _) in zip(spans, spans[1:]):
            shared = int(((token_starts >= start) & (offsets[:, 1] <= end)).sum())  # tokens in both chunks
            if overlap == 0:
                assert start >= end  # no token is embedded twice
            else:
                assert overlap - OVERLAP_SLACK <= shared <= overlap, shared  # the tolerance usage.md states


def test_cuts_fall_after_sentences_or_at_whitespace_when_the_text_has_them(tokenizer):
    text = max(long_texts()[:-1], key=len)
    spans, _, _ = spans_of(tokenizer, text, 128, 0)
    scores = [boundary_score(text, end, nxt) for (_, end), (nxt, _) in zip(spans, spans[1:])]
    assert min(scores) >= 1 and scores.count(3) >= 10  # never inside a word; after a sentence where one ends near
    assert sum(score >= 2 for score in scores) >= 0.9 * len(scores)  # prose: at whitespace (a URL may leave none)
    for (_, end), score in zip(spans, scores):  # checked without boundary_score: a sentence's end, then a space
        assert score != 3 or (text[end - 1] in ".!?;" and text[end].isspace()), text[end - 20:end + 5]


def test_chinese_is_cut_between_characters_preferring_sentence_ends(tokenizer):
    text = long_texts()[-1]
    assert " " not in text
    spans, _, count = spans_of(tokenizer, text, 64, 0)
    assert max(count([text[s:e] for s, e in spans])) <= 64
    assert "".join(text[s:e] for s, e in spans) == text  # nothing lost, nothing twice
    assert sum(text[e - 1] in "。！？；" for _, e in spans[:-1]) > len(spans) / 2


def test_a_short_document_is_one_chunk_covering_all_of_it(tokenizer):
    text = "  A short document.  "
    spans, _, _ = spans_of(tokenizer, text, 128, 16)
    assert spans == [(0, len(text))]


def test_a_cut_inside_a_word_that_tokenises_differently_alone_is_shortened(tokenizer):
    # one long "word" without spaces: every cut is inside it, and a WordPiece continuation (##x)
    # tokenised alone becomes another, often longer, sequence of tokens
    text = "x" + "antidisestablishmentarianism" * 40
    spans, _, count = spans_of(tokenizer, text, 16, 0)
    assert max(count([text[s:e] for s, e in spans])) <= 16
    assert "".join(text[s:e] for s, e in spans) == text


# --------------------------------------------------------------------------- embed --chunk-tokens, end to end


@pytest.fixture(scope="module")
def st_model(default_model_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(default_model_path, device="cpu")


def write_documents(path, texts, prefix: str = "doc") -> dict[str, str]:
    import json

    docs = {f"{prefix}-{k}": text for k, text in enumerate(texts)}
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text in docs.items():
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return docs


def test_a_long_document_tokenised_in_windows_has_the_whole_documents_tokens(tokenizer):
    for text in long_texts()[-4:]:  # three package descriptions and the Chinese poems (no spaces at all)
        whole = np.array(tokenizer.encode(text, add_special_tokens=False).offsets, np.int64).reshape(-1, 2)
        windowed = token_offsets(tokenizer, text, window=3000)
        assert len(text) > 3 * 3000
        np.testing.assert_array_equal(windowed, whole)


MEMORY_SCRIPT = """
import json, sys
import pyarrow as pa
from pipeline.models.fast_tokenizer import spec_for
from pipeline.stages.tokenize import TokenizeStage
from tests.test_fast_tokenizer import _loaded
from tests.test_chunking import long_texts

def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

config, loaded, prompt = _loaded(sys.argv[1], chunk_tokens=200, chunk_overlap=20)
stage = TokenizeStage(config, spec=spec_for(loaded, prompt))
del loaded
texts = long_texts()
size = int(sys.argv[2])
parts, total = [], 0
while total < size:  # real text, repeated to the size asked
    parts.append(texts[len(parts) % len(texts)])
    total += len(parts[-1].encode()) + 2
text = "\\n\\n".join(parts)
text = text[: text.rfind(" ", 0, size)]
batch = pa.table({"id": ["big"], "text": [text], "_valid": [True], "_file": ["f"]})
list(stage(pa.table({"id": ["w"], "text": [texts[0]], "_valid": [True], "_file": ["f"]})))  # warm
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = hwm()
chunks = sum(piece.num_rows for piece in stage(batch))  # blocks of chunks, handed on one at a time
print(json.dumps({"bytes": len(text.encode()), "chunks": chunks, "growth": hwm() - before}))
"""


@pytest.mark.slow  # ~40 s on 2 cores: a 10 MB document, tokenised, cut, checked and tokenised again
def test_a_10_mb_document_is_chunked_with_at_most_20_times_its_size_in_memory(default_model_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, default_model_path, str(10 << 20)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["bytes"] > 9 << 20 and got["chunks"] > 10_000
    assert got["growth"] <= 20 * got["bytes"], f"the tokenizer's peak grew {got['growth'] / got['bytes']:.1f}x the document"


def test_every_chunk_is_embedded_once_as_sentence_transformers_embeds_its_text(ray_cluster, tmp_path, st_model):
    import pyarrow.parquet as pq

    from pipeline import EmbedConfig
    from pipeline.commands.embed import run_embed

    texts = [t[:6000] for t in long_texts()[-4:]] + ["A short document: one chunk.", ""]
    docs = write_documents(tmp_path / "docs.jsonl", texts)
    out = tmp_path / "out"
    result = run_embed(EmbedConfig(input=str(tmp_path / "docs.jsonl"), output=str(out), id_field="id",
                                   chunk_tokens=64, chunk_overlap=8, keep_columns=("text",), quiet=True))
    table = pq.read_table(out).to_pylist()
    assert list(table[0]) == ["id", "doc_id", "chunk", "start", "end", "embedding", "text"]
    by_doc: dict[str, list[dict]] = {}
    for row in table:
        by_doc.setdefault(row["doc_id"], []).append(row)
        assert row["id"] == f"{row['doc_id']}#{row['chunk']}"
        assert row["text"] == docs[row["doc_id"]][row["start"]:row["end"]]
    assert sorted(by_doc) == sorted(d for d, t in docs.items() if t)  # the empty one is counted, not embedded
    for doc_id, rows in by_doc.items():
        assert [r["chunk"] for r in rows] == list(range(len(rows)))  # in order, each once
    assert [(r["start"], r["end"]) for r in by_doc["doc-4"]] == [(0, len(docs["doc-4"]))]
    assert len(by_doc["doc-0"]) > 5

    got = np.array([r["embedding"] for r in table], np.float32)
    want = st_model.encode([r["text"] for r in table], batch_size=64)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.99999

    rows = result.manifest["rows"]
    assert rows["documents"] == 6 and rows["embedded"] == 5 and rows["invalid"] == 1 and rows["truncated"] == 0
    assert rows["chunks"] == len(table) and result.chunks == len(table)
    assert rows["chunks_per_document"]["max"] == max(len(r) for r in by_doc.values())
    assert result.manifest["chunking"] == {"tokens": 64, "overlap": 8}
    assert f"as {len(table):,} chunks" in result.summary_line()


def test_a_resume_with_other_chunk_settings_is_refused(ray_cluster, tmp_path, tiny_model, capsys):
    from tests.conftest import assert_one_line_error, run_main

    write_documents(tmp_path / "docs.jsonl", [t[:3000] for t in long_texts()[-3:]])
    args = ["embed", "--input", str(tmp_path / "docs.jsonl"), "--output", str(tmp_path / "out"), "--model", tiny_model,
            "--id-field", "id", "--quiet"]
    assert run_main(capsys, *args, "--chunk-tokens", "48").returncode == 0
    other = run_main(capsys, *args, "--chunk-tokens", "64")
    assert_one_line_error(other, 2, "holds vectors of chunks of at most 48 tokens sharing 0 (--chunk-tokens/--chunk-overlap), "
                                    "this run embeds chunks of at most 64 tokens")
    whole = run_main(capsys, *args)
    assert_one_line_error(whole, 2, "this run embeds whole documents (no --chunk-tokens)")
    too_long = run_main(capsys, "embed", "--input", str(tmp_path / "docs.jsonl"), "--output", str(tmp_path / "o2"),
                        "--model", tiny_model, "--chunk-tokens", "500")
    assert_one_line_error(too_long, 2, "--chunk-tokens 500: model")
    assert "reads 64 tokens, 2 of them special tokens and prompt; at most 62" in too_long.stderr  # [CLS], [SEP]


def test_mine_pairs_chunks_of_different_documents_and_rerank_cuts_their_texts(ray_cluster, tmp_path, tiny_model,
                                                                              cross_encoder_dir, capsys):
    """embed --chunk-tokens, then mine --rerank-model as a user chains them: the pairs are chunks of two
    documents, and the cross-encoder scores text[start:end] of both, found through the embeddings output."""
    import json

    import pyarrow.parquet as pq
    from sentence_transformers import CrossEncoder

    from tests.conftest import assert_one_line_error, run_main

    docs = write_documents(tmp_path / "docs.jsonl", [t[:2500] for t in long_texts()[-6:]])
    emb, pairs = str(tmp_path / "emb"), str(tmp_path / "pairs")
    assert run_main(capsys, "embed", "--input", str(tmp_path / "docs.jsonl"), "--output", emb, "--model", tiny_model,
                    "--id-field", "id", "--chunk-tokens", "48", "--chunk-overlap", "8", "--quiet").returncode == 0
    run = run_main(capsys, "mine", "--embeddings", emb, "--output", pairs, "--top-k", "3", "--rerank-model", cross_encoder_dir)
    assert run.returncode == 0, run.stderr
    assert json.loads(open(f"{pairs}/_manifest.json").read())["same_document_pairs"] == "left out"
    chunks = {r["id"]: r for r in pq.read_table(emb, columns=["id", "doc_id", "start", "end"]).to_pylist()}
    reranked = pq.read_table(f"{pairs}-reranked/pairs.parquet").to_pylist()
    assert len(reranked) > 20 and all(chunks[r["id_a"]]["doc_id"] != chunks[r["id_b"]]["doc_id"] for r in reranked)

    def text(chunk_id):
        c = chunks[chunk_id]
        return docs[c["doc_id"]][c["start"]:c["end"]]

    want = CrossEncoder(cross_encoder_dir, device="cpu").predict([(text(r["id_a"]), text(r["id_b"])) for r in reranked])
    assert np.allclose([r["rerank_score"] for r in reranked], want, atol=1e-5)
    assert json.loads(open(f"{pairs}-reranked/_manifest.json").read())["chunks_from"] == emb

    import pipeline

    found = pipeline.search(embeddings=emb, query=text(reranked[0]["id_a"]), texts=str(tmp_path / "docs.jsonl"), top_k=5)
    hits = found.results[0]
    assert found.summary_line().startswith(f"searched {len(chunks):,} chunks for")
    assert hits[0]["id"] == reranked[0]["id_a"] and [h["text"] for h in hits] == [text(h["id"]) for h in hits]

    shown = run_main(capsys, "info", emb, "--pairs", "4")  # info's own scan leaves same-document pairs out too
    lines = [line.split() for line in shown.stdout.splitlines() if "<->" in line]
    assert shown.returncode == 0 and '"chunking"' in shown.stdout and len(lines) == 4
    assert all(a.split("#")[0] != b.split("#")[0] for _, a, _, b in lines)
    one = run_main(capsys, "info", emb, "--pairs", "4", "--pairs-in", "doc-1#*")  # one document: no pair
    assert one.returncode == 0 and "0 most similar pairs (cosine) among the ids matching doc-1#*:" in one.stdout

    os.remove(f"{pairs}/_manifest.json")  # pairs of chunk ids with nothing saying where their texts are
    blind = run_main(capsys, "rerank", "--pairs", pairs, "--texts", str(tmp_path / "docs.jsonl"), "--id-field", "id",
                     "--model", cross_encoder_dir, "--output", str(tmp_path / "r2"))
    assert_one_line_error(blind, 2, "ids named by the pairs are not in it")
    assert "--embeddings" in blind.stderr


@pytest.mark.slow  # ~90 s on 2 cores: a run killed mid-way, then its rerun
def test_kill_9_mid_chunked_run_then_rerun_embeds_every_chunk_once(tmp_path, tiny_bert_dir, default_model_path):
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from pipeline.stages.chunking import Chunker
    from tests.conftest import cli, committed, kill_cli_when
    from tests.slow_model import make_slow_model

    slow = make_slow_model(tiny_bert_dir, str(tmp_path / "slow"), delay=0.5)
    texts = [t[k * 1500:(k + 1) * 1500] for t in long_texts()[:-1] for k in range(4)]
    (tmp_path / "in").mkdir()
    chunker = Chunker(Tokenizer.from_file(os.path.join(default_model_path, "tokenizer.json")).to_str(), False, 32, 0)
    counts = [len(spans) for spans in chunker.spans(texts)]
    expected = []
    for shard in range(4):
        write_documents(tmp_path / "in" / f"s{shard}.jsonl", texts, prefix=f"s{shard}")
        expected += [f"s{shard}-{k}#{c}" for k, n in enumerate(counts) for c in range(n)]
    out = tmp_path / "out"
    args = ["embed", "--input", str(tmp_path / "in"), "--output", str(out), "--model", slow, "--trust-remote-code",
            "--id-field", "id", "--chunk-tokens", "32", "--rows-per-file", "8", "--max-batch-tokens", "2048", "--quiet"]
    assert kill_cli_when(args, ready=lambda: len(committed(out)) >= 2), "the run finished before the kill"
    before = committed(out)
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = committed(out)
    assert {f: after[f] for f in before} == before, "a committed file was rewritten"
    ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a chunk was written twice"
    assert sorted(ids) == sorted(expected), "a chunk is missing"
