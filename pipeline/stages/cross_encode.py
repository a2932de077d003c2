"""Cross-encoder stage: (text_a, text_b) pairs -> one relevance score each, on GPU or CPU actors.

The model is sentence-transformers' own `CrossEncoder`, loaded once per actor.
A block's pairs are tokenised by the model's `preprocess` (what
`CrossEncoder.predict` calls: the pair template, the default prompt,
truncation to max_seq_length), sorted by token length, cut into micro-batches
by a token budget (`--max-batch-tokens`), padded only to the longest pair of
each, and scored under `torch.inference_mode`; a micro-batch that runs out of
CUDA memory is split in two and retried (the batching is EncodeStage's:
pipeline.stages.batching). The logits are upcast to float32 and go through
the model's `activation_fn` exactly as in `predict` (Sigmoid for a single
label unless the model saved another).

Only single-score models (num_labels == 1) are taken: reranking sorts by one
number. A classifier with several labels, a bi-encoder, or a bare encoder
without a classification head is refused on the driver (`check_cross_encoder`),
before any worker starts: `CrossEncoder(dir)` would otherwise load a
bi-encoder with a freshly initialised, random head and score noise.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import InputError
from pipeline.stages.batching import (
    batch_tokens, compute_dtype, micro_batches, on_device, pad_features, padding, split_on_oom, usable_device,
)
from pipeline.stages.columns import PAIR, PAIR_TOKENS, RERANK_SCORE, TEXT_A, TEXT_B

SUB_BATCH = 256  # pairs per preprocess call; sorted by length so the tokenizer pads little
# Default token budgets (pipeline.stages.batching.batch_tokens). CPU, measured on 512 fortune pairs with
# a MiniLM-size model and one thread: 2048 tokens 13.9 s, 1024 14.2 s, 4096 17.7 s, 16384 22.9 s
# (predict, batches of 32: 24.1 s).


@dataclass(frozen=True)
class CrossEncoderInfo:
    """What the manifest records about the cross-encoder."""

    name: str
    path: str
    fingerprint: str
    num_labels: int
    activation_fn: str
    max_seq_length: int | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_cross_encoder(name: str, trust_remote_code: bool = False) -> CrossEncoderInfo:
    """Refuse, on the driver, anything but a single-score cross-encoder; describe the one given.

    A local directory is judged by its files first (a Pooling module means a
    bi-encoder; the model's architecture must carry a sequence-classification
    head, or the directory a LogitScore module), then loaded without its
    weights for num_labels, activation and max_seq_length. A hub id is judged
    by the load alone.
    """
    from pipeline.models.loading import fingerprint, resolve_model_path

    path = resolve_model_path(name)
    if os.path.isdir(path):
        _check_files(name, path)
    model = load_cross_encoder(name, trust_remote_code=trust_remote_code, weights=False)
    if model.num_labels != 1:
        raise InputError(
            f"--model {name}: has {model.num_labels} labels; rerank needs a single-score cross-encoder (num_labels 1)"
        )
    from sentence_transformers.util import fullname

    activation = model.activation_fn
    return CrossEncoderInfo(
        name=name,
        path=path,
        fingerprint=fingerprint(path),
        num_labels=1,
        activation_fn=fullname(activation) if activation is not None else "none",
        max_seq_length=model.max_seq_length,
    )


def _check_files(name: str, path: str) -> None:
    modules = _read_json(os.path.join(path, "modules.json")) or []
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
    if "Pooling" in kinds:
        raise InputError(
            f"--model {name}: a sentence-transformers bi-encoder (it has a Pooling module), not a cross-encoder"
        )
    if "LogitScore" in kinds:  # a causal LM scored by its yes/no logits, as sentence-transformers saves it
        return
    transformer = next((m for m in modules if str(m.get("type", "")).endswith("Transformer")), {})
    config = _read_json(os.path.join(path, transformer.get("path") or "", "config.json")) or {}
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise InputError(
            f"--model {name}: not a cross-encoder: its model is {', '.join(architectures) or 'of no named architecture'}, "
            "without a sequence-classification head"
        )
    labels = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else config.get("num_labels", 2)
    if labels != 1:
        raise InputError(f"--model {name}: has {labels} labels; rerank needs a single-score cross-encoder (num_labels 1)")


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_cross_encoder(name: str, device: str = "cpu", trust_remote_code: bool = False, weights: bool = True):
    """sentence-transformers' CrossEncoder for `name`; without weights, built on `meta` (config and tokenizer only)."""
    from sentence_transformers import CrossEncoder

    from pipeline.models.loading import _quiet_transformers, _weights_on_meta, resolve_model_path

    path = resolve_model_path(name)
    kwargs: dict[str, Any] = {}
    if os.path.isdir(path) and any(f.endswith(".safetensors") for _, _, files in os.walk(path) for f in files):
        kwargs["use_safetensors"] = True  # never unpickle when safetensors are there
    try:
        with _quiet_transformers(), (_weights_on_meta() if not weights else contextlib.nullcontext()):
            return CrossEncoder(
                path, device="meta" if not weights else device, trust_remote_code=trust_remote_code,
                model_kwargs=kwargs or None,
            )
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise InputError(f"--model {name}: cannot load as a cross-encoder ({first[:300]})") from None


class CrossEncodeStage:
    """Maps a block of `pair, text_a, text_b` to `pair, rerank_score: float32, n_tokens: int32`.

    Its columns are declared in pipeline.stages.columns (CROSS_ENCODE).
    """

    def __init__(self, config, device: str = "cpu", threads: int | None = None):
        import torch

        self.torch = torch
        device = usable_device(device, config.device)
        if device == "cpu":
            torch.set_num_threads(threads or config.encoder_threads or os.cpu_count() or 1)
        self.device = torch.device(device)
        self.model = load_cross_encoder(config.model, str(self.device), config.trust_remote_code)
        self.model.eval()
        if self.model.num_labels != 1:
            raise InputError(f"--model {config.model}: has {self.model.num_labels} labels; rerank needs num_labels 1")
        dtype = compute_dtype(config.dtype, self.device.type)
        if dtype != "float32":
            self.model.to(getattr(torch, dtype))
        self.max_batch_tokens = batch_tokens(config.max_batch_tokens, device)
        self.prompt = self.model._resolve_prompt(None, None)  # what predict() does without prompt arguments
        probe = self.model.preprocess([["x", "y"]], prompt=self.prompt)
        self.extras = {k: v for k, v in probe.items() if not hasattr(v, "shape")}  # e.g. modality: text
        self.left_pad, self.pad_values = padding(self.model.tokenizer)

    def __call__(self, batch: pa.Table) -> pa.Table:
        pairs = list(zip(batch[TEXT_A].to_pylist(), batch[TEXT_B].to_pylist()))
        rows, lengths = self.tokenize(pairs)
        order = np.argsort(-lengths, kind="stable")
        scores = np.zeros(len(pairs), np.float32)
        score = functools.partial(self._score, rows=rows, lengths=lengths)
        for idx in micro_batches(order, lengths, self.max_batch_tokens):
            scores[idx] = split_on_oom(score, idx, lengths, np.concatenate)
        return pa.table({
            PAIR: batch[PAIR],
            RERANK_SCORE: pa.array(scores, pa.float32()),
            PAIR_TOKENS: pa.array(lengths, pa.int32()),
        })

    def tokenize(self, pairs: list[tuple[str, str]]) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
        """Token features of each pair, unpadded ({key: one array per pair}), and their lengths."""
        n = len(pairs)
        by_length = np.argsort([len(a) + len(b) for a, b in pairs], kind="stable")
        lengths = np.zeros(n, np.int64)
        rows: dict[str, list] = {}
        for start in range(0, n, SUB_BATCH):
            idx = by_length[start : start + SUB_BATCH]
            features = self.model.preprocess([list(pairs[i]) for i in idx], prompt=self.prompt)
            mask = features["attention_mask"].numpy().astype(bool)  # (B, T)
            lengths[idx] = mask.sum(axis=1)
            for key, value in features.items():
                if key == "attention_mask" or not hasattr(value, "shape") or tuple(value.shape) != mask.shape:
                    continue
                values = value.numpy()
                for j, i in enumerate(idx):
                    rows.setdefault(key, [None] * n)[i] = values[j][mask[j]]
        return rows, lengths

    def _score(self, idx: np.ndarray, rows: dict[str, list[np.ndarray]], lengths: np.ndarray) -> np.ndarray:
        """The scores of pairs `idx`, float32 (B,)."""
        torch = self.torch
        tokens = {key: [per_row[i] for i in idx] for key, per_row in rows.items()}
        features = pad_features(tokens, lengths[idx], self.left_pad, self.pad_values)
        tensors = on_device(features, self.device, self.extras)
        with torch.inference_mode():
            scores = self.model(tensors)["scores"]  # (B, 1)
            if torch.is_floating_point(scores) and torch.finfo(scores.dtype).bits < 32:
                scores = scores.float()  # as predict(): upcast before the activation
            if self.model.activation_fn is not None:
                scores = self.model.activation_fn(scores)
            scores = scores.reshape(len(idx))
        return scores.float().cpu().numpy()
