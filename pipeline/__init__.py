"""embedpipe: distributed batch embedding on Ray, identical to sentence-transformers.

The Python API does what the commands do (pipeline.api):

    pipeline.embed(input=..., output=..., mine=True)    # embedpipe embed [--mine [--rerank-model M]]
    pipeline.mine(embeddings=..., output=...)            # embedpipe mine
    pipeline.rerank(pairs=..., texts=..., model=..., output=...)
    pipeline.search(embeddings=..., query="...")         # embedpipe search: exact top-k by cosine; .hits(0)
    pipeline.embed_dataset(ds, model=...)                # a Ray Dataset in, its rows with an `embedding` column out
    pipeline.read_embeddings(path)                       # (ids, matrix: float32, or int8/binary as stored); SPLADE: read_sparse_embeddings
    pipeline.quantize_queries(vectors, path)             # queries stored as the output's precision stores them

Each takes its config object (EmbedConfig, MineConfig, RerankConfig, SearchConfig) or its fields as keywords.
"""

__version__ = "0.1.0"

from pipeline.api import embed, embed_dataset, mine, rerank, search  # noqa: E402
from pipeline.config import EmbedConfig, MineConfig, RerankConfig, SearchConfig, build_config  # noqa: E402
from pipeline.storage.readers import quantize_queries, read_embeddings, read_sparse_embeddings  # noqa: E402

run_embed = embed  # the name of earlier releases; it now runs --mine and --rerank-model too, as the CLI does

__all__ = [
    "EmbedConfig", "MineConfig", "RerankConfig", "SearchConfig", "build_config", "embed", "embed_dataset", "mine", "rerank", "search",
    "run_embed", "read_embeddings", "read_sparse_embeddings", "quantize_queries", "__version__",
]
