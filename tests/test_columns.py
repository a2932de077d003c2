"""pipeline.stages.columns: the declared contract between the chain's steps holds together."""

from __future__ import annotations

from pipeline.stages.columns import (
    CROSS_ENCODE, ENCODE, READ, SINK, SPARSE_ENCODE, TOKENIZE, TOKENS, Contract, token_column, token_features,
)


def flow(*steps: Contract) -> list[str]:
    """The columns after `steps`, each checked to find what it reads."""
    columns: list[str] = []
    for step in steps:
        assert step.missing(columns) == [], f"{step} lacks {step.missing(columns)}"
        kept = [c for c in columns if c not in step.drops and not (c.startswith("tok_") and TOKENS in step.drops)]
        added = [token_column("input_ids") if c == TOKENS else c for c in step.adds]
        columns = added if step.replaces else kept + added
    return columns


def test_each_step_of_the_embed_chain_reads_only_what_the_steps_before_it_add():
    dense = flow(READ, TOKENIZE, ENCODE, SINK)
    sparse = flow(READ, TOKENIZE, SPARSE_ENCODE, SINK)
    assert "embedding" in dense and {"indices", "values"} <= set(sparse)
    assert not [c for c in dense if c.startswith("tok_")] and "text" not in dense  # encoding drops the tokens


def test_a_step_that_runs_too_early_is_caught():
    assert ENCODE.missing(flow(READ)) == [TOKENS, "_mb", "_copy_of"]
    assert SINK.missing(flow(READ)) == ["_n_tokens", "_truncated"]
    assert CROSS_ENCODE.missing(["pair", "text_a"]) == ["text_b"]


def test_token_columns_round_trip():
    names = [token_column(f) for f in ("input_ids", "attention_mask")] + ["id"]
    assert token_features(names) == ["input_ids", "attention_mask"]
