"""The model's description for the manifest, computed by a child Python process.

The driver needs what a load without weights tells (pooling, normalisation,
max_seq_length, prompt, kind, the tokenizer actors' TokenizerSpec) before
the stages may write, and importing sentence-transformers costs seconds and
~300 MiB. A child process (pipeline.models.child) does it while the driver
starts Ray, and exits: its memory is gone before the stages start. A
process that has imported sentence-transformers already uses a thread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys
from typing import Any

from pipeline.models import cache
from pipeline.models.child import ChildCall
from pipeline.config import EmbedConfig
from pipeline.models.loading import (
    ModelInfo, describe_model, embedding_dimension, load_model, output_dimension, resolve_model_path, sparse_top_k,
)
from pipeline.models.fast_tokenizer import TokenizerSpec, spec_for


def model_facts(config: EmbedConfig) -> tuple[ModelInfo, dict[str, Any], TokenizerSpec | None]:
    """What the manifest records about the model and its vectors, from a load without weights, and
    the tokenizer actors' torch-free tokenisation where it reproduces `preprocess` (pipeline.models.fast_tokenizer)."""
    model = load_model(config, weights=False)
    info = describe_model(model, config)
    vectors: dict[str, Any] = {"kind": info.kind}
    if info.kind == "sparse":
        vectors.update(vocab_size=output_dimension(model), sparse_top_k=sparse_top_k(model, config))
    else:
        vectors["dim"], vectors["model_truncate_dim"] = embedding_dimension(model)
    return info, vectors, spec_for(model, info.prompt)


class ModelFacts:
    """`model_facts(config)`, started now; `result()` waits for it.

    From the cache (pipeline.models.cache) when this model directory, unchanged since, was described
    with the same options and library versions: then nothing is imported or started. Otherwise
    in a child process, unless this process has already imported sentence-transformers (a
    notebook, a test run): then a thread does it, as there is nothing left to save.
    """

    def __init__(self, config: EmbedConfig, child: bool | None = None, cached: bool = True):
        self._child = self._thread = None
        self._result = None
        self._cache_path = _cache_path(config) if cached else None
        self._cached = _read_cached(self._cache_path)
        if self._cached is not None:
            return
        if child is None:
            child = "sentence_transformers" not in sys.modules
        if not child:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embedpipe-model")
            self._future = self._thread.submit(model_facts, config)
            return
        self._child = ChildCall("pipeline.models.describe:model_facts", config, what="describing the model")

    @property
    def from_cache(self) -> bool:
        return self._cached is not None

    def result(self) -> tuple[ModelInfo, dict[str, Any], TokenizerSpec | None]:
        if self._cached is not None:
            return self._cached
        if self._result is None:  # a second call (a resume asks before the cluster starts) reuses the first
            self._result = self._computed()
            if self._cache_path is not None:
                cache.write(self._cache_path, _to_json(self._result).encode())
        return self._result

    def _computed(self) -> tuple[ModelInfo, dict[str, Any], TokenizerSpec | None]:
        if self._child is not None:
            return self._child.result()
        try:
            return self._future.result()
        finally:
            self.close()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False)
        if self._child is not None:
            self._child.close()

    def __enter__(self) -> "ModelFacts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The options that change what model_facts returns; any other option cannot.
_FACT_OPTIONS = ("model", "trust_remote_code", "max_seq_length", "pooling", "normalize", "prompt", "prompt_name",
                 "role", "sparse_top_k", "dtype")
_LIBRARIES = ("embedpipe", "sentence-transformers", "transformers", "tokenizers")


def _cache_path(config: EmbedConfig) -> str | None:
    """The cache entry of this description: for a model directory (a hub id's files may change
    under the same name), keyed by its files' names, sizes and times, the options and versions."""
    path = resolve_model_path(config.model)
    if not os.path.isdir(path):
        return None
    key = json.dumps({
        "path": path, "files": cache.directory_signature(path),
        **cache.versions_and_code(_LIBRARIES, ("describe.py", "loading.py", "fast_tokenizer.py")),
        "options": {name: getattr(config, name) for name in _FACT_OPTIONS},
    }, sort_keys=True)
    return cache.entry_path("describe", key, ".json")


def _to_json(facts: tuple[ModelInfo, dict[str, Any], TokenizerSpec | None]) -> str:
    info, vectors, spec = facts
    return json.dumps({"info": info.as_dict(), "vectors": vectors, "spec": spec and dataclasses.asdict(spec)})


def _read_cached(path: str | None) -> tuple[ModelInfo, dict[str, Any], TokenizerSpec | None] | None:
    data = cache.read(path) if path else None
    if data is None:
        return None
    try:
        entry = json.loads(data)
        spec = entry["spec"]
        if spec is not None:
            spec = TokenizerSpec(**{**spec, "fields": tuple(tuple(f) for f in spec["fields"]),
                                    "pad_values": tuple(tuple(p) for p in spec["pad_values"])})
        return ModelInfo(**entry["info"]), entry["vectors"], spec
    except (ValueError, KeyError, TypeError):  # a damaged or older entry: described again
        return None
