"""Encode stage: token ids -> pooled vectors, on GPU or CPU actors, written to Parquet there.

Rows arrive sorted by length. They are cut into micro-batches by a token
budget (rows x longest row <= max_batch_tokens), padded only to the longest
row of each micro-batch (both in pipeline.stages.batching, shared with the
cross-encoder), and run through the SentenceTransformer's modules: on CPU as
their traced ONNX graph on ONNX Runtime (pipeline.models.onnx_graph), else on
PyTorch under `torch.inference_mode`. Output vectors are float32.

A sparse (SPLADE) model's output is vocabulary-sized and mostly zero: each
row is stored as its non-zero terms, `indices: list<int32>` (ascending) and
`values: list<float32>`, optionally only its `sparse_top_k` strongest.
"""

from __future__ import annotations

import functools
import os
import threading
import time

import numpy as np
import pyarrow as pa

from pipeline.config import EmbedConfig
from pipeline.errors import PipelineError, UsageError
from pipeline.models.loading import is_sparse, load_model, model_normalizes, resolve_prompt, sparse_top_k
from pipeline.storage.sink import SinkSpec, commit_block
from pipeline.stages.columns import EMBEDDING, INDICES, N_TOKENS, VALUES, token_column, token_features
from pipeline.stages.batching import (
    compute_dtype, micro_batches, on_device, pad_features, padding, split_on_oom, usable_device,
)
from pipeline.stages.tokenize import segments
from pipeline.engine.watchdog import Progress

# Default token budgets of one forward pass. CPU, all-MiniLM-L6-v2 on 3,072 fortunes in 1,024-row
# blocks, one thread, CPU time: 16384 tokens 74.1 s, 4096 57.7 s, 2048 51.6 s, 1024 50.1 s
# (BENCHMARKS.md): small batches keep their activations in the cores' caches. A GPU wants large ones.
CPU_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 16384

# A sparse model's MLM head produces rows x tokens x vocabulary logits; its token budget is cut
# so that they stay within this many bytes (about 2,200 tokens for a 30k vocabulary).
SPARSE_LOGITS_BYTES = 256 << 20


class EncodeStage:
    """Replaces the token columns by `embedding: fixed_size_list<float32>[dim]` (columns.ENCODE).

    With `graph` (pipeline.models.onnx_graph: the model as a checked ONNX graph, float32 or int8) the
    encoder runs it on ONNX Runtime and imports neither torch nor sentence-transformers; without
    it, the SentenceTransformer's modules run on PyTorch.
    """

    def __init__(
        self, config: EmbedConfig, device: str = "cpu", threads: int | None = None, board=None,
        graph: bytes | None = None, sink: SinkSpec | None = None,
    ):
        self.board = board
        self.sink = sink
        self.progress = Progress(board, "encode")
        self.progress.register_actor()
        device = usable_device(device, config.device)
        if graph is None and config.dtype == "int8":
            raise UsageError("--dtype int8: the encoder got no quantised graph")
        backend = "onnxruntime" if graph is not None else "torch"
        if backend == "onnxruntime" and device != "cpu":
            raise PipelineError("an ONNX graph was given to an encoder on a GPU; GPUs run torch")
        # Placement is reported before the model loads: a replica that Ray started counts as
        # placed even when a small run ends before it has finished loading.
        self.progress.report_placement(device=device, dtype=compute_dtype(config.dtype, device), backend=backend)
        # On a GPU, Ray Data runs two calls at once (ENCODER_CALLS_ON_GPU): one encodes while
        # the other writes its block; encoding itself stays one block at a time.
        self._device_lock = threading.Lock()
        self._model_s = 0.0
        threads = threads or config.encoder_threads or os.cpu_count() or 1
        with self.progress.step("loading the model"):
            if graph is not None:
                self._load_graph(config, graph, threads)
            else:
                self._load(config, device, threads)

    def _load_graph(self, config: EmbedConfig, graph, threads: int) -> None:
        from pipeline.models.onnx_graph import OnnxEncoder

        if not isinstance(graph, (bytes, bytearray)):  # an ObjectRef: Ray Data passes constructor arguments as they are
            import ray

            graph = ray.get(graph)
        self.onnx = OnnxEncoder(graph, threads)
        self.torch = self.model = None
        self.dtype = self.onnx.dtype
        self.dim = self.onnx.dim
        self.left_pad, self.pad_values = self.onnx.left_pad, self.onnx.pad_values
        self.extras = {}
        self.normalize = False  # in the graph
        self.sparse, self.sparse_top_k = False, None
        self.max_batch_tokens = config.max_batch_tokens or CPU_BATCH_TOKENS

    def _load(self, config: EmbedConfig, device: str, threads: int) -> None:
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        self.onnx = None
        self.torch = torch
        self.device = torch.device("cuda" if device == "cuda" else "cpu")
        self.model = load_model(config, device=str(self.device), weights=True)
        self.model.eval()
        dtype = compute_dtype(config.dtype, self.device.type)
        if dtype != "float32":
            self.model.to(getattr(torch, dtype))
        self.dtype = dtype
        self.normalize = bool(config.normalize) and not model_normalizes(self.model)
        self.max_batch_tokens = config.max_batch_tokens or (
            GPU_BATCH_TOKENS if self.device.type == "cuda" else CPU_BATCH_TOKENS
        )
        self.sparse = is_sparse(self.model)
        self.sparse_top_k = sparse_top_k(self.model, config)
        prompt = resolve_prompt(self.model, config)
        probe = self.model.preprocess(["x"], prompt=prompt)
        self.extras = {k: v for k, v in probe.items() if not hasattr(v, "shape")}
        with torch.inference_mode():
            probe = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in probe.items()}
            self.dim = int(self._run(probe).shape[1])
        if self.sparse:
            self.max_batch_tokens = max(1, min(self.max_batch_tokens, SPARSE_LOGITS_BYTES // (4 * self.dim)))
        self.left_pad, self.pad_values = padding(self.model.tokenizer)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The block with its vectors; with a sink, the block is written and its summary rows returned.

        Writing here, in the encoder, keeps the vectors out of Ray's object store and saves
        a task (and often a worker process) per block.
        """
        with self._device_lock, self.progress.step(f"encoding {batch.num_rows} rows"):
            began, self._model_s = time.time(), 0.0
            encoded = self._encode_block(batch)
            # the time inside the model's calls: the encoder's host work is the rest of its step
            self.progress.account("model", began, time.time(), self._model_s)
        if self.sink is None:
            return encoded
        return commit_block(encoded, self.sink, self.board)

    def _encode_block(self, batch: pa.Table) -> pa.Table:
        keys = token_features(batch.column_names)
        lists = {k: _flat(batch[token_column(k)]) for k in keys}
        lengths = np.asarray(batch[N_TOKENS].to_numpy(zero_copy_only=False))
        valid = np.flatnonzero(lengths > 0)
        rows, copy_of = _distinct_rows(valid, lists)
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
        out = batch.drop_columns([token_column(k) for k in keys])
        if self.sparse:
            return self._encode_sparse(out, rows, copy_of, valid, lists, lengths)
        vectors = np.zeros((batch.num_rows, self.dim), np.float32)
        # Micro-batches are queued on the device one after another and their vectors copied back
        # once per block: on a GPU the host pads the next micro-batch while the last one runs.
        done = []
        for idx in micro_batches(rows, lengths, self.max_batch_tokens):
            done.append((idx, self._forward(idx, lists, lengths)))
            self.progress.tick()
        if done:
            rows_done = np.concatenate([idx for idx, _ in done])
            if self.onnx is not None:
                vectors[rows_done] = np.concatenate([e for _, e in done])
            else:
                vectors[rows_done] = self.torch.cat([e for _, e in done]).cpu().numpy()
        vectors[valid] = vectors[copy_of]  # repeated texts take the vector of their first copy
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        return out.append_column(EMBEDDING, embedding)

    def _encode_sparse(self, out: pa.Table, rows, copy_of, valid, lists: dict, lengths) -> pa.Table:
        """`indices` and `values` columns: each row's non-zero terms (invalid rows: none)."""
        empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
        terms = [empty] * out.num_rows
        for idx in micro_batches(rows, lengths, self.max_batch_tokens):
            dense = self._forward(idx, lists, lengths).cpu().numpy()
            for i, row_terms in zip(idx, sparse_terms(dense, self.sparse_top_k)):
                terms[i] = row_terms
            self.progress.tick()
        for j, i in enumerate(valid):  # repeated texts take the terms of their first copy
            terms[i] = terms[copy_of[j]]
        offsets = np.zeros(len(terms) + 1, np.int32)
        np.cumsum([len(t[0]) for t in terms], out=offsets[1:])
        flat_idx = np.concatenate([t[0] for t in terms]) if terms else np.zeros(0, np.int32)
        flat_val = np.concatenate([t[1] for t in terms]) if terms else np.zeros(0, np.float32)
        indices = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_idx, pa.int32()))
        values = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_val, pa.float32()))
        return out.append_column(INDICES, indices).append_column(VALUES, values)

    def _forward(self, idx: np.ndarray, lists: dict, lengths: np.ndarray):
        """Vectors of rows `idx`: a float32 array from the ONNX graph, or a float32 tensor on the
        device from PyTorch (queued there, not waited for), split where CUDA runs out of memory."""
        if self.onnx is not None:
            features = self._features(idx, lists, lengths)
            t0 = time.perf_counter()
            vectors = self.onnx(features)
            self._model_s += time.perf_counter() - t0
            return vectors
        forward = functools.partial(self._forward_torch, lists=lists, lengths=lengths)
        return split_on_oom(forward, idx, lengths, self.torch.cat)

    def _forward_torch(self, idx: np.ndarray, lists: dict, lengths: np.ndarray):
        torch = self.torch
        tensors = on_device(self._features(idx, lists, lengths), self.device, self.extras)
        with torch.inference_mode():
            t0 = time.perf_counter()
            emb = self._run(tensors).float()  # (B, dim)
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, p=2, dim=1)
            self._model_s += time.perf_counter() - t0
        return emb

    def _features(self, idx: np.ndarray, lists: dict, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """The token features of rows `idx`, padded to the longest of them, and their attention mask (int64)."""
        row_len = lengths[idx].astype(np.int64)
        tokens = {key: values[segments(offsets[idx], row_len)] for key, (values, offsets) in lists.items()}
        return pad_features(tokens, row_len, self.left_pad, self.pad_values)

    def _run(self, features: dict):
        """The model's modules on one micro-batch (PyTorch)."""
        return self.model(features)["sentence_embedding"]


def sparse_terms(dense: np.ndarray, top_k: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's non-zero entries as (ascending int32 indices, float32 values).

    With `top_k`, only the top_k largest by absolute value are kept first, exactly as
    sentence-transformers' `select_max_active_dims` (torch.topk) does for max_active_dims.
    """
    if top_k is not None and top_k < dense.shape[1]:
        import torch

        tensor = torch.from_numpy(dense)
        _, top = torch.topk(tensor.abs(), k=top_k, dim=-1)
        kept = torch.zeros_like(tensor).scatter_(-1, top, tensor.gather(-1, top))
        dense = kept.numpy()
    rows, cols = np.nonzero(dense)
    bounds = np.searchsorted(rows, np.arange(dense.shape[0] + 1))
    values = dense[rows, cols].astype(np.float32)
    cols = cols.astype(np.int32)
    return [(cols[bounds[r] : bounds[r + 1]], values[bounds[r] : bounds[r + 1]]) for r in range(dense.shape[0])]


def _distinct_rows(valid: np.ndarray, lists: dict) -> tuple[np.ndarray, np.ndarray]:
    """Rows to encode (one per distinct token sequence), and for each valid row the row it copies.

    Rows are grouped by length and a 64-bit hash of their tokens (numpy, no per-row Python);
    only rows that share both are compared token by token, so a hash collision never merges
    two different texts.
    """
    copy_of = valid.astype(np.int64)
    if len(valid) < 2:
        return copy_of, copy_of
    first_values, first_offsets = next(iter(lists.values()))
    sizes = (first_offsets[valid + 1] - first_offsets[valid]).astype(np.int64)
    digest = sizes.astype(np.uint64)
    for values, offsets in lists.values():
        flat = values[segments(offsets[valid], sizes)].astype(np.uint64)
        position = segments(np.zeros_like(sizes), sizes).astype(np.uint64)  # each token's place in its row
        with np.errstate(over="ignore"):
            mixed = (flat + np.uint64(0x9E3779B97F4A7C15)) * (position * np.uint64(2) + np.uint64(0xBF58476D1CE4E5B9))
            mixed ^= mixed >> np.uint64(29)
            sums = np.add.reduceat(mixed, (np.cumsum(sizes) - sizes))  # valid rows have at least one token
            digest = digest * np.uint64(0x94D049BB133111EB) + sums
    _, first, inverse = np.unique(digest, return_index=True, return_inverse=True)
    candidate = valid[first[inverse]]  # the first row with the same digest
    repeated = np.flatnonzero(candidate != valid)
    if len(repeated):  # rare in real corpora: confirm each token by token
        def tokens(i):
            return b"|".join(v[o[i] : o[i + 1]].tobytes() for v, o in lists.values())

        same = np.array([tokens(valid[j]) == tokens(candidate[j]) for j in repeated], bool)
        if not same.all():  # a true hash collision: fall back to exact keys
            seen: dict[bytes, int] = {}
            for j, i in enumerate(valid):
                copy_of[j] = seen.setdefault(tokens(i), int(i))
            return np.fromiter(seen.values(), np.int64, len(seen)), copy_of
        copy_of[repeated] = candidate[repeated]
    return valid[np.sort(first)], copy_of


def _flat(column) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column, offsets starting at 0."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.asarray(arr.offsets)
    values = np.asarray(arr.values)[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]
