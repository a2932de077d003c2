"""The CPU encoders' ONNX Runtime path (pipeline.models.onnx_graph): the same vectors as PyTorch, without torch."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from pipeline import EmbedConfig, read_embeddings
from pipeline.errors import UsageError
from pipeline.commands.embed import run_embed
from pipeline.engine.plan import plan_resources
from tests.conftest import REPO, assert_one_line_error, cli, cosines, encode_in_process, make_st_dir, varied_texts, write_lines


def fingerprint(config: EmbedConfig) -> str:
    from pipeline.models.loading import fingerprint, resolve_model_path

    return fingerprint(resolve_model_path(config.model))


def assert_same_vectors(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert cosines(got, want).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-4)


@pytest.mark.parametrize(
    "base, options, extra",
    [
        ("bert", {"pooling": "mean"}, {}),
        ("bert", {"pooling": "cls", "dense": True, "normalize": True}, {}),
        ("bert", {"pooling": "max"}, {"normalize": True}),  # normalisation asked for: in the graph
        ("bert", {"pooling": ["mean", "max", "mean_sqrt_len_tokens"]}, {}),
        ("bert", {"pooling": "weightedmean", "prompts": {"query": "query: "}}, {"prompt_name": "query"}),
        ("decoder", {"pooling": "lasttoken", "normalize": True}, {}),  # left padding
    ],
    ids=["mean", "cls-dense-normalize", "max-normalized", "mean+max+sqrt", "weightedmean-prompt", "lasttoken-left-pad"],
)
def test_the_graph_gives_the_vectors_of_encode(base, options, extra, tiny_bert_dir, tiny_decoder_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from pipeline.models.onnx_graph import graph_for

    model = make_st_dir(tiny_decoder_dir if base == "decoder" else tiny_bert_dir, str(tmp_path / "st"), **options)
    config = EmbedConfig(input="x", output="y", model=model, **extra)
    texts = varied_texts(200)
    graph = graph_for(config, fingerprint(config), required=True)
    assert graph is not None
    st = SentenceTransformer(model, device="cpu")
    want = st.encode(texts, batch_size=16, prompt_name=extra.get("prompt_name"),
                     normalize_embeddings=bool(extra.get("normalize")), convert_to_numpy=True)
    assert_same_vectors(encode_in_process(config, texts, graph), want)
    assert_same_vectors(encode_in_process(config, texts, None), want)  # and PyTorch, for the record


def test_the_real_model_in_a_process_without_torch(default_model_path, tmp_path):
    """all-MiniLM-L6-v2 through both stages in a fresh process that never imports torch or
    sentence-transformers, as an encoder actor runs: the vectors of `SentenceTransformer.encode`."""
    from sentence_transformers import SentenceTransformer

    from pipeline.models.describe import model_facts
    from pipeline.models.onnx_graph import graph_for

    config = EmbedConfig(input="x", output="y")
    texts = varied_texts(300)
    spec = model_facts(config)[2]
    assert spec is not None
    with open(tmp_path / "job.pkl", "wb") as f:
        pickle.dump((config, spec, graph_for(config, fingerprint(config), required=True), texts), f)
    script = (
        "import pickle, sys, numpy as np, pyarrow as pa\n"
        "from pipeline.stages.encode import EncodeStage\n"
        "from pipeline.stages.tokenize import TokenizeStage\n"
        f"config, spec, graph, texts = pickle.load(open({str(tmp_path / 'job.pkl')!r}, 'rb'))\n"
        "batch = pa.table({'id': [str(i) for i in range(len(texts))], 'text': texts, '_valid': [True] * len(texts)})\n"
        "out = EncodeStage(config, 'cpu', 1, None, graph)(TokenizeStage(config, None, spec)(batch))\n"
        "order = np.argsort([int(i) for i in out['id'].to_pylist()])\n"
        "vectors = out['embedding'].combine_chunks().flatten().to_numpy().reshape(len(texts), -1)[order]\n"
        f"np.save({str(tmp_path / 'vectors.npy')!r}, vectors)\n"
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    want = SentenceTransformer(default_model_path, device="cpu").encode(texts, batch_size=32, convert_to_numpy=True)
    assert_same_vectors(np.load(tmp_path / "vectors.npy"), want)


def test_a_graph_is_cached_per_model_and_option(tiny_bert_dir, tmp_path, monkeypatch):
    from pipeline.models import onnx_graph

    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))
    model = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean")
    config = EmbedConfig(input="x", output="y", model=model)
    graph = onnx_graph.graph_for(config, fingerprint(config), required=True)
    builds = []
    monkeypatch.setattr(onnx_graph, "_build", lambda c: builds.append(c) or (b"", None))
    assert onnx_graph.graph_for(config, fingerprint(config), required=True) == graph  # read, not built
    assert builds == []
    monkeypatch.undo()
    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))
    normalized = EmbedConfig(input="x", output="y", model=model, normalize=True)
    assert onnx_graph.graph_for(normalized, fingerprint(normalized), required=True) != graph
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 2


def test_a_model_whose_graph_fails_the_check_runs_on_torch_or_is_refused(tiny_bert_dir, tmp_path, monkeypatch):
    """A traced graph that disagrees with PyTorch is never used: auto falls back, onnx names why,
    and the verdict is cached so that later runs do not trace the model again."""
    import torch

    from pipeline.models import onnx_graph

    monkeypatch.setenv("EMBEDPIPE_CACHE", str(tmp_path / "cache"))
    model = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean")
    config = EmbedConfig(input="x", output="y", model=model)
    real_export = torch.onnx.export

    def export_with_other_weights(module, *args, **kwargs):  # what a data-dependent branch frozen by tracing does
        with torch.no_grad():
            module.model[0].auto_model.embeddings.word_embeddings.weight.mul_(-1)
        try:
            return real_export(module, *args, **kwargs)
        finally:
            with torch.no_grad():
                module.model[0].auto_model.embeddings.word_embeddings.weight.mul_(-1)

    monkeypatch.setattr(torch.onnx, "export", export_with_other_weights)
    assert onnx_graph.graph_for(config, fingerprint(config), required=False) is None
    monkeypatch.setattr(torch.onnx, "export", real_export)
    with pytest.raises(UsageError, match=r"^--backend onnx: model .* has no ONNX graph that gives its vectors: "
                                         r"its traced vectors differ from PyTorch's \(min cosine"):
        onnx_graph.graph_for(config, fingerprint(config), required=True)  # the cached verdict
    assert len(list((tmp_path / "cache" / "onnx").glob("*.unsupported"))) == 1


def test_a_child_process_builds_the_same_checked_graph(tiny_bert_dir, tmp_path):
    """What a CLI driver (no sentence-transformers imported) does: the export in a child, whose
    (graph, verdict) comes back as a value."""
    from pipeline.models.child import ChildCall
    from pipeline.models.onnx_graph import OnnxEncoder, build_or_reason

    model = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean")
    config = EmbedConfig(input="x", output="y", model=model)
    graph, why = ChildCall("pipeline.models.onnx_graph:build_or_reason", config, what="exporting").result()
    assert why is None and graph is not None
    here, _ = build_or_reason(config)
    texts = varied_texts(60)
    assert OnnxEncoder(graph, 1).dim == OnnxEncoder(here, 1).dim == 32
    np.testing.assert_array_equal(encode_in_process(config, texts, graph), encode_in_process(config, texts, here))


def test_end_to_end_the_backend_is_recorded_and_both_give_the_same_vectors(ray_cluster, tiny_bert_dir, tmp_path):
    model = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean", normalize=True)
    (tmp_path / "in").mkdir()
    write_lines(tmp_path / "in" / "a.txt", varied_texts(300))
    vectors = {}
    for backend, expected in (("auto", "onnxruntime"), ("torch", "torch"), ("onnx", "onnxruntime")):
        out = tmp_path / f"out-{backend}"
        run_embed(EmbedConfig(input=str(tmp_path / "in"), output=str(out), model=model, backend=backend, quiet=True))
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["backend"] == expected
        assert {a["backend"] for a in manifest["replicas"]["encode"]["actors"]} == {expected}
        ids, vectors[backend] = read_embeddings(str(out))
        assert ids == read_embeddings(str(tmp_path / "out-auto"))[0]
    assert_same_vectors(vectors["auto"], vectors["torch"])
    assert_same_vectors(vectors["onnx"], vectors["torch"])


def test_backend_options_that_cannot_work_are_refused():
    with pytest.raises(UsageError, match=r"^--backend must be one of auto, torch, onnx, got 'tensorrt'$"):
        EmbedConfig(input="x", output="y", backend="tensorrt")
    with pytest.raises(UsageError, match="--backend onnx is the CPU path"):
        EmbedConfig(input="x", output="y", backend="onnx", device="cuda")
    with pytest.raises(UsageError, match="--backend onnx runs float32 or int8, not --dtype bfloat16"):
        EmbedConfig(input="x", output="y", backend="onnx", dtype="bfloat16")
    with pytest.raises(UsageError, match="--dtype int8 runs on ONNX Runtime; drop --backend torch"):
        EmbedConfig(input="x", output="y", backend="torch", dtype="int8")
    with pytest.raises(UsageError, match="--backend onnx is the CPU path, and this cluster has GPUs"):
        plan_resources(EmbedConfig(input="x", output="y", backend="onnx"), {"CPU": 8.0, "GPU": 1.0}, nodes=1)


def test_a_bad_backend_on_the_command_line_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = cli("embed", "--input", os.path.join(REPO, "data", "sample"), "--output", str(out), "--backend", "tvm")
    assert_one_line_error(proc, 2, "--backend must be one of auto, torch, onnx, got 'tvm'")
    assert not out.exists()
