"""embedpipe: distributed batch embedding on Ray, identical to sentence-transformers.

Python entry points: `run_embed(EmbedConfig(...))`, `read_embeddings(path)`, and for the
output of a sparse (SPLADE) model `read_sparse_embeddings(path)`.
"""

__version__ = "0.1.0"

from pipeline.config import EmbedConfig, build_config  # noqa: E402
from pipeline.readers import read_embeddings, read_sparse_embeddings  # noqa: E402


def run_embed(config: EmbedConfig):
    from pipeline.runner import run_embed as _run

    return _run(config)


__all__ = ["EmbedConfig", "build_config", "read_embeddings", "read_sparse_embeddings", "run_embed", "__version__"]
