"""Bad input: exit 2, one line `embedpipe: error: ...` naming the problem, prior output byte-identical.

Most cases run the CLI in-process (`pipeline.cli.main`) on the session's Ray
cluster: the same exit code and stderr line a user sees, without paying for
a new process and Ray start each time. Two run as real processes to show
the user's view, one of them failing inside a Ray worker. Each refused run
targets a copy of one good output made once per module, and that copy must
be byte-identical afterwards. Every format's variant of a read error is
covered without Ray in test_sources.py; here each kind of error goes once
through the whole chain.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from tests.conftest import Run, assert_one_line_error, cli, run_main, sample_texts, snapshot, write_lines


def assert_refused(run, message: str, out, before: dict) -> None:
    """One line, exit 2, and the prior output as it was: its files byte-identical, its plan's groups
    kept (a refused run may have added its own input's groups to `_plan.json` before reading it)."""
    assert_one_line_error(run, 2, message)
    after = snapshot(out)
    plan_before, plan_after = (json.loads(s.pop("_plan.json", b"null")) for s in (dict(before), after))
    assert {k: v for k, v in after.items() if k != "_plan.json"} == {k: v for k, v in before.items() if k != "_plan.json"}
    if plan_before is not None:
        assert plan_after["groups"][: len(plan_before["groups"])] == plan_before["groups"]


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


LATIN1 = "café".encode("latin-1")
INVALID_ROWS = b'{"text": "alpha"}\n{"text": ""}\n{"text": "   "}\n{"text": null}\n{"text": "beta"}\n'


@pytest.fixture(scope="module")
def prior_output(ray_cluster, tmp_path_factory, tiny_model):
    """The good output every refused run must leave alone, made once.

    Its input also holds what a good run must survive: empty, blank and null
    text, and Latin-1 bytes embedded with --encoding-errors replace (two
    tests below read their results here rather than paying for a run). Its
    files are named prior-* so that no refused run's input file has the name
    of a committed shard (which a resume would skip).
    """
    src = tmp_path_factory.mktemp("prior-input")
    (src / "prior-rows.jsonl").write_bytes(INVALID_ROWS)
    (src / "prior-lines.txt").write_text("gamma\n\n \t \nNone\n")  # the word None is text like any other
    (src / "prior-latin1.txt").write_bytes(b"ok\n" + LATIN1 + b"\n")
    (src / "prior-latin1.csv").write_bytes(b"text\n" + LATIN1 + b"\n")
    out = tmp_path_factory.mktemp("prior") / "out"
    code = main(["embed", "--input", str(src), "--output", str(out), "--model", tiny_model, "--quiet",
                 "--keep-columns", "text", "--encoding-errors", "replace", "--no-pack-files"])  # a file per shard
    assert code == 0
    return out


@pytest.fixture
def out(prior_output, tmp_path):
    """This test's copy of the prior good output."""
    copy = tmp_path / "out"
    shutil.copytree(prior_output, copy)
    return copy


@pytest.fixture
def embed_into(capsys, out, tiny_model):
    """Run `embed --output OUT --model TINY --quiet ARGS` in-process against this test's copy."""

    def run(*args: str, model: str = tiny_model) -> Run:
        return run_main(capsys, "embed", "--output", str(out), "--model", model, "--quiet", *args)

    return run


@pytest.fixture
def bad_file(tmp_path):
    """Write `content` to tmp_path/name and return its path."""

    def write(name: str, content: bytes) -> str:
        (tmp_path / name).write_bytes(content)
        return str(tmp_path / name)

    return write


# --------------------------------------------------------------------------- nothing to read


@pytest.mark.parametrize(
    "pattern, reason",
    [
        ("in/nothing-*.txt", "the glob matches no files"),
        ("in/missing", "no such file or directory"),
        ("in", "no files of a supported type"),  # it holds only notes.md
    ],
    ids=["glob", "missing-path", "no-supported-files"],
)
def test_input_that_matches_nothing(embed_into, out, tmp_path, pattern, reason):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.md").write_text("not an input")
    before = snapshot(out)
    run = embed_into("--input", str(tmp_path / pattern))
    assert_refused(run, f"--input {tmp_path / pattern}: {reason}", out, before)


def test_empty_input_file(embed_into, out, bad_file):
    before = snapshot(out)
    run = embed_into("--input", bad_file("empty.jsonl", b""))
    assert_refused(run, "empty.jsonl: the file is empty (0 bytes)", out, before)


# --------------------------------------------------------------------------- records


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notext.jsonl", b'{"text": "fine"}\n\n{"body": "no text"}\n',
         "notext.jsonl: line 3 has no field 'text' (set --text-field)"),
        ("notext.parquet", parquet_bytes(pa.table({"body": ["no text"], "n": [1]})),
         "notext.parquet: no column 'text' (set --text-field); columns are ['body', 'n']"),
    ],
)
def test_record_without_the_text_field(embed_into, out, bad_file, name, content, message):
    before = snapshot(out)
    assert_refused(embed_into("--input", bad_file(name, content)), message, out, before)


def test_malformed_json_names_file_and_line(embed_into, out, bad_file):
    before = snapshot(out)
    run = embed_into("--input", bad_file("bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": oops}\n'))
    assert_refused(run, "bad.jsonl: line 3 is not valid JSON", out, before)


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("latin1.jsonl", b'{"text": "ok"}\n{"text": "' + LATIN1 + b'"}\n', "latin1.jsonl: line 2 is not valid UTF-8"),
        ("latin1.csv", b"text\nok\n" + LATIN1 + b"\n", "latin1.csv: row 1, column 'text', is not valid UTF-8"),
    ],
)
def test_invalid_utf8_names_file_and_line(embed_into, out, bad_file, name, content, message):
    before = snapshot(out)
    run = embed_into("--input", bad_file(name, content))
    assert_refused(run, message, out, before)
    assert "use --encoding-errors replace" in run.stderr.splitlines()[-1]


def test_invalid_utf8_is_embedded_with_encoding_errors_replace(prior_output):
    for name, texts in (("prior-latin1.txt", ["ok", "caf\ufffd"]), ("prior-latin1.csv", ["caf\ufffd"])):
        table = pq.read_table(prior_output / f"{name}.parquet")
        assert table["text"].to_pylist() == texts
        assert table["id"].to_pylist() == [f"{name}:{i}" for i in range(len(texts))]
        assert np.abs(np.asarray(table["embedding"].to_pylist())).sum(axis=1).min() > 0  # really embedded


# --------------------------------------------------------------------------- corrupt files


def test_truncated_parquet(embed_into, out, bad_file):
    data = parquet_bytes(pa.table({"text": [f"document {i}" for i in range(200)]}))
    before = snapshot(out)
    run = embed_into("--input", bad_file("truncated.parquet", data[: len(data) // 2]))
    assert_refused(run, "truncated.parquet: cannot read parquet", out, before)


@pytest.mark.slow  # test_cli shows a worker-side error as the user sees it in `make test`
def test_random_bytes_named_parquet_as_the_user_sees_it(out, bad_file, tiny_model):
    """A real process: the read task fails in a Ray worker; one line reaches the user, no traceback."""
    path = bad_file("random.parquet", np.random.default_rng(1).bytes(4096))
    before = snapshot(out)
    proc = cli("embed", "--input", path, "--output", str(out), "--model", tiny_model)
    assert_refused(proc, "random.parquet: cannot read parquet (Parquet magic bytes not found", out, before)


# --------------------------------------------------------------------------- model


def test_missing_model_directory(embed_into, out, tmp_path, bad_file):
    before = snapshot(out)
    run = embed_into("--input", bad_file("a.txt", b"hello\n"), model=str(tmp_path / "no-model"))
    assert_refused(run, f"--model {tmp_path / 'no-model'}: no such directory", out, before)


def test_model_directory_without_weights(embed_into, out, tmp_path, bad_file, tiny_bert_dir):
    """Caught on the driver: otherwise every encoder actor fails to start, and the cause arrives late."""
    model = tmp_path / "no-weights"
    shutil.copytree(tiny_bert_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    before = snapshot(out)
    run = embed_into("--input", bad_file("a.txt", b"hello\n"), model=str(model))
    assert_refused(run, f"--model {model}: no weights in {model}", out, before)


def test_directory_that_is_not_a_model(embed_into, out, tmp_path, bad_file):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")
    before = snapshot(out)
    run = embed_into("--input", bad_file("a.txt", b"hello\n"), model=str(tmp_path / "not-a-model"))
    assert_refused(run, f"--model {tmp_path / 'not-a-model'}: not a model directory", out, before)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-seq-length", "-3"], "--max-seq-length must be a positive integer, got -3"),
        (["--max-seq-length", "many"], "argument --max-seq-length: invalid int value: 'many'"),
        (["--max-seq-length", "4096"], "--max-seq-length 4096: model"),  # the tiny BERT has 128 positions
        (["--rows-per-file", "0"], "--rows-per-file must be a positive integer, got 0"),
        (["--on-invalid", "maybe"], "--on-invalid must be one of skip, error, got 'maybe'"),
        (["--stall-timeout", "-1"], "--stall-timeout must be"),
        (["--dtype", "float64"], "--dtype must be one of auto, float32, float16, bfloat16, int8, got 'float64'"),
        (["--encoding-errors", "ignore"], "--encoding-errors must be one of strict, replace, got 'ignore'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_invalid_option_values(embed_into, out, bad_file, args, message):
    before = snapshot(out)
    run = embed_into("--input", bad_file("a.txt", b"hello\n"), *args)
    assert_refused(run, message, out, before)


# --------------------------------------------------------------------------- mine


@pytest.fixture(scope="module")
def prior_pairs(ray_cluster, prior_output, tmp_path_factory):
    """A good pairs output, made once from the prior embeddings."""
    pairs = tmp_path_factory.mktemp("prior-pairs") / "pairs"
    assert main(["mine", "--embeddings", str(prior_output), "--output", str(pairs), "--quiet"]) == 0
    assert sorted(os.listdir(pairs)) == ["_manifest.json", "pairs.parquet"]
    return pairs


@pytest.fixture
def pairs(prior_pairs, tmp_path):
    """This test's copy of the prior pairs output."""
    copy = tmp_path / "pairs"
    shutil.copytree(prior_pairs, copy)
    return copy


def embeddings_dir(tmp_path, files: dict[str, bytes]) -> str:
    d = tmp_path / "emb"
    d.mkdir()
    for name, content in files.items():
        (d / name).write_bytes(content)
    return str(d)


@pytest.mark.parametrize(
    "files, message",
    [
        (None, "no such directory"),
        ({"notes.txt": b"just text"}, "holds no embeddings"),
        ({"a.parquet": parquet_bytes(pa.table({"id": ["x"], "text": ["no vectors"]}))},
         "a.parquet has no 'embedding' column"),
        ({"a.parquet": b"PAR1 not really"}, "a.parquet is not a readable Parquet file"),
        ({"a.parquet": parquet_bytes(pa.table({"id": ["x"], "embedding": [[0.1, 0.2]]}))},
         "a.parquet: column 'embedding' has type list<"),
    ],
    ids=["missing", "only-text", "no-embedding-column", "corrupt", "variable-length-lists"],
)
def test_mine_refuses_what_is_not_embeddings(capsys, ray_cluster, pairs, tmp_path, files, message):
    emb = embeddings_dir(tmp_path, files) if files is not None else str(tmp_path / "missing")
    before = snapshot(pairs)
    run = run_main(capsys, "mine", "--embeddings", emb, "--output", str(pairs), "--quiet")
    assert_refused(run, f"--embeddings {emb}", pairs, before)
    assert message in run.stderr.splitlines()[-1]


def test_mine_on_a_directory_without_embeddings_as_the_user_sees_it(pairs, tmp_path):
    emb = embeddings_dir(tmp_path, {"notes.txt": b"just text"})
    before = snapshot(pairs)
    proc = cli("mine", "--embeddings", emb, "--output", str(pairs))
    assert_refused(proc, f"--embeddings {emb}: holds no embeddings", pairs, before)


# --------------------------------------------------------------------------- empty rows


def test_empty_blank_and_null_text_is_skipped_and_counted(prior_output):
    docs = pq.read_table(prior_output / "prior-rows.jsonl.parquet")
    assert docs["id"].to_pylist() == ["prior-rows.jsonl:0", "prior-rows.jsonl:4"]
    assert docs["text"].to_pylist() == ["alpha", "beta"]  # null never becomes "None"
    assert pq.read_table(prior_output / "prior-lines.txt.parquet")["text"].to_pylist() == ["gamma", "None"]
    manifest = json.loads((prior_output / "_manifest.json").read_text())
    counts = {f["file"]: (f["rows"], f["embedded"], f["invalid"]) for f in manifest["files"]}
    assert counts["prior-rows.jsonl.parquet"] == (5, 2, 3) and counts["prior-lines.txt.parquet"] == (4, 2, 2)
    assert (manifest["rows"]["embedded"], manifest["rows"]["invalid"]) == (7, 5)


def test_on_invalid_error_names_shard_and_row(embed_into, out, bad_file):
    before = snapshot(out)
    run = embed_into("--input", bad_file("refused.jsonl", INVALID_ROWS), "--on-invalid", "error")
    assert_refused(run, "refused.jsonl: row 1 (line 2) has empty text; use --on-invalid skip", out, before)


# --------------------------------------------------------------------------- a 1 MB document


def test_one_megabyte_document_is_truncated_counted_and_embedded_as_encode_does(
    capsys, ray_cluster, tmp_path, default_model_path
):
    from sentence_transformers import SentenceTransformer

    from tests.conftest import assert_same

    text = " ".join(sample_texts()).replace("\n", " ")
    text = (text * (1_000_000 // len(text) + 1))[:1_000_000]
    src = tmp_path / "in"
    src.mkdir()
    write_lines(src / "big.txt", [text])
    out = tmp_path / "fresh"
    run = run_main(capsys, "embed", "--input", str(src), "--output", str(out))  # the default model
    assert run.returncode == 0, run.stderr
    assert "1 truncated" in run.stdout.strip().splitlines()[-1]
    rows = json.loads((out / "_manifest.json").read_text())["rows"]
    assert (rows["embedded"], rows["truncated"], rows["invalid"]) == (1, 1, 0)
    ours = np.asarray(pq.read_table(out / "big.txt.parquet")["embedding"].to_pylist(), np.float32)
    reference = SentenceTransformer(default_model_path, device="cpu").encode([text])
    assert_same(ours, reference)


# --------------------------------------------------------------------------- --debug


def test_debug_shows_the_traceback_then_the_same_line(capsys, monkeypatch, out, tmp_path, tiny_model):
    monkeypatch.delenv("EMBEDPIPE_DEBUG", raising=False)
    before = snapshot(out)
    run = run_main(capsys, "--debug", "embed", "--input", str(tmp_path / "missing"), "--output", str(out),
                   "--model", tiny_model)
    assert run.returncode == 2 and "Traceback" in run.stderr and "InputError" in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last == f"embedpipe: error: --input {tmp_path / 'missing'}: no such file or directory"
    assert snapshot(out) == before  # refused before any plan
    assert "EMBEDPIPE_DEBUG" not in os.environ  # main restores it: later runs in this process stay quiet


@pytest.mark.parametrize("flag", [["--id-field", "n"], ["--keep-columns", "n"]], ids=["id-field", "keep-columns"])
def test_fields_asked_of_a_plain_text_file(embed_into, out, bad_file, flag):
    path = bad_file("lines.txt", b"alpha\nbeta\n")
    before = snapshot(out)
    assert_refused(embed_into("--input", path, *flag), f"lines.txt: a plain text file has no fields, only its "
                   f"lines, so {' '.join(flag)} cannot be read from it", out, before)


def test_two_inputs_that_would_write_the_same_output_file(embed_into, out, tmp_path):
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "a" / "b.txt").write_text("one\n")
    (tmp_path / "in" / "a__b.txt").write_text("two\n")
    before = snapshot(out)
    assert_refused(embed_into("--input", str(tmp_path / "in"), "--no-pack-files"),
                   "inputs a/b.txt and a__b.txt would both write the output file a__b.txt.parquet", out, before)
