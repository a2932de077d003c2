"""The Python API: `embed`, `mine`, `rerank` and `search` do exactly what the commands do, chained runs included.

    import pipeline
    result = pipeline.embed(input="docs/", output="vectors/", mine=True)   # or pipeline.embed(EmbedConfig(...))
    result.mined.pairs, result.mined.reranked
    pipeline.search(embeddings="vectors/", query="how do I ...").hits(0)  # [{'rank', 'id', 'score', ...}, ...]
    pipeline.embed_dataset(ray.data.read_parquet(...), model=...)          # a Ray Dataset in, rows + embedding out

The CLI calls these same functions; `report` is how it prints each step's summary line as the step ends.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from pipeline.config import EmbedConfig, MineConfig, RerankConfig, SearchConfig

Report = Callable[[Any], None]


def embed(config: EmbedConfig | None = None, *, report: Report | None = None, **options: Any):
    """Embed `config.input` into `config.output` (resuming unless `overwrite`); then, when the config
    says `mine`, mine the new vectors, and with a `rerank_model` rerank the pairs, as `embedpipe embed
    --mine [--rerank-model M]` does. Returns the embed's RunResult; `.mined` holds the MineResult (whose
    `.reranked` holds the RerankResult). `options` are EmbedConfig fields, over `config` if given."""
    from pipeline.commands.embed import run_embed
    from pipeline.stages.cross_encode import check_cross_encoder

    config = _config(EmbedConfig, config, options)
    if config.rerank_model:  # a bad cross-encoder is refused before hours of embedding
        check_cross_encoder(config.rerank_model, config.trust_remote_code)
    result = run_embed(config)
    _report(report, result)
    if config.mine:
        result.mined = _mine(config.mine_config(), config.rerank_config(), report)
    return result


def mine(config: MineConfig | None = None, *, report: Report | None = None, **options: Any):
    """Mine the most similar pairs of an embeddings directory, as `embedpipe mine` does; with a
    `rerank_model`, then rerank them (`.reranked` of the MineResult returned)."""
    return _mine(_config(MineConfig, config, options), None, report)


def rerank(config: RerankConfig | None = None, *, report: Report | None = None, **options: Any):
    """Rerank mined pairs with a cross-encoder, as `embedpipe rerank` does."""
    from pipeline.commands.rerank import run_rerank

    result = run_rerank(_config(RerankConfig, config, options))
    _report(report, result)
    return result


def embed_dataset(ds, model: str | None = None, text_field: str = "text", id_field: str | None = None, **options: Any):
    """A Ray Dataset in, the same rows with an `embedding` column out, computed by embed's tokenize and
    encode stages (pipeline.commands.dataset: what it gives, and what it does not: exactly-once files
    and resume are `embed`'s). `options`: the model, encoding and precision fields of EmbedConfig."""
    from pipeline.commands.dataset import embed_dataset as run

    return run(ds, **({"model": model} if model else {}), text_field=text_field, id_field=id_field, **options)


def search(config: SearchConfig | None = None, *, report: Report | None = None, **options: Any):
    """Exact top-k by cosine over an embeddings directory, as `embedpipe search` does: the run's model
    encodes the query (or every query of `queries`, a .txt or .jsonl file), with its `query` prompt,
    and its vectors are scored as the output stores them. Returns the SearchResult: `.hits(q)` (or
    `.results`, as util.semantic_search lists them), `.table()`; with `output`, results.parquet and a
    manifest are written too."""
    from pipeline.commands.search import run_search

    result = run_search(_config(SearchConfig, config, options))
    _report(report, result)
    return result


def _mine(config: MineConfig, rerank_config: RerankConfig | None, report: Report | None):
    """Mine; then rerank the pairs if the config names a cross-encoder: `rerank_config`, else what
    `rerank_after_mine` derives from the embeddings' manifest. One Ray session for both steps."""
    from pipeline.commands.mine import run_mine

    if not config.rerank_model:
        result = run_mine(config)
        _report(report, result)
        return result
    from pipeline.commands.rerank import rerank_after_mine
    from pipeline.engine.cluster import ray_session_for
    from pipeline.stages.cross_encode import check_cross_encoder

    check_cross_encoder(config.rerank_model, bool(rerank_config and rerank_config.trust_remote_code))  # before mining
    with ray_session_for(config.ray_address, config.quiet):
        result = run_mine(config)
        _report(report, result)
        result.reranked = rerank(rerank_config or rerank_after_mine(config), report=report)
    return result


def _config(cls, config, options: dict[str, Any]):
    if config is None:
        from pipeline.config import load_config

        return load_config(cls, None, **options)
    if not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config, **options) if options else config


def _report(report: Report | None, result) -> None:
    if report is not None:
        report(result)
