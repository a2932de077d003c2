"""Model resolution and loading (pipeline.models.loading), without Ray."""

from __future__ import annotations

import pytest


def test_max_seq_length_is_bounded_by_the_models_positions(tiny_model):
    """The tiny BERT has 128 learned positions: 129 would fail inside every encoder, 128 is fine."""
    from pipeline import EmbedConfig
    from pipeline.errors import UsageError
    from pipeline.models.loading import load_model

    with pytest.raises(UsageError, match="--max-seq-length 129: model .* takes at most 128 tokens"):
        load_model(EmbedConfig(input="x", output="y", model=tiny_model, max_seq_length=129), weights=False)
    model = load_model(EmbedConfig(input="x", output="y", model=tiny_model, max_seq_length=128), weights=False)
    assert model.max_seq_length == 128
