"""Micro-batching by token budget (pure function)."""

import numpy as np

from pipeline.stages.batching import plan_micro_batches


def test_rows_fill_the_token_budget():
    lengths = np.array([10, 10, 8, 5, 5, 5, 2])
    # budget 30: [10,10,8] pads to 10 -> 30 tokens; [5,5,5,2] pads to 5 -> 20
    assert plan_micro_batches(lengths, 30) == [(0, 3), (3, 7)]


def test_a_row_longer_than_the_budget_gets_its_own_batch():
    assert plan_micro_batches(np.array([100, 3, 3]), 10) == [(0, 1), (1, 3)]


def test_every_row_is_covered_once():
    lengths = np.sort(np.random.default_rng(0).integers(1, 300, 1000))[::-1]
    spans = plan_micro_batches(lengths, 4096)
    covered = [i for a, b in spans for i in range(a, b)]
    assert covered == list(range(1000))
    assert all((b - a) * lengths[a] <= 4096 or b - a == 1 for a, b in spans)


def test_safetensors_are_loaded_when_a_pickle_sits_beside_them(tmp_path, tiny_bert_dir):
    """A directory with both formats: the weights come from model.safetensors, never from the pickle."""
    import shutil

    import torch
    from transformers import BertModel

    from pipeline.config import EmbedConfig
    from pipeline.models.loading import load_model

    model_dir = tmp_path / "both"
    shutil.copytree(tiny_bert_dir, model_dir)
    other = BertModel.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    torch.save(other.state_dict(), model_dir / "pytorch_model.bin")
    expected = BertModel.from_pretrained(tiny_bert_dir).embeddings.word_embeddings.weight
    loaded = load_model(EmbedConfig(input="x", output="y", model=str(model_dir)))[0].auto_model
    assert torch.equal(loaded.embeddings.word_embeddings.weight, expected)


def test_code_shipped_with_a_model_runs_only_with_trust_remote_code(tmp_path, tiny_bert_dir):
    from pipeline.config import EmbedConfig
    from pipeline.models.loading import load_model
    from tests.slow_model import make_slow_model

    model_dir = make_slow_model(tiny_bert_dir, str(tmp_path / "custom"), delay=0.0)
    default = load_model(EmbedConfig(input="x", output="y", model=model_dir))[0].auto_model
    trusted = load_model(EmbedConfig(input="x", output="y", model=model_dir, trust_remote_code=True))[0].auto_model
    assert type(default).__name__ == "BertModel"  # the directory's modeling_slow.py was not imported
    assert type(trusted).__name__ == "SlowBertModel"


def test_an_out_of_memory_batch_is_split_and_ids_keep_their_vectors(tiny_bert_dir, tmp_path, monkeypatch):
    """CUDA OOM on any micro-batch of more than 3 rows: halves are retried until they fit, in order."""
    import pyarrow as pa
    import torch

    from pipeline.config import EmbedConfig
    from pipeline.stages.encode import EncodeStage
    from pipeline.stages.tokenize import TokenizeStage
    from tests.conftest import make_st_dir

    model = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean")
    config = EmbedConfig(input="x", output="y", model=model)
    texts = [f"row {i} " + "word " * (i % 11) for i in range(40)]
    batch = pa.table({"id": [str(i) for i in range(40)], "text": texts, "_valid": [True] * 40})
    tokens = TokenizeStage(config)(batch)
    stage = EncodeStage(config, "cpu", 1)
    expected = stage(tokens)

    real_run, sizes = stage._run, []

    def run_or_oom(features):
        rows = features["input_ids"].shape[0]
        sizes.append(rows)
        if rows > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(features)

    monkeypatch.setattr(stage, "_run", run_or_oom)
    split = stage(tokens)
    assert max(sizes) > 3 and any(n <= 3 for n in sizes)  # it did fail, then split
    assert split["id"].to_pylist() == expected["id"].to_pylist()
    got = split["embedding"].combine_chunks().flatten().to_numpy()
    want = expected["embedding"].combine_chunks().flatten().to_numpy()
    assert abs(got - want).max() < 1e-5


def test_repeated_texts_are_encoded_once_and_get_the_same_vector_as_encode(tiny_bert_dir, tmp_path, monkeypatch):
    import numpy as np
    import pyarrow as pa
    from sentence_transformers import SentenceTransformer

    from pipeline.config import EmbedConfig
    from pipeline.stages.encode import EncodeStage
    from pipeline.stages.tokenize import TokenizeStage
    from tests.conftest import make_st_dir

    model = make_st_dir(tiny_bert_dir, str(tmp_path / "st"), pooling="mean")
    config = EmbedConfig(input="x", output="y", model=model)
    texts = [f"text {i % 7} " + "word " * (i % 7) for i in range(70)]  # 7 distinct texts, 10 copies each
    batch = pa.table({"id": [str(i) for i in range(70)], "text": texts, "_valid": [True] * 70})
    stage = EncodeStage(config, "cpu", 1)
    real_run, encoded_rows = stage._run, []

    def counting_run(features):
        encoded_rows.append(features["input_ids"].shape[0])
        return real_run(features)

    monkeypatch.setattr(stage, "_run", counting_run)
    out = stage(TokenizeStage(config)(batch))
    assert sum(encoded_rows) == 7
    order = np.argsort(np.asarray(out["id"].to_pylist(), dtype=int))
    ours = np.asarray(out["embedding"].combine_chunks().flatten().to_numpy()).reshape(70, -1)[order]
    ref = SentenceTransformer(model, device="cpu").encode(texts, batch_size=16)
    assert np.abs(ours - ref).max() <= 1e-5
