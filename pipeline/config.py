"""Run configuration: one frozen object built from defaults <- YAML <- flags.

Every stage receives the same `EmbedConfig`. Validation happens once, in
`__post_init__`, and each error names the flag (or YAML key) to fix.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import yaml

from pipeline.errors import UsageError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16", "int8")
BACKENDS = ("auto", "torch", "onnx")
OUTPUT_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class EmbedConfig:
    """What `embedpipe embed` does. Field docstrings double as CLI help."""

    input: str
    """File, directory, glob or s3:// URI of the documents."""
    output: str
    """Directory (local or s3://) that receives one Parquet file per input shard."""
    model: str = DEFAULT_MODEL
    """sentence-transformers directory, plain Hugging Face directory, hub id, or the default."""
    text_field: str = "text"
    """Column / JSON key holding the text (ignored for .txt)."""
    id_field: str | None = None
    """Column holding a document id; default is '<relative shard path>:<row>'."""
    keep_columns: tuple[str, ...] = ()
    """Input columns copied next to the vectors."""
    pooling: str | None = None
    """Override the model's pooling: one of POOLING_MODES or several joined by '+'."""
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
    output_dtype: str = "float32"
    """Stored vector dtype: float32 or float16 (for a sparse model: of its values)."""
    sparse_top_k: int | None = None
    """Sparse (SPLADE) models: keep only this many strongest terms per document, as
    SparseEncoder.encode's max_active_dims; default all non-zero terms."""
    num_encoders: int | None = None
    """Encoder replicas in all; default one per GPU (CUDA) or encoders_per_node on every node (CPU)."""
    encoders_per_node: int | None = None
    """CPU-only clusters: encoder replicas on each node, sharing its CPUs; default the resource plan's
    (one per node). Ignored on GPUs: one replica per GPU."""
    num_tokenizers: int | None = None
    """Tokenizer actors; default scales with the cluster's CPUs."""
    encoder_threads: int | None = None
    """Threads per CPU encoder (ONNX Runtime or torch); default the CPUs of its node."""
    rows_per_file: int = 50_000
    """Largest number of rows in one output file; a bigger shard is written as several files."""
    ray_address: str | None = None
    """Empty: start a local Ray cluster; 'auto' or an address: join that cluster."""
    overwrite: bool = False
    """Embed every shard again instead of resuming."""
    quiet: bool = False
    """No progress bars or summary line."""
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
        if not self.input:
            raise UsageError("--input is required")
        if not self.output:
            raise UsageError("--output is required")
        if self.pooling is not None:
            modes = pooling_modes(self.pooling)
            bad = [m for m in modes if m not in POOLING_MODES]
            if bad or not modes:
                raise UsageError(
                    f"--pooling {self.pooling!r}: expected one of {', '.join(POOLING_MODES)} "
                    "or several joined by '+'"
                )
        _positive("--max-seq-length", self.max_seq_length)
        _positive("--max-batch-tokens", self.max_batch_tokens)
        _positive("--num-encoders", self.num_encoders)
        _positive("--encoders-per-node", self.encoders_per_node)
        _positive("--num-tokenizers", self.num_tokenizers)
        _positive("--encoder-threads", self.encoder_threads)
        _positive("--rows-per-file", self.rows_per_file)
        _positive("--sparse-top-k", self.sparse_top_k)
        _positive("--mine-top-k", self.mine_top_k)
        _positive("--mine-max-pairs", self.mine_max_pairs)
        _positive("--rerank-top", self.rerank_top)
        if (self.rerank_model or self.rerank_top or self.rerank_output) and not self.mine:
            flag = "--rerank-model" if self.rerank_model else "--rerank-top" if self.rerank_top else "--rerank-output"
            raise UsageError(f"{flag} needs --mine: the pairs reranked are the ones mined after embedding")
        if (self.rerank_top or self.rerank_output) and not self.rerank_model:
            raise UsageError(f"{'--rerank-top' if self.rerank_top else '--rerank-output'} is only used with --rerank-model")
        _choice("--device", self.device, DEVICES)
        _choice("--dtype", self.dtype, DTYPES)
        _choice("--backend", self.backend, BACKENDS)
        _choice("--output-dtype", self.output_dtype, OUTPUT_DTYPES)
        _choice("--encoding-errors", self.encoding_errors, ("strict", "replace"))
        _choice("--on-invalid", self.on_invalid, ("skip", "error"))
        if isinstance(self.stall_timeout, bool) or not isinstance(self.stall_timeout, (int, float)) or self.stall_timeout < 0:
            raise UsageError(f"--stall-timeout must be a number of seconds >= 0, got {self.stall_timeout!r}")
        if self.device == "cpu" and self.dtype in ("float16",):
            raise UsageError("--dtype float16 needs --device cuda; use float32 or bfloat16 on CPU")
        if self.device == "cuda" and self.dtype == "int8":
            raise UsageError("--dtype int8 is the CPU path; use float16 or bfloat16 with --device cuda")
        if self.backend == "onnx" and self.device == "cuda":
            raise UsageError("--backend onnx is the CPU path; GPUs run torch (--device cpu, or --backend auto)")
        if self.backend == "onnx" and self.dtype in ("float16", "bfloat16"):
            raise UsageError(f"--backend onnx runs float32 or int8, not --dtype {self.dtype}")
        if self.backend == "torch" and self.dtype == "int8":
            raise UsageError("--dtype int8 runs on ONNX Runtime; drop --backend torch")
        reserved = {"id", "embedding", "indices", "values"} & set(self.keep_columns)
        if reserved:
            raise UsageError(f"--keep-columns cannot include {sorted(reserved)}: embedpipe writes those")

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data, without storage options (they may hold secrets)."""
        data = dataclasses.asdict(self)
        data.pop("storage_options")
        data["keep_columns"] = list(self.keep_columns)
        return data


def pooling_modes(pooling: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in pooling.replace(",", "+").split("+") if p.strip())


def _positive(flag: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{flag} must be a positive integer, got {value!r}")


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


_FIELDS = {f.name: f for f in fields(EmbedConfig)}


def load_yaml(path: str, known: Mapping[str, Any] | None = None, section: str = "embed") -> dict[str, Any]:
    """Read a YAML config file; an unknown key is an error naming it.

    Keys are the fields of `known` (default: EmbedConfig's), '-' or '_' alike,
    either at the top level or under a `section:` mapping (`embed:`, `mine:`).
    """
    known = _FIELDS if known is None else known
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option: value")
    values = data[section] if isinstance(data.get(section), dict) else data
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UsageError(f"--config {path}: unknown key {key!r}")
        out[name] = value
    return out


def build_config(config_file: str | None = None, **overrides: Any) -> EmbedConfig:
    """Defaults <- YAML file <- explicit overrides (None means 'not given')."""
    values: dict[str, Any] = load_yaml(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(_FIELDS)
    if unknown:
        raise UsageError(f"unknown option(s): {', '.join(sorted(unknown))}")
    if isinstance(values.get("keep_columns"), str):
        values["keep_columns"] = tuple(c.strip() for c in values["keep_columns"].split(",") if c.strip())
    elif values.get("keep_columns") is not None:
        values["keep_columns"] = tuple(values["keep_columns"])
    for key in ("input", "output"):
        if key not in values:
            raise UsageError(f"--{key} is required (as a flag or in --config)")
    for key in ("input", "output", "model"):
        if key in values:
            values[key] = str(values[key])
    try:
        return EmbedConfig(**values)
    except TypeError as exc:
        raise UsageError(str(exc)) from None
