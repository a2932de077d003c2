"""Tokenize stage: text -> token ids on CPU actors, with truncation counted.

Tokenisation is sentence-transformers' own `preprocess` (lower-casing,
prompts, max_seq_length, special tokens). Given a `TokenizerSpec` (the
driver's describe child builds one for a fast text tokenizer and checks it
against `preprocess`), the actor runs that Rust tokenizer alone and never
imports torch or sentence-transformers; otherwise it calls `preprocess` on
a model whose weights were never loaded. Rows leave grouped by output file and, inside each file's
rows, as ready-to-run micro-batches (pipeline.stages.ready): longest first, cut by the encoders'
token budget and padded, so the encoder does no per-row work; each file's rows reach the sink
together, so files commit one after another rather than all at the end of a large block.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline.config import EmbedConfig
from pipeline.models.loading import load_model, resolve_prompt
from pipeline.models.fast_tokenizer import PlainTokenizer, TokenizerSpec
from pipeline.engine.watchdog import Progress
from pipeline.stages.batching import CPU_BATCH_TOKENS, padding
from pipeline.stages.chunking import Chunker
from pipeline.stages.columns import N_TOKENS, ROW, TEXT, TRUNCATED, VALID
from pipeline.stages.ready import lay_out, segments

SUB_BATCH = 256  # texts per preprocess call; sorted by length so padding stays small


CHUNK_FIRST_DOCS = 8  # documents cut before the first piece is handed on (then about a block's worth)


class TokenizeStage:
    """Adds the ready micro-batches (pipeline.stages.ready: `tok_<feature>` and `tok_attention_mask`
    padded, `_mb`, `_copy_of`), `_n_tokens` and `_truncated`; drops the text (columns.TOKENIZE).

    `batch_tokens` is the encoders' token budget per micro-batch (the plan's; by default
    --max-batch-tokens or the CPU's) and `call_tokens` what a micro-batch costs beyond its tokens
    (the plan's): they decide the micro-batches, which the encoder runs as they are. A block without `_row` (not made by the read tasks) gets one, numbering its rows."""

    def __init__(self, config: EmbedConfig, board=None, spec: TokenizerSpec | None = None,
                 batch_tokens: int | None = None, block_rows: int | None = None, call_tokens: int | None = None):
        self.progress = Progress(board, "tokenize", time.process_time)  # the Rust tokenizer runs threads of its own
        self.progress.register_actor()
        self.plain = self.model = None
        with self.progress.step("loading the tokenizer"):
            if spec is not None:
                self.plain = PlainTokenizer(spec)
                self.max_len = spec.max_len
                self.left_pad, self.pad_values = spec.left_pad, dict(spec.pad_values)
            else:
                self.model = load_model(config, weights=False)
                self.prompt = resolve_prompt(self.model, config)
                self.max_len = self.model.max_seq_length
                self.left_pad, self.pad_values = padding(self.model.tokenizer)
        self.progress.report_placement(tokenizer="tokenizers" if self.plain else "sentence-transformers")
        self.chunker = None
        if config.chunk_tokens:  # the driver allows chunking only with a fast tokenizer's spec
            self.chunker = Chunker(spec.backend, spec.split_special_tokens, config.chunk_tokens, config.chunk_overlap)
        self.keep_text = config.text_field in config.keep_columns
        self.batch_tokens = batch_tokens or config.max_batch_tokens or CPU_BATCH_TOKENS
        self.call_tokens = call_tokens  # the plan's: micro-batches of least padding (None: filled to the budget)
        self.block_rows = block_rows or 256  # chunks per block handed on (the plan's block_rows; a block's documents give many)

    def __call__(self, batch: pa.Table):
        """The block tokenised; with --chunk-tokens, a generator of blocks of at most block_rows chunks."""
        if self.chunker is not None:
            return self._chunked(batch)
        with self.progress.step(f"tokenizing {batch.num_rows} rows"):
            return self._tokenize_block(batch)

    def _chunked(self, batch: pa.Table):
        """One row per chunk, handed on block_rows chunks at a time as soon as they are cut: the encoders
        start on a block's first chunks while its other documents are still being cut, they share its
        chunks (its documents may give thousands), and the tokens of one piece are held at a time. A
        document's chunks may span two blocks; the sink counts a file's rows whatever the blocks."""
        pending: list[pa.Table] = []
        held, docs, at = 0, CHUNK_FIRST_DOCS, 0
        while at < batch.num_rows:
            group = batch.slice(at, docs)
            at += group.num_rows
            with self.progress.step(f"chunking {group.num_rows} documents"):
                chunks = self.chunker.expand(group)
            pending.append(chunks)
            held += chunks.num_rows
            # next group: about a block's worth of chunks, from the chunks per document seen so far
            docs = max(1, min(batch.num_rows, int(self.block_rows * group.num_rows / max(chunks.num_rows, 1))))
            while held >= self.block_rows or (at >= batch.num_rows and held):
                rows = pa.concat_tables(pending)
                piece, rest = rows.slice(0, self.block_rows), rows.slice(self.block_rows)
                pending, held = ([rest] if rest.num_rows else []), rest.num_rows
                with self.progress.step(f"tokenizing {piece.num_rows} chunks"):
                    yield self._tokenize_block(piece)

    def _tokenize_block(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        valid = np.asarray(batch[VALID].to_numpy(zero_copy_only=False), dtype=bool)
        rows = np.flatnonzero(valid)
        texts = batch[TEXT].to_pylist()
        features, lengths, truncated = self.tokenize(texts if len(rows) == n else [texts[i] for i in rows])

        all_lengths = np.zeros(n, np.int32)
        all_lengths[rows] = lengths
        all_truncated = np.zeros(n, bool)
        all_truncated[rows] = truncated
        sizes = np.zeros(n, np.int64)
        sizes[rows] = lengths
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])  # invalid rows have no tokens: the flat values are already in row order
        tokens = {key: (values, offsets) for key, (values, _) in features.items()}
        if ROW not in batch.column_names:  # a block not made by the read tasks (a test, a direct call)
            batch = batch.append_column(ROW, pa.array(np.arange(n, dtype=np.int64)))
        order, columns = lay_out(batch, tokens, all_lengths, self.batch_tokens, self.left_pad, self.pad_values,
                                 self.call_tokens)
        out = batch if self.keep_text else batch.drop_columns([TEXT])
        out = out.append_column(N_TOKENS, pa.array(all_lengths)).append_column(TRUNCATED, pa.array(all_truncated))
        out = out.take(pa.array(order))
        for name, column in columns.items():
            out = out.append_column(name, column)
        return out

    def tokenize(self, texts: list[str]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
        """Token features per text, unpadded: {key: (flat values, offsets)}, lengths, truncated."""
        if self.plain is not None:
            return self._tokenize_plain(texts)
        n = len(texts)
        by_length = np.argsort([len(t) for t in texts], kind="stable")
        lengths = np.zeros(n, np.int64)
        chunks: dict[str, list[np.ndarray]] = {}  # each key's unpadded tokens, rows in by_length order
        for start in range(0, n, SUB_BATCH):
            idx = by_length[start : start + SUB_BATCH]
            feats = self.model.preprocess([texts[i] for i in idx], prompt=self.prompt)
            mask = feats["attention_mask"].numpy().astype(bool)
            lengths[idx] = mask.sum(axis=1)
            for key, value in feats.items():
                if key == "attention_mask" or not hasattr(value, "shape") or tuple(value.shape) != mask.shape:
                    continue
                chunks.setdefault(key, []).append(value.numpy()[mask])  # row after row, left or right padded
        truncated = np.zeros(n, bool)
        if self.max_len:
            candidates = np.flatnonzero(lengths >= self.max_len)
            for start in range(0, len(candidates), SUB_BATCH):
                idx = candidates[start : start + SUB_BATCH]
                longer = self.model.preprocess(
                    [texts[i] for i in idx],
                    prompt=self.prompt,
                    processing_kwargs={"text": {"max_length": self.max_len + 1}},
                )
                truncated[idx] = longer["attention_mask"].numpy().sum(axis=1) > self.max_len
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = _row_order(lengths, by_length)
        features = {key: (np.concatenate(parts)[gather], offsets) for key, parts in chunks.items()}
        return features, lengths.astype(np.int32), truncated

    def _tokenize_plain(self, texts: list[str]):
        values, lengths = self.plain.encode(texts)
        truncated = np.zeros(len(texts), bool)
        if self.max_len:
            candidates = np.flatnonzero(lengths >= self.max_len)
            if len(candidates):
                _, longer = self.plain.encode([texts[i] for i in candidates], longer=True)
                truncated[candidates] = longer > self.max_len
        offsets = np.zeros(len(texts) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        features = {key: (flat, offsets) for key, flat in values.items()}
        return features, lengths.astype(np.int32), truncated


def _row_order(lengths: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Indices that take tokens laid out row after row in `order` to row after row in row order."""
    sorted_starts = np.zeros(len(order), np.int64)
    np.cumsum(lengths[order][:-1], out=sorted_starts[1:])
    starts = np.empty(len(order), np.int64)
    starts[order] = sorted_starts
    return segments(starts, lengths)
