"""The columns that pass between the steps of a chain: their names, and what each step reads and adds.

embed:  read (storage) -> TokenizeStage -> EncodeStage -> sink (storage, inside the encoder)
rerank: join (storage.pair_texts) -> CrossEncodeStage -> the driver

Columns whose names start with `_` are the pipeline's own bookkeeping: the sink uses them and
never writes them to an output file, which holds `id`, the vectors and --keep-columns only.
"""

from __future__ import annotations

from dataclasses import dataclass

# The rows of the input, as the read tasks normalise them.
ID = "id"  # string: --id-field's value, else "<shard key>:<row>"
TEXT = "text"  # string: --text-field's value, under this name whatever the field is called (the sink restores it)
VALID = "_valid"  # bool: the text is neither empty, blank nor null; an invalid row is counted, not embedded
ROW = "_row"  # int64: the row's 0-based place in its group of shards (storage.packing); orders a file's rows and names a piece
LINE = "_line"  # int64: 1-based line, from the line-based readers (storage.formats), for messages; never leaves the read

# Which output file a row goes to, added by the read tasks to every chunk.
SHARD = "_shard"  # string: the row's shard's key (its path under --input)
FILE = "_file"  # string: the output file of the row's chunk, e.g. "sub__d.csv-00001.parquet"
CHUNK_ROWS = "_chunk_rows"  # int64: the rows of that chunk, so the sink knows when its file is complete
LAST = "_last"  # bool: that file is the last of its group of shards (storage.packing), so a resume can tell it is done

# Chunks of long documents, added by TokenizeStage with --chunk-tokens (pipeline.stages.chunking):
# a row is then one chunk; ID becomes "<doc id>#<chunk>", TEXT the chunk's text, ROW numbers chunks.
DOC_ID = "doc_id"  # string: the document's id
CHUNK = "chunk"  # int32: the chunk's place in its document, 0-based
START = "start"  # int64: the chunk's first character in the document's text as read
END = "end"  # int64: one past its last: text[start:end] is what was embedded
N_CHUNKS = "_n_chunks"  # int32: the chunks of the row's document, so the sink knows when a document is whole
CHUNK_COLUMNS = (DOC_ID, CHUNK, START, END)  # written to the output, after ID

# Tokens, added by TokenizeStage as ready-to-run micro-batches (pipeline.stages.ready).
TOKEN_PREFIX = "tok_"  # large_list<int64> per token feature and the mask, padded to the row's micro-batch:
TOKENS = TOKEN_PREFIX + "*"  # tok_input_ids, tok_attention_mask, ...; stands for all of them in the contracts below
N_TOKENS = "_n_tokens"  # int32: tokens after truncation; 0 for an invalid row
TRUNCATED = "_truncated"  # bool: the text was longer than max_seq_length and was cut
MICRO_BATCH = "_mb"  # int64: the row's micro-batch (rows of one are contiguous); negative: a repeated text, an invalid row
COPY_OF = "_copy_of"  # int64: a repeated text's first copy (its _row); -1 for other rows

# Vectors, added by EncodeStage.
EMBEDDING = "embedding"  # fixed_size_list<float32>[dim]: a dense model's vector
INDICES = "indices"  # list<int32>, ascending: a sparse model's non-zero terms
VALUES = "values"  # list<float32>: their weights

# rerank
PAIR = "pair"  # int64: the pair's place in the pairs file
TEXT_A = "text_a"  # string: the text of id_a
TEXT_B = "text_b"  # string: the text of id_b
RERANK_SCORE = "rerank_score"  # float32: the cross-encoder's score, after its activation
PAIR_TOKENS = "n_tokens"  # int32: the pair's tokens after truncation


def token_column(feature: str) -> str:
    """The column of one token feature: token_column("input_ids") == "tok_input_ids"."""
    return TOKEN_PREFIX + feature


def token_features(column_names: list[str]) -> list[str]:
    """The token features present among `column_names`, in their order: ["input_ids", ...]."""
    return [c[len(TOKEN_PREFIX):] for c in column_names if c.startswith(TOKEN_PREFIX)]


@dataclass(frozen=True)
class Contract:
    """What one step of a chain reads from a block, adds to it, and drops from it.

    Columns a step neither reads nor drops (`id`, --keep-columns, the bookkeeping it does not
    use) pass through it unchanged. TOKENS stands for every `tok_<feature>` column.
    """

    reads: tuple[str, ...]
    adds: tuple[str, ...]
    drops: tuple[str, ...] = ()
    replaces: bool = False
    """True: the step returns only `adds`, not the block with them."""

    def missing(self, column_names: list[str]) -> list[str]:
        """The columns this step reads that `column_names` lacks."""
        present = set(column_names)
        has_tokens = any(c.startswith(TOKEN_PREFIX) for c in column_names)
        return [c for c in self.reads if not (has_tokens if c == TOKENS else c in present)]


READ = Contract(
    reads=(),
    adds=(ID, TEXT, VALID, ROW, SHARD, FILE, CHUNK_ROWS),
)
"""The read tasks: a shard's rows normalised (storage.rows), in chunks tagged with their file
(storage.sources), with --keep-columns beside them."""

TOKENIZE = Contract(
    reads=(TEXT, VALID),
    adds=(TOKENS, N_TOKENS, TRUNCATED, MICRO_BATCH, COPY_OF),
    drops=(TEXT,),
)
"""TokenizeStage: tokens of the valid rows, laid out as ready micro-batches (pipeline.stages.ready);
it drops the text unless --keep-columns keeps it, and sorts the rows by FILE (when there), then
micro-batch, longest first."""

ENCODE = Contract(
    reads=(TOKENS, MICRO_BATCH, COPY_OF, ROW),
    adds=(EMBEDDING,),
    drops=(TOKENS, MICRO_BATCH, COPY_OF),
)
"""EncodeStage: one vector per row (a zero vector for an invalid row, which the sink skips);
a sparse model adds INDICES and VALUES instead of EMBEDDING."""

SPARSE_ENCODE = Contract(reads=ENCODE.reads, adds=(INDICES, VALUES), drops=ENCODE.drops)
"""EncodeStage with a sparse model."""

SINK = Contract(
    reads=(FILE, CHUNK_ROWS, ROW, VALID, SHARD, N_TOKENS, TRUNCATED, ID),
    adds=(),
)
"""storage.sink: writes ID, the vectors and --keep-columns of the valid rows; returns one summary
row per file or piece written (sink.SUMMARY_SCHEMA)."""

CROSS_ENCODE = Contract(
    reads=(PAIR, TEXT_A, TEXT_B),
    adds=(PAIR, RERANK_SCORE, PAIR_TOKENS),
    replaces=True,
)
"""CrossEncodeStage: one score per pair, tokenised by the model's own preprocess."""
