"""Micro-batching by token budget (pure function)."""

import numpy as np

from pipeline.encode import plan_micro_batches


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
    from pipeline.model import load_model

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
    from pipeline.model import load_model
    from tests.slow_model import make_slow_model

    model_dir = make_slow_model(tiny_bert_dir, str(tmp_path / "custom"), delay=0.0)
    default = load_model(EmbedConfig(input="x", output="y", model=model_dir))[0].auto_model
    trusted = load_model(EmbedConfig(input="x", output="y", model=model_dir, trust_remote_code=True))[0].auto_model
    assert type(default).__name__ == "BertModel"  # the directory's modeling_slow.py was not imported
    assert type(trusted).__name__ == "SlowBertModel"
