"""The configs, one frozen object per command: `EmbedConfig` (`embedpipe embed`), `MineConfig`
(`mine`) and `RerankConfig` (`rerank`) here, `SearchConfig` (`search`) in `pipeline.config.search`;
validated once, in `__post_init__`, by the shared validators (`pipeline.config.validators`). A field's
docstring is its CLI help (`options` in `pipeline.config.flags`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
import logging
from typing import Any, ClassVar

from pipeline.config.search import SearchConfig
from pipeline.config.validators import (
    _Recorded, _check_rerank_options, _choice, _cosine, _dtype_on_device, _flag, _positive, _required, _seconds,
    _whole_files,
)
from pipeline.errors import UsageError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")
RERANK_DTYPES = ("auto", "float32", "float16", "bfloat16")
BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
OUTPUT_FORMATS = ("parquet", "lance")
ROLES = ("query", "document")
WRITERS = ("auto", "encoder", "separate")
DEFAULT_CALIBRATION_ROWS = 2000
ENCODING_ERRORS = ("strict", "replace")


@dataclass(frozen=True)
class EmbedConfig(_Recorded):
    """What `embedpipe embed` does. Field docstrings are the CLI help (see `options`)."""

    command: ClassVar[str] = "embed"  # the subcommand, and the YAML file's section
    input: str
    """File, directory, glob or s3:// URI of the documents."""
    output: str
    """Directory (local or s3://) that receives the Parquet files, of at most rows_per_file rows each."""
    format: str = "parquet"
    """parquet or lance: the output becomes a Lance dataset (name it '<name>.lance'), each output file's rows
    one fragment committed exactly once, read by Lance and LanceDB; mine, search and rerank read Parquet only."""
    model: str = DEFAULT_MODEL
    """sentence-transformers directory, plain Hugging Face directory, hub id, or the default."""
    text_field: str = "text"
    """Column / JSON key holding the text (ignored for .txt)."""
    id_field: str | None = None
    """Column holding a document id; default is '<relative shard path>:<row>'."""
    keep_columns: tuple[str, ...] = ()
    """Input columns copied next to the vectors."""
    document_per_file: bool = False
    """Each text file (.txt, .md, .rst, .html, or no suffix, e.g. METADATA) is one document, read whole;
    its id is its path under --input. Other files are skipped; an empty file is counted, not embedded."""
    pooling: str | None = None
    """Override the model's pooling: cls, mean, max, mean_sqrt_len_tokens, weightedmean or lasttoken, or
    several joined by '+' (e.g. cls+mean); default the model's own."""
    normalize: bool | None = None
    """L2-normalise the vectors; default follows the model (its Normalize module)."""
    max_seq_length: int | None = None
    """Truncate to this many tokens; default is the model's max_seq_length."""
    max_batch_tokens: int | None = None
    """Token budget of one forward pass (rows x padded length); bounds activation memory. Default 2048
    on CPU (small batches stay in the cores' caches: 1.4x faster than 16384 here) and 16384 on GPU."""
    prompt_name: str | None = None
    """Name of a prompt saved with the model (e.g. 'query'), as in SentenceTransformer.encode."""
    prompt: str | None = None
    """Literal prompt prepended to every text; wins over prompt_name."""
    role: str | None = None
    """query or document: the model's prompt for that role when it has one, as encode_query /
    encode_document pick it ('query'; 'document', 'passage' or 'corpus'); prompt and prompt_name win."""
    device: str = "auto"
    """auto (cuda when the cluster has GPUs), cpu or cuda."""
    dtype: str = "auto"
    """Compute dtype: auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16, or int8 (CPU:
    the model's MatMuls quantised per channel and per token, run by ONNX Runtime; faster, vectors close
    but not equal)."""
    backend: str = "auto"
    """What runs the model on CPU: onnx (the model's own modules traced once into an ONNX graph, checked
    against PyTorch and cached; the encoders then import neither torch nor sentence-transformers), torch,
    or auto (onnx for a float32 or int8 dense model whose graph passes the check, unless it runs its own
    code (trust_remote_code); else torch). GPUs always run torch."""
    precision: str = "float32"
    """What is stored of each vector, as sentence-transformers' quantize_embeddings defines it: float32,
    float16, int8 or uint8 (256 buckets per dimension between the run's ranges), binary or
    ubinary (the signs, 8 dimensions a byte). For a sparse model: float32 or float16 values."""
    output_dtype: str | None = None
    """Deprecated: the same as precision (float32 or float16)."""
    truncate_dim: int | None = None
    """Keep the first D dimensions of each vector (Matryoshka models), as encode(truncate_dim=D);
    normalised again when the run normalises."""
    calibration_rows: int | None = None
    """int8/uint8: the ranges come from this many documents sampled across the shards, embedded
    first (default 2000)."""
    calibration: str | None = None
    """int8/uint8: ranges from a .npy of shape (2, dim), or from an earlier output (its directory or
    _manifest.json); instead of calibration rows."""
    sparse_top_k: int | None = None
    """Sparse (SPLADE) models: keep only this many strongest terms per document, as
    SparseEncoder.encode's max_active_dims; default all non-zero terms."""
    num_encoders: int | None = None
    """Encoder replicas in all; default encoders_per_gpu on every GPU (CUDA) or encoders_per_node on
    every node (CPU). It caps the total: with both, --num-encoders wins."""
    encoders_per_gpu: int | None = None
    """GPU clusters: encoder replicas sharing each GPU (each reserves 1/N of it), so that one
    replica's host work overlaps another's GPU work; default 1."""
    encoders_per_node: int | None = None
    """CPU-only clusters: encoder replicas on each node, sharing its CPUs; default the resource plan's
    (one per node). Ignored on GPUs (see encoders_per_gpu)."""
    num_tokenizers: int | None = None
    """Tokenizer actors; default one a node on CPU (one an encoder for a model as cheap as tokenising), up to 8 a GPU."""
    encoder_threads: int | None = None
    """Threads per CPU encoder (ONNX Runtime or torch); default the CPUs of its node."""
    writer: str = "auto"
    """Who builds the output files: encoder (in its own process, no copy), separate (the encoder hands each
    file's rows over as Arrow pieces; a driver thread, or a Ray task on a multi-node cluster, builds the
    Parquet), or auto: separate on GPUs (their encoders only encode), encoder on CPUs."""
    chunk_tokens: int | None = None
    """Cut each document into chunks of at most N tokens of the model's tokenizer (special tokens and
    the prompt not counted) and embed every chunk: one row per chunk, id '<doc id>#<chunk>'. Default:
    one vector per document, truncated at the model's max_seq_length."""
    chunk_overlap: int = 0
    """With chunk_tokens: tokens consecutive chunks share (up to 8 fewer where a cut moves to the start
    of a word)."""
    rows_per_file: int = 50_000
    """Largest number of rows in one output file: a bigger shard is written as several files, small
    shards are packed together (docs/usage.md#many-small-files). With chunk_tokens it counts
    documents: a file holds its documents' chunks."""
    pack_files: bool = True
    """Pack small input files together (about rows_per_file x 256 bytes a group) into output files of at most
    rows_per_file rows, planned from the listing (`_plan.json`); false: files named after each input file."""
    ray_address: str | None = None
    """Empty: start a local Ray cluster; 'auto' or an address: join that cluster."""
    overwrite: bool = False
    """Embed every shard again instead of resuming."""
    quiet: bool = False
    """Print nothing but errors: no progress bars, summary line or Ray notices."""
    trust_remote_code: bool = False
    """Allow model code shipped with the model directory to run."""
    encoding_errors: str = "strict"
    """How undecodable UTF-8 bytes are handled: strict (error) or replace."""
    on_invalid: str = "skip"
    """Rows whose text is empty, blank or null: skip (counted in the manifest) or error."""
    stall_timeout: float = 1800.0
    """Seconds without progress in any stage before the run ends naming the stalled stage; 0 disables."""
    mine: bool = False
    """After embedding, mine the most similar pairs of the new vectors (see `embedpipe mine`)."""
    mine_output: str | None = None
    """Where the pairs go; default '<output>-pairs'."""
    mine_top_k: int = 100
    """Candidates kept per document when mining."""
    mine_max_pairs: int = 500_000
    """Best pairs kept when mining."""
    mine_threshold: float | None = None
    """Keep only mined pairs scoring at least this."""
    rerank_model: str | None = None
    """With mine: then rerank the mined pairs with this cross-encoder, reading their texts from the input."""
    rerank_top: int | None = None
    """Rerank only this many of the best mined pairs; default all."""
    rerank_output: str | None = None
    """Where the reranked pairs go; default '<mine output>-reranked' (replaced on every run)."""
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """fsspec options for s3:// input and output (endpoint, credentials); never logged."""

    def __post_init__(self) -> None:
        _required("--input", self.input)
        _required("--output", self.output)
        if self.pooling is not None:
            modes = pooling_modes(self.pooling)
            bad = [m for m in modes if m not in POOLING_MODES]
            if bad or not modes:
                raise UsageError(
                    f"--pooling {self.pooling!r}: expected one of {', '.join(POOLING_MODES)} "
                    "or several joined by '+'"
                )
        for flag in ("max_seq_length", "max_batch_tokens", "num_encoders", "encoders_per_node", "encoders_per_gpu",
                     "num_tokenizers", "encoder_threads", "rows_per_file"):
            _positive("--" + flag.replace("_", "-"), getattr(self, flag))
        self._check_chunking()
        _positive("--sparse-top-k", self.sparse_top_k)
        _positive("--mine-top-k", self.mine_top_k)
        _positive("--mine-max-pairs", self.mine_max_pairs)
        _cosine("--mine-threshold", self.mine_threshold)
        if (self.rerank_model or self.rerank_top or self.rerank_output) and not self.mine:
            flag = "--rerank-model" if self.rerank_model else "--rerank-top" if self.rerank_top else "--rerank-output"
            raise UsageError(f"{flag} needs --mine: the pairs reranked are the ones mined after embedding")
        _check_rerank_options(self.rerank_model, self.rerank_top, rerank_output=self.rerank_output)
        _choice("--device", self.device, DEVICES)
        _choice("--dtype", self.dtype, DTYPES)
        _choice("--backend", self.backend, BACKENDS)
        self._check_precision()
        self._check_format()
        _choice("--encoding-errors", self.encoding_errors, ENCODING_ERRORS)
        _choice("--on-invalid", self.on_invalid, ("skip", "error"))
        _choice("--writer", self.writer, WRITERS)
        _seconds("--stall-timeout", self.stall_timeout)
        _dtype_on_device(self.dtype, self.device)
        if self.device == "cuda" and self.dtype == "int8":
            raise UsageError("--dtype int8 is the CPU path; use float16 or bfloat16 with --device cuda")
        if self.backend == "onnx" and self.device == "cuda":
            raise UsageError("--backend onnx is the CPU path; GPUs run torch (--device cpu, or --backend auto)")
        if self.backend == "onnx" and self.dtype in ("float16", "bfloat16"):
            raise UsageError(f"--backend onnx runs float32 or int8, not --dtype {self.dtype}")
        if self.backend == "torch" and self.dtype == "int8":
            raise UsageError("--dtype int8 runs on ONNX Runtime; drop --backend torch")
        _whole_files(self.document_per_file, self.id_field, self.keep_columns, self.text_field)
        reserved = {"id", "embedding", "indices", "values"} & set(self.keep_columns)
        if reserved:
            raise UsageError(f"--keep-columns cannot include {sorted(reserved)}: embedpipe writes those")

    def _check_format(self) -> None:
        _choice("--format", self.format, OUTPUT_FORMATS)
        if self.format != "lance":
            return
        if self.mine:
            raise UsageError("--mine reads Parquet outputs; --format lance writes a Lance dataset: drop one of them")
        import importlib.util

        if importlib.util.find_spec("lance") is None:
            raise UsageError("--format lance needs the pylance package (pip install pylance)")

    def _check_chunking(self) -> None:
        _positive("--chunk-tokens", self.chunk_tokens)
        if not isinstance(self.chunk_overlap, int) or self.chunk_overlap < 0:
            raise UsageError(f"--chunk-overlap must be a whole number of tokens, 0 or more, got {self.chunk_overlap!r}")
        if self.chunk_overlap and not self.chunk_tokens:
            raise UsageError("--chunk-overlap needs --chunk-tokens: it is the tokens consecutive chunks share")
        if self.chunk_tokens and self.chunk_overlap * 2 > self.chunk_tokens:
            raise UsageError(f"--chunk-overlap {self.chunk_overlap} is more than half of --chunk-tokens "
                             f"{self.chunk_tokens}: every token would be embedded three times or more")

    def _check_precision(self) -> None:
        """--precision and its options; --output-dtype, deprecated, is read as --precision."""
        if self.output_dtype is not None:
            _choice("--output-dtype", self.output_dtype, ("float32", "float16"))
            if self.precision not in ("float32", self.output_dtype):
                raise UsageError(f"--output-dtype {self.output_dtype} and --precision {self.precision}: "
                                 "--output-dtype is the old name of --precision; give only --precision")
            logging.getLogger(__name__).warning("--output-dtype is deprecated: it is the old name of --precision")
            object.__setattr__(self, "precision", self.output_dtype)
            object.__setattr__(self, "output_dtype", None)
        _choice("--precision", self.precision, PRECISIONS)
        if self.role is not None:
            _choice("--role", self.role, ROLES)
        _positive("--truncate-dim", self.truncate_dim)
        _positive("--calibration-rows", self.calibration_rows)
        if self.precision not in ("int8", "uint8") and (self.calibration or self.calibration_rows):
            flag = "--calibration" if self.calibration else "--calibration-rows"
            raise UsageError(f"{flag}: only --precision int8 or uint8 uses ranges; this run has --precision {self.precision}")
        if self.calibration and self.calibration_rows:
            raise UsageError("--calibration and --calibration-rows: give one (ranges from a file, or from sampled rows)")

    def mine_config(self) -> MineConfig:
        """What `--mine` runs after embedding: `embedpipe mine` of the new vectors."""
        return MineConfig(
            embeddings=self.output,
            output=self.mine_output or self.output.rstrip("/") + "-pairs",
            top_k=self.mine_top_k,
            max_pairs=self.mine_max_pairs,
            threshold=self.mine_threshold,
            device=self.device,
            ray_address=self.ray_address,
            quiet=self.quiet,
            rerank_model=self.rerank_model,
            texts=self.input if self.rerank_model else None,
            rerank_top=self.rerank_top,
            rerank_output=self.rerank_output,
            storage_options=self.storage_options,
        )

    def rerank_config(self) -> RerankConfig | None:
        """What `--mine --rerank-model` runs on the mined pairs (None without --rerank-model): this
        run's input read as it was embedded (same ids), on the devices the embedding used."""
        if not self.rerank_model:
            return None
        return self.mine_config().rerank_config(
            text_field=self.text_field, id_field=self.id_field, encoding_errors=self.encoding_errors,
            document_per_file=self.document_per_file, device=self.device, num_encoders=self.num_encoders, trust_remote_code=self.trust_remote_code,
        )


@dataclass(frozen=True)
class MineConfig(_Recorded):
    """What `embedpipe mine` does. Field docstrings are the CLI help (see `options`)."""

    command: ClassVar[str] = "mine"  # the subcommand, and the YAML file's section
    embeddings: str
    """Directory written by `embedpipe embed` (or any Parquet with id + embedding)."""
    output: str
    """Directory that receives pairs.parquet and _manifest.json."""
    top_k: int = 100
    """Candidates kept per document, as in paraphrase_mining_embeddings."""
    max_pairs: int = 500_000
    """Best pairs returned overall."""
    threshold: float | None = None
    """Keep only pairs scoring at least this (cosine)."""
    block_size: int = 4096
    """Rows per block: memory per task ~ 4 * block_size^2 bytes of scores + 2 blocks of vectors."""
    device: str = "auto"
    """Where the block products run: auto (on GPU workers when the cluster has GPUs, in float16 with
    every candidate scored again in float32: the same pairs; else float32 numpy on CPU), cpu, cuda."""
    same_document_pairs: bool = False
    """Embeddings of chunks (embed --chunk-tokens): also pair two chunks of the same document (left out
    by default: overlapping neighbours would fill every top-k); then the pairs are exactly
    paraphrase_mining_embeddings' over all chunks."""
    ray_address: str | None = None
    """Empty: start a local Ray cluster; 'auto' or an address: join that cluster."""
    quiet: bool = False
    """No summary line."""
    rerank_model: str | None = None
    """Then rerank the pairs just written with this cross-encoder (see `embedpipe rerank`)."""
    texts: str | None = None
    """The documents the pairs' ids name, for reranking; default the input named in the embeddings' manifest."""
    rerank_top: int | None = None
    """Rerank only this many of the best mined pairs; default all."""
    rerank_output: str | None = None
    """Where the reranked pairs go; default '<output>-reranked' (replaced on every run, as the pairs are)."""
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """fsspec options for s3:// paths (endpoint, credentials); never logged."""

    def __post_init__(self) -> None:
        _required("--embeddings", self.embeddings)
        _required("--output", self.output)
        for name in ("top_k", "max_pairs", "block_size"):
            _positive(_flag(name), getattr(self, name), optional=False)
        _cosine("--threshold", self.threshold)
        _choice("--device", self.device, DEVICES)
        _check_rerank_options(self.rerank_model, self.rerank_top, texts=self.texts, rerank_output=self.rerank_output)

    def rerank_config(self, texts: str | None = None, **options: Any) -> RerankConfig:
        """The rerank of the pairs this mine writes (with --rerank-model): of `--texts`, else of `texts`
        (the input the embeddings were made from); `options` (RerankConfig fields) say how to read
        them and where to run. Its output follows the pairs: replaced on every run."""
        return RerankConfig(
            pairs=self.output,
            texts=self.texts or texts,
            model=self.rerank_model,
            output=self.rerank_output or self.output.rstrip("/") + "-reranked",
            top=self.rerank_top,
            ray_address=self.ray_address,
            quiet=self.quiet,
            overwrite=True,
            storage_options=self.storage_options,
            **options,
        )


@dataclass(frozen=True)
class RerankConfig(_Recorded):
    """What `embedpipe rerank` does. Field docstrings are the CLI help (see `options`)."""

    command: ClassVar[str] = "rerank"  # the subcommand, and the YAML file's section
    pairs: str
    """Directory written by `embedpipe mine` (pairs.parquet: id_a, id_b, score), or any Parquet file or directory
    of Parquet files with id_a and id_b (score optional: without it, --top is refused and the output's score is null)."""
    texts: str
    """The documents the pairs came from (embed's --input): file, directory, glob or s3:// URI."""
    model: str
    """CrossEncoder directory (sentence-transformers layout, or a Hugging Face sequence-classification model) or hub id."""
    output: str
    """Directory that receives pairs.parquet (id_a, id_b, score, rerank_score; best rerank_score first) and _manifest.json."""
    top: int | None = None
    """Rerank only the N best pairs by bi-encoder score; the output keeps those N. Default: all."""
    embeddings: str | None = None
    """Pairs of chunks (embed --chunk-tokens): the embeddings output they were mined from, whose start/end
    offsets cut each chunk's text out of --texts; default the one named in the pairs' manifest."""
    text_field: str = "text"
    """As in embed: column / JSON key holding the text (ignored for .txt)."""
    id_field: str | None = None
    """As in embed: column holding the document id; default '<relative shard path>:<row>'."""
    document_per_file: bool = False
    """As in embed: a text file of --texts is one document, its id its path (default: as the embeddings' manifest says)."""
    encoding_errors: str = "strict"
    """As in embed: undecodable UTF-8 is an error (strict) or replaced (replace)."""
    max_batch_tokens: int | None = None
    """Token budget of one forward pass (pairs x padded length of both texts); default 2048 on CPU, where
    small batches ran fastest (about 25 pairs of 80 tokens; 16384 was about 1.6x slower), and 16384 on GPU."""
    device: str = "auto"
    """auto (cuda when the cluster has GPUs), cpu or cuda."""
    dtype: str = "auto"
    """auto (float16 on GPU, float32 on CPU), float32, float16 or bfloat16; scores are upcast before the activation."""
    num_encoders: int | None = None
    """Cross-encoder replicas; default as embed: one per GPU, or one single-threaded replica per core on CPU."""
    encoder_threads: int | None = None
    """torch threads per CPU replica; default 1 (one replica per core)."""
    block_pairs: int | None = None
    """Pairs handed to one scoring call; default 512 on CPU, 4096 on GPU. Smaller spreads a small run over more replicas."""
    join_parts: int | None = None
    """Parts of the join by id; default one per 65,536 distinct ids. Each join task holds 1/parts of the texts."""
    ray_address: str | None = None
    """Empty: start a local Ray cluster; 'auto' or an address: join that cluster."""
    overwrite: bool = False
    """Replace an earlier rerank output in --output instead of refusing."""
    quiet: bool = False
    """No progress bars or summary line."""
    trust_remote_code: bool = False
    """Allow model code (and a custom activation) shipped with the model directory to run."""
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """fsspec options for s3:// paths (endpoint, credentials); never logged."""

    def __post_init__(self) -> None:
        for name in ("pairs", "texts", "model", "output"):
            _required(_flag(name), getattr(self, name))
        for name in ("top", "max_batch_tokens", "num_encoders", "encoder_threads", "block_pairs", "join_parts"):
            _positive(_flag(name), getattr(self, name))
        _choice("--device", self.device, DEVICES)
        _choice("--dtype", self.dtype, RERANK_DTYPES)
        _dtype_on_device(self.dtype, self.device)
        _choice("--encoding-errors", self.encoding_errors, ENCODING_ERRORS)



CONFIGS: dict[str, type] = {cls.command: cls for cls in (EmbedConfig, MineConfig, RerankConfig, SearchConfig)}
"""The config class of each subcommand; the name is also the YAML file's section for it."""


def pooling_modes(pooling: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in pooling.replace(",", "+").split("+") if p.strip())
