"""Encode stage: token ids -> pooled vectors, on GPU or CPU actors, written to Parquet there.

Rows arrive as ready-to-run micro-batches (pipeline.stages.ready): the tokenizer has sorted
them, cut them by the token budget (rows x longest row <= the plan's batch_tokens) and padded
each micro-batch to its longest row. The encoder takes each as a (rows, width) view of the
block's buffers and runs it through the SentenceTransformer's modules: on CPU as
their traced ONNX graph on ONNX Runtime (pipeline.models.onnx_graph), else on
PyTorch under `torch.inference_mode`. Output vectors are float32.

A sparse (SPLADE) model's output is vocabulary-sized and mostly zero: each
row is stored as its non-zero terms, `indices: list<int32>` (ascending) and
`values: list<float32>`, optionally only its `sparse_top_k` strongest.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pyarrow as pa

from pipeline.config import EmbedConfig
from pipeline.errors import PipelineError, UsageError
from pipeline.models.loading import is_sparse, load_model, model_normalizes, resolve_prompt, sparse_top_k
from pipeline.storage.sink import SinkSpec, commit_block
from pipeline.stages.columns import COPY_OF, EMBEDDING, INDICES, MICRO_BATCH, VALUES, token_column, token_features
from pipeline.stages.batching import (
    batch_tokens, compute_dtype, on_device, padding, split_on_oom, usable_device,
)
from pipeline.stages.ready import copies_of, features_of, flat_columns, micro_batches_of
from pipeline.engine.watchdog import Progress

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
        self._model_s = self._model_cpu = 0.0
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
        self.max_batch_tokens = batch_tokens(config.max_batch_tokens, "cpu")

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
        self.max_batch_tokens = batch_tokens(config.max_batch_tokens, self.device.type)
        self.sparse = is_sparse(self.model)
        self.sparse_top_k = sparse_top_k(self.model, config)
        prompt = resolve_prompt(self.model, config)
        probe = self.model.preprocess(["x"], prompt=prompt)
        self.extras = {k: v for k, v in probe.items() if not hasattr(v, "shape")}
        with torch.inference_mode():
            probe = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in probe.items()}
            self.dim = int(self._run(probe).shape[1])
        if self.sparse:
            self.max_batch_tokens = batch_tokens(config.max_batch_tokens, self.device.type, self.dim)
        self.left_pad, self.pad_values = padding(self.model.tokenizer)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The block with its vectors; with a sink, the block is written and its summary rows returned.

        Writing here, in the encoder, keeps the vectors out of Ray's object store and saves
        a task (and often a worker process) per block.
        """
        with self._device_lock, self.progress.step(f"encoding {batch.num_rows} rows"):
            began, self._model_s, self._model_cpu = time.time(), 0.0, 0.0
            encoded = self._encode_block(batch)
            # the time inside the model's calls: the encoder's host work is the rest of its step
            self.progress.account("model", began, time.time(), self._model_s, self._model_cpu)
        if self.sink is None:
            return encoded
        return commit_block(encoded, self.sink, self.board)

    def _encode_block(self, batch: pa.Table) -> pa.Table:
        """Vectors for a block laid out as ready micro-batches (pipeline.stages.ready): each is a
        slice of the token columns' buffers, run as it is; repeated texts copy their first copy's."""
        keys = token_features(batch.column_names)
        lists = flat_columns(batch, keys)
        out = batch.drop_columns([token_column(k) for k in keys] + [MICRO_BATCH, COPY_OF])
        if self.sparse:
            return self._encode_sparse(batch, out, lists)
        n = batch.num_rows
        vectors = np.zeros((n, self.dim), np.float32)
        # Micro-batches are queued on the device one after another and their vectors copied back
        # once per block: on a GPU the host copies the next micro-batch in while the last one runs.
        done = []
        for start, end in micro_batches_of(batch):
            done.append((start, end, self._forward(np.arange(start, end), lists)))
            self.progress.tick()
        copies, sources, orphans = copies_of(batch, lists, self.left_pad, self.pad_values, self.max_batch_tokens)
        for rows, features in orphans:  # repeated texts whose first copy Ray Data put in another block
            done.append((rows, None, self._forward_orphans(features)))
        self._gather(done, vectors)
        vectors[copies] = vectors[sources]
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        return out.append_column(EMBEDDING, embedding)

    def _gather(self, done: list, vectors: np.ndarray) -> None:
        """Each micro-batch's vectors into `vectors`: from ONNX Runtime each straight into place; from
        a GPU with one copy back for the whole block."""
        if not done:
            return
        if self.onnx is not None:
            joined, parts = None, [v for _, _, v in done]
        else:
            joined = self.torch.cat([v for _, _, v in done]).cpu().numpy()
            bounds = np.cumsum([0] + [len(v) for _, _, v in done])
            parts = [joined[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        for (start, end, _), part in zip(done, parts):
            if end is None:
                vectors[start] = part
            else:
                vectors[start:end] = part

    def _encode_sparse(self, batch: pa.Table, out: pa.Table, lists: dict) -> pa.Table:
        """`indices` and `values` columns: each row's non-zero terms (invalid rows: none)."""
        empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
        terms = [empty] * out.num_rows
        runs = [(np.arange(s, e), self._forward(np.arange(s, e), lists)) for s, e in micro_batches_of(batch)]
        copies, sources, orphans = copies_of(batch, lists, self.left_pad, self.pad_values, self.max_batch_tokens)
        runs += [(rows, self._forward_orphans(features)) for rows, features in orphans]
        for rows, dense in runs:
            for i, row_terms in zip(rows, sparse_terms(dense.cpu().numpy(), self.sparse_top_k)):
                terms[i] = row_terms
            self.progress.tick()
        for i, j in zip(copies, sources):  # repeated texts take the terms of their first copy
            terms[i] = terms[j]
        offsets = np.zeros(len(terms) + 1, np.int32)
        np.cumsum([len(t[0]) for t in terms], out=offsets[1:])
        flat_idx = np.concatenate([t[0] for t in terms]) if terms else np.zeros(0, np.int32)
        flat_val = np.concatenate([t[1] for t in terms]) if terms else np.zeros(0, np.float32)
        indices = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_idx, pa.int32()))
        values = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_val, pa.float32()))
        return out.append_column(INDICES, indices).append_column(VALUES, values)

    def _forward(self, rows: np.ndarray, lists: dict):
        """Vectors of the contiguous rows `rows` of one ready micro-batch (see `_split_on_oom`)."""
        return self._split_on_oom(lambda idx: features_of(lists, int(idx[0]), int(idx[-1]) + 1), rows)

    def _forward_orphans(self, features: dict[str, np.ndarray]):
        """`_forward` for a micro-batch padded here (repeated texts without their first copy)."""
        rows = np.arange(len(next(iter(features.values()))))
        return self._split_on_oom(lambda idx: {k: v[idx] for k, v in features.items()}, rows)

    def _split_on_oom(self, features_of_rows, rows: np.ndarray):
        """The model on the padded features `features_of_rows(rows)`: a float32 array from the ONNX
        graph, or a float32 tensor on the device from PyTorch (queued there, not waited for),
        split where CUDA runs out of memory."""
        def run(idx: np.ndarray):
            return self._forward_padded(features_of_rows(idx))

        return run(rows) if self.onnx is not None else split_on_oom(run, rows, None, self.torch.cat)

    def _forward_padded(self, features: dict[str, np.ndarray]):
        """The model on one micro-batch of padded (rows, width) int64 features."""
        t0, cpu = time.perf_counter(), time.thread_time()
        if self.onnx is not None:
            vectors = self.onnx(features)
        else:
            vectors = self._forward_torch(features)
        self._model_s += time.perf_counter() - t0
        self._model_cpu += time.thread_time() - cpu
        return vectors

    def _forward_torch(self, features: dict[str, np.ndarray]):
        torch = self.torch
        tensors = on_device(features, self.device, self.extras)
        with torch.inference_mode():
            emb = self._run(tensors).float()  # (B, dim)
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, p=2, dim=1)
        return emb

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
