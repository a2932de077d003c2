"""The resource plan: how many tokenizer and encoder actors, and what each reserves, from the
cluster's resources; and what a CPU encoder runs (ONNX graph, int8 graph, or PyTorch).

Resources are decided here, never inside a stage. A chain whose actors reserve so many CPUs that
read and commit tasks cannot be scheduled hangs without an error, so a plan always leaves
READ_CPUS + COMMIT_CPUS free and refuses what cannot fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import EmbedConfig
from pipeline.errors import UsageError
from pipeline.stages.batching import CPU_BATCH_TOKENS, REFERENCE_WEIGHTS_PER_TOKEN, batch_tokens, call_tokens

READ_CPUS = 0.25  # read and commit tasks are I/O bound; small reservations keep them schedulable
COMMIT_CPUS = 0.25  # the tasks that join a file's pieces
# Rows per block: the unit handed to a tokenizer or encoder call, and balanced over the actors.
# Ray Data hands an actor a whole block (of at least batch_size rows) per task, and a shard's rows
# arrive longest first, so a block's cost follows its rows' lengths: with 1,024-row blocks the first
# block of 10,000 fortunes held 153,562 tokens (3.7x an average one) and took one encoder 89 s of a
# 164 s run while the other finished the rest and waited. 256-row blocks bound the costliest to a
# quarter of that, it comes first, and tokenising the next block overlaps encoding this one.
# A GPU takes larger ones.
CPU_BLOCK_ROWS = 256
GPU_BLOCK_ROWS = 8192
# ... for all-MiniLM-L6-v2, whose tokens pass through this many weights. A cheaper model's block
# costs less to encode, while every block costs the same to move, schedule and report (Ray
# tasks, Arrow tables, the progress board): on CPU its blocks grow in proportion, up to
# MAX_CPU_BLOCK_ROWS. A near-zero-cost model's host work per row fell by a third from 256-row
# to 4,096-row blocks (BENCHMARKS.md, host benchmark).
REFERENCE_WEIGHTS = REFERENCE_WEIGHTS_PER_TOKEN  # all-MiniLM-L6-v2
MAX_CPU_BLOCK_ROWS = 4096
TOKENIZERS_PER_GPU = 8
TOKENIZER_WEIGHTS = 82_000  # the weights a token whose encoding costs what tokenising it costs (tokenizers_per_node)


@dataclass(frozen=True)
class Plan:
    """Actor pools and their reservations for one run."""

    device: str
    num_tokenizers: int
    tokenizer_cpus: float
    num_encoders: int
    encoder_cpus: float
    encoder_gpus: float
    encoder_threads: int | None
    block_rows: int = CPU_BLOCK_ROWS
    batch_tokens: int = CPU_BATCH_TOKENS
    """Tokens per micro-batch (rows x longest row): the tokenizers cut micro-batches to it."""
    call_tokens: int | None = None
    """What one more micro-batch costs, in tokens: the tokenizers cut where padding plus this is least."""
    writer: str = "encoder"
    """Who builds the output files (--writer): the encoders, or a separate writer (joins of pieces)."""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_resources(
    config: EmbedConfig, resources: dict[str, float], nodes: int, vocab_size: int | None = None,
    weights_per_token: int | None = None,
) -> Plan:
    """Pool sizes and reservations that fit the cluster, leaving room for read/write tasks.

    A chain whose actors reserve so many CPUs that read and commit tasks
    cannot be scheduled hangs without an error, so the plan always keeps
    READ_CPUS + COMMIT_CPUS free and refuses what cannot fit.
    """
    cpus = float(resources.get("CPU", 0))
    gpus = float(resources.get("GPU", 0))
    nodes = max(1, nodes)
    device = config.device
    if device == "auto":
        device = "cuda" if gpus >= 1 else "cpu"
    if device == "cuda" and gpus < 1:
        raise UsageError("--device cuda: the Ray cluster has no GPUs")
    if device == "cuda" and config.dtype == "int8":
        raise UsageError("--dtype int8 is the CPU path, and this cluster has GPUs; add --device cpu, or use float16")
    if device == "cuda" and config.backend == "onnx":
        raise UsageError("--backend onnx is the CPU path, and this cluster has GPUs; add --device cpu")
    if cpus < 1:
        raise UsageError(f"the Ray cluster has {cpus:g} CPUs; embedpipe needs at least 1")
    headroom = READ_CPUS + COMMIT_CPUS
    if device == "cuda":
        encoders, tokenizers, tok_cpus, enc_cpus, threads, enc_gpus = _gpu_pools(config, cpus, gpus, headroom)
    else:
        encoders, tokenizers, tok_cpus, enc_cpus, threads, enc_gpus = _cpu_pools(config, cpus, nodes, headroom,
                                                                                 weights_per_token)
    needed = encoders * enc_cpus + tokenizers * tok_cpus + headroom
    if enc_cpus < 0.1 or needed > cpus + 1e-9:
        raise UsageError(
            f"{encoders} encoder(s) and {tokenizers} tokenizer(s) do not fit the cluster's {cpus:g} CPUs; "
            "lower --num-encoders or --num-tokenizers"
        )
    return Plan(
        device, tokenizers, tok_cpus, encoders, round(enc_cpus, 3), round(enc_gpus, 6), threads,
        block_rows_for(device, weights_per_token), batch_tokens(config.max_batch_tokens, device, vocab_size),
        call_tokens(device, weights_per_token), _writer(config, device),
    )


def _gpu_pools(config: EmbedConfig, cpus: float, gpus: float, headroom: float):
    """(encoders, tokenizers, tokenizer CPUs, encoder CPUs, threads, encoder GPUs) on a GPU cluster."""
    per_gpu = config.encoders_per_gpu or 1
    encoders = config.num_encoders or int(gpus) * per_gpu
    if encoders > gpus * per_gpu:
        raise UsageError(
            f"--num-encoders {encoders}: the cluster has only {gpus:g} GPUs for {per_gpu} encoder(s) each"
            + ("" if per_gpu > 1 else "; add --encoders-per-gpu to share them")
        )
    # One tokenizer keeps up with roughly a tenth of what an H100 encodes (BENCHMARKS.md, GPU):
    # a GPU takes up to TOKENIZERS_PER_GPU of them, as many as the spare cores allow.
    gpus_used = -(-encoders // per_gpu)
    tokenizers = config.num_tokenizers or max(1, min(TOKENIZERS_PER_GPU * gpus_used, int(cpus - encoders - headroom)))
    return encoders, tokenizers, 1.0, 1.0, None, 1.0 / per_gpu


def _cpu_pools(config: EmbedConfig, cpus: float, nodes: int, headroom: float, weights_per_token: int | None = None):
    """(encoders, tokenizers, tokenizer CPUs, encoder CPUs, threads, encoder GPUs) on a CPU-only cluster.

    Single-threaded encoders, one per core, beat one encoder using every core:
    small GEMMs scale poorly over threads (BENCHMARKS.md, "layout"). On nodes of
    more than 2 cores one core is left to the tokenizer and to reading and writing.
    With --encoders-per-node, each replica takes its share of the node's cores as threads, so
    that its CPU reservation makes Ray spread the replicas evenly over the nodes. A cheap model
    gets more tokenizers (tokenizers_per_node).
    """
    node_cpus = cpus / nodes
    usable = node_cpus - (1 if node_cpus > 2 else 0)
    if config.encoders_per_node and not config.encoder_threads:
        threads = max(1, int(usable // config.encoders_per_node))
    else:
        threads = config.encoder_threads or 1
    per_node = config.encoders_per_node or max(1, int(usable // threads))
    encoders = config.num_encoders or per_node * nodes
    tokenizers = config.num_tokenizers or nodes * tokenizers_per_node(per_node, weights_per_token)
    tok_cpus = 0.5
    # Ray spreads the actors evenly, so every node keeps the read/commit headroom: one pool for the whole
    # cluster would leave each node a fraction of it, too small for any read task (the chain then waits
    # for resources forever: 3 nodes of 2 CPUs kept 0.17 CPU each, measured).
    enc_cpus = min(float(threads), (cpus - tokenizers * tok_cpus - headroom * nodes) / encoders)
    return encoders, tokenizers, tok_cpus, enc_cpus, threads, 0.0


def tokenizers_per_node(encoders: int, weights_per_token: int | None) -> int:
    """Tokenizers for `encoders` CPU encoders on a node: as many as keep up with them, at most one per
    encoder. A tokenizer does ~2.5 µs of CPU a token (MiniLM's Rust tokenizer), what an encoder spends on
    TOKENIZER_WEIGHTS weights a token: one tokenizer feeds 130 encoders of MiniLM's cost, while a
    near-zero-cost model needs one per encoder (its 1,000,000-line host benchmark: 67.4 s with one
    tokenizer, 57.9 s with two, on 2 cores; BENCHMARKS.md)."""
    if not weights_per_token:
        return 1
    return max(1, min(encoders, -(-encoders * TOKENIZER_WEIGHTS // weights_per_token)))


def block_rows_for(device: str, weights_per_token: int | None) -> int:
    """Rows per block: GPU_BLOCK_ROWS on a GPU; on CPU, CPU_BLOCK_ROWS for a model of MiniLM's cost
    or more, and more for a cheaper one (a power of two, at most MAX_CPU_BLOCK_ROWS)."""
    if device == "cuda":
        return GPU_BLOCK_ROWS
    if not weights_per_token:
        return CPU_BLOCK_ROWS
    scale = max(1, min(MAX_CPU_BLOCK_ROWS // CPU_BLOCK_ROWS, REFERENCE_WEIGHTS // weights_per_token))
    return CPU_BLOCK_ROWS << (scale.bit_length() - 1)


def plan_from_cluster(config: EmbedConfig, vocab_size: int | None = None, weights_per_token: int | None = None) -> Plan:
    """The plan for the cluster in use; `vocab_size`: a sparse model's output width (its micro-batches
    are smaller); `weights_per_token`: the model's cost (block_rows_for)."""
    import ray

    return plan_resources(config, ray.cluster_resources(), alive_nodes(), vocab_size, weights_per_token)


def alive_nodes() -> int:
    """Nodes of the cluster in use that have CPUs (the nodes a CPU plan spreads over)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)


def cpu_encoder_path(config: EmbedConfig, kind: str = "dense") -> str:
    """What a CPU encoder runs for this config and kind of model: "onnx" (the float32 graph),
    "int8" (the quantised graph) or "torch". Under --backend auto a graph that fails its check
    still falls back to torch when it is built (_onnx_graph)."""
    if config.backend == "torch" or kind != "dense":
        return "torch"
    if config.dtype == "int8":
        return "int8"
    if config.dtype not in ("auto", "float32"):
        return "torch"  # bfloat16 on CPU
    if config.trust_remote_code and config.backend == "auto":
        # A model's own code may branch in Python on its inputs (or do more than compute), which a
        # trace freezes and probe texts cannot all reach: auto leaves it on PyTorch.
        return "torch"
    return "onnx"


def planned_dtype(config: EmbedConfig, plan: Plan | None) -> str | None:
    """The dtype the encoders will compute in, or None where no plan tells the device."""
    from pipeline.stages.batching import compute_dtype

    device = plan.device if plan is not None else config.device
    if device == "auto":
        return None if config.dtype == "auto" else config.dtype
    return compute_dtype(config.dtype, device)


def _writer(config: EmbedConfig, device: str) -> str:
    """Who builds the output files (--writer): by default a separate writer on GPUs, where the encoder's
    process should only feed the device; on CPUs the encoder (no copy)."""
    if config.writer != "auto":
        return config.writer
    return "separate" if device == "cuda" else "encoder"
