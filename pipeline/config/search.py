"""`SearchConfig`: what `embedpipe search` does. A field's docstring is its CLI help (`options` in
`pipeline.config.flags`); the fields named in `positional` are the command's arguments, not flags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.config.validators import _Recorded, _choice, _positive
from pipeline.errors import UsageError

QUERY_DEVICES = ("auto", "cpu", "cuda")
DEFAULT_SEARCH_BLOCK = 16_384


@dataclass(frozen=True)
class SearchConfig(_Recorded):
    """What `embedpipe search` does. Field docstrings are the CLI help (see `options`)."""

    command: ClassVar[str] = "search"  # the subcommand, and the YAML file's section
    positional: ClassVar[tuple[str, ...]] = ("embeddings", "query")  # `embedpipe search EMBEDDINGS [QUERY]`
    embeddings: str
    """Directory written by `embedpipe embed` (dense vectors of any --precision), local or s3://."""
    query: str | None = None
    """One query; its top-k documents are printed (or, with --output, written with query_id '0')."""
    queries: str | None = None
    """A file of queries instead of one: .txt (one a line; query_id is the 0-based line number, blank
    lines skipped) or .jsonl (an object a line with `id` and `text`); with --output."""
    top_k: int = 10
    """Documents returned per query, best first, as util.semantic_search's top_k."""
    output: str | None = None
    """Directory that receives results.parquet (query_id, id, rank, score) and _manifest.json, replaced
    on every run; without it the results are printed."""
    texts: str | None = None
    """The documents that were embedded (embed's --input, read as embed read it, so the ids match), to
    print each hit's text."""
    model: str | None = None
    """The model that encodes the queries; default the run's own (the path in its manifest, else its
    --model). It must be the model that made the vectors: its files' fingerprint is checked."""
    prompt_name: str | None = None
    """Name of a prompt saved with the model, for the queries; default the model's 'query' prompt when it
    has one, as SentenceTransformer.encode_query picks it."""
    prompt: str | None = None
    """Literal prompt prepended to every query; wins over prompt_name."""
    trust_remote_code: bool = False
    """Allow model code shipped with the model directory to run (needed when the run allowed it)."""
    device: str = "auto"
    """Where the queries are encoded: auto (cuda when torch sees a GPU), cpu or cuda. Scores are float32 on CPU."""
    block_size: int = DEFAULT_SEARCH_BLOCK
    """Rows of the output read and scored at a time: memory ~ block_size x (dim + 1024) x 4 bytes, plus
    queries x top_k, however big the output."""
    quiet: bool = False
    """No summary line (with --output)."""
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """fsspec options for s3:// paths (endpoint, credentials); never logged."""

    def __post_init__(self) -> None:
        if not self.embeddings:
            raise UsageError("EMBEDDINGS is required: the output of `embedpipe embed` to search "
                             "(`embedpipe search EMBEDDINGS QUERY`, or `embeddings:` in --config)")
        if self.query is None and not self.queries:
            raise UsageError("give a QUERY, or --queries FILE")
        if self.query is not None and self.queries:
            raise UsageError("give a QUERY or --queries FILE, not both")
        if self.query is not None and not str(self.query).strip():
            raise UsageError("QUERY is empty")
        _positive("--top-k", self.top_k, optional=False)
        _positive("--block-size", self.block_size, optional=False)
        _choice("--device", self.device, QUERY_DEVICES)
