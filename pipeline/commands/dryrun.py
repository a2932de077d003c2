"""`embedpipe embed --dry-run`: what a run would do, without embedding anything.

Prints the shards (input files) found, the groups a run reads them in and the output files it
will write, the documents they hold (counted where that is
cheap, estimated otherwise, and says which), the actor pools the resource plan would
build with their resources, and a duration estimated from the throughput
measured in BENCHMARKS.md. Nothing is written and no model weights are loaded.
Without `--ray-address` no Ray cluster is started: the plan is made for the
local machine, as the local cluster a run starts would see it. With an
address, the cluster is joined only to read its resources.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.config import DEFAULT_MODEL, EmbedConfig
from pipeline.storage.packing import group_done, planned_groups
from pipeline.storage.sources import Shard, check_fields, discover_shards
from pipeline.storage.filesystems import get_fs

EXACT_BYTES = 8 << 20  # uncompressed local text shards up to this size are counted line by line
MAX_COUNTED_SHARDS = 100  # beyond this, a spread sample of shards is counted and the rest scaled by size
SAMPLE_BYTES = 1 << 20  # larger or compressed ones: documents = size / mean bytes per document of this sample

# Throughput used for the estimate, from BENCHMARKS.md (all-MiniLM-L6-v2, English fortunes of ~160
# characters / ~41 tokens; the whole command, Ray start included).
# Per core, by the encoders' path: BENCHMARKS.md 2026-12-02 at 98b6a7f, 10,000 fortunes on the 2-core dev machine
# (float32 and int8: best of 3 passes; torch: one pass).
CPU_DOCS_PER_S_PER_CORE = {
    "onnx": 119.7 / 2,  # float32 graph on ONNX Runtime (--backend auto, the default)
    "torch": 102.4 / 2,  # --backend torch (and models auto leaves on PyTorch)
    "int8": 174.6 / 2,  # --dtype int8
}
CPU_PATH_NAMES = {"onnx": "float32 on ONNX Runtime", "torch": "float32 on PyTorch", "int8": "int8 on ONNX Runtime"}
# GPU: steady state on one H100 (BENCHMARKS.md "GPU", 2026-11-25, run C): WordNet short sentences of
# ~48 characters / ~11.5 tokens, float16; bound by the encoder process's host side, not the GPU.
GPU_DOCS_PER_S = 30_303
GPU_BENCHMARK_CHARS_PER_DOC = 48
BENCHMARK_CHARS_PER_DOC = 160


@dataclass(frozen=True)
class ShardCount:
    shard: Shard
    documents: int
    method: str  # "counted", "parquet metadata", "estimated"


def count_documents(shard: Shard, storage_options: Mapping[str, Any] | None = None) -> ShardCount:
    """Documents (rows) in one shard: exact where cheap, else estimated from a sample of its first bytes."""
    if shard.format == "document":  # --document-per-file
        return ShardCount(shard, 1, "a document per file")
    fs, _ = get_fs(shard.path, storage_options)
    if shard.format == "parquet":
        import pyarrow.parquet as pq

        with fs.open(shard.path, "rb") as f:
            return ShardCount(shard, pq.read_metadata(f).num_rows, "parquet metadata")
    if shard.format == "arrow":
        return ShardCount(shard, _arrow_rows(fs, shard.path), "counted")
    compressed = shard.path.lower().endswith((".gz", ".bz2", ".zst", ".xz"))
    small = not compressed and shard.size <= EXACT_BYTES and "://" not in shard.path  # S3: sample, never download
    if shard.format == "json":
        if small:
            with fs.open(shard.path, "rb") as f:
                return ShardCount(shard, _json_rows(f.read()), "counted")
    elif small:
        with fs.open(shard.path, "rb") as f:
            lines = [line for line in f.read().split(b"\n") if line.strip()]
        header = 1 if shard.format == "csv" and lines else 0
        return ShardCount(shard, len(lines) - header, "counted")
    return ShardCount(shard, _estimate_lines(fs, shard, compressed), "estimated")


def count_all(shards: list[Shard], storage_options: Mapping[str, Any] | None = None) -> list[ShardCount]:
    """count_documents for every shard, or, past MAX_COUNTED_SHARDS, for an evenly spread sample of
    them, the others estimated at the sample's documents per byte."""
    if len(shards) <= MAX_COUNTED_SHARDS or all(s.format == "document" for s in shards):
        return [count_documents(s, storage_options) for s in shards]
    step = len(shards) / MAX_COUNTED_SHARDS
    picked = {int(i * step) for i in range(MAX_COUNTED_SHARDS)}
    counted = {i: count_documents(shards[i], storage_options) for i in sorted(picked)}
    per_byte = sum(c.documents for c in counted.values()) / max(1, sum(c.shard.size for c in counted.values()))
    return [
        counted[i] if i in counted else ShardCount(s, round(s.size * per_byte), "estimated from other shards")
        for i, s in enumerate(shards)
    ]


def _arrow_rows(fs, path: str) -> int:
    import pyarrow as pa

    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        return sum(b.num_rows for b in pa.ipc.open_stream(data))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(data)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def _json_rows(data: bytes) -> int:
    try:
        value = json.loads(data)
    except ValueError:  # JSON lines in a .json file
        return sum(1 for line in data.split(b"\n") if line.strip())
    return len(value) if isinstance(value, list) else 1


def _estimate_lines(fs, shard: Shard, compressed: bool) -> int:
    """size / mean bytes per line of the first SAMPLE_BYTES (decompressed bytes per compressed byte
    measured on the same sample for compressed files)."""
    from fsspec.compression import compr
    from fsspec.utils import infer_compression

    with fs.open(shard.path, "rb") as raw:
        stream = compr[infer_compression(shard.path)](raw, mode="rb") if compressed else raw
        sample = stream.read(SAMPLE_BYTES)
        consumed = raw.tell() or 1
    whole = sample[: sample.rfind(b"\n") + 1] or sample
    lines = max(1, sum(1 for line in whole.split(b"\n") if line.strip()))
    ratio = len(sample) / consumed if compressed else 1.0
    return round(shard.size * ratio / (len(whole) / lines))


@dataclass(frozen=True)
class ClusterView:
    where: str
    resources: dict[str, float]
    nodes: list[dict[str, float]]  # per node: CPU, GPU


def local_machine() -> ClusterView:
    """What the local Ray cluster of a run without --ray-address would have, without starting it."""
    try:
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus())
    except Exception:  # noqa: BLE001 - an internal helper; fall back to what the OS says
        cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    import torch

    gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    node = {"CPU": cpus, "GPU": gpus}
    return ClusterView("this machine (a run starts a local Ray cluster)", dict(node), [node])


def joined_cluster(address: str) -> ClusterView:
    """The resources of the cluster at `address`, read by joining it (nothing is scheduled)."""
    import ray

    nodes = [
        {"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0))}
        for n in ray.nodes()
        if n.get("Alive")
    ]
    return ClusterView(f"the Ray cluster at {address}", dict(ray.cluster_resources()), nodes)


def estimate_seconds(plan, documents: int, config: EmbedConfig) -> tuple[float | None, str]:
    """(seconds, how it was estimated) for embedding `documents` with `plan`; an estimate only."""
    if documents <= 0:
        return 0.0, "nothing to embed"
    model = config.model
    other_model = "" if model == DEFAULT_MODEL else f"; measured for {DEFAULT_MODEL}, {model} may be much slower"
    if plan.device == "cuda":
        gpus = max(1, math.ceil(plan.num_encoders * plan.encoder_gpus - 1e-6))
        rate = GPU_DOCS_PER_S * gpus
        return documents / rate, (
            f"{GPU_DOCS_PER_S:,} docs/s per GPU (BENCHMARKS.md, one H100, {DEFAULT_MODEL}, short sentences of "
            f"~{GPU_BENCHMARK_CHARS_PER_DOC} characters, start-up not counted) x {gpus} GPU(s) = "
            f"{rate:,.0f} docs/s; longer texts cost about in proportion to their tokens{other_model}"
        )
    cores = plan.num_encoders * (plan.encoder_threads or 1)
    from pipeline.engine.plan import cpu_encoder_path

    # The model's kind is not known without describing it: a dense model is assumed, and a graph
    # that fails its check (which falls back to torch) cannot be foreseen.
    path = cpu_encoder_path(config)
    per_core = CPU_DOCS_PER_S_PER_CORE[path]
    rate = per_core * cores
    return documents / rate, (
        f"{per_core:.1f} docs/s per CPU core ({CPU_PATH_NAMES[path]}; BENCHMARKS.md, {DEFAULT_MODEL}, texts of "
        f"~{BENCHMARK_CHARS_PER_DOC} characters) x {cores} encoder core(s) = {rate:,.0f} docs/s{other_model}"
    )


def dry_run(config: EmbedConfig) -> str:
    """The report `embedpipe embed --dry-run` prints."""
    from pipeline.engine.cluster import ray_session_for
    from pipeline.engine.plan import plan_resources

    shards = discover_shards(config.input, config.storage_options, config.document_per_file)
    check_fields(shards, config.id_field, config.keep_columns, config.text_field)
    groups, todo_groups = _groups(config, shards)  # names that clash are refused before any shard is counted
    counts = count_all(shards, config.storage_options)
    todo_keys = {s.key for g in todo_groups for s in g.shards}
    todo = [c for c in counts if c.shard.key in todo_keys]
    if config.ray_address:
        with ray_session_for(config.ray_address, quiet=True):
            cluster = joined_cluster(config.ray_address)
    else:
        cluster = local_machine()
    cpu_nodes = sum(1 for n in cluster.nodes if n["CPU"] > 0)
    plan = plan_resources(config, cluster.resources, cpu_nodes)
    documents = sum(c.documents for c in todo)
    seconds, basis = estimate_seconds(plan, documents, config)
    files = _output_files(config, todo_groups, {c.shard.key: c.documents for c in counts})
    return "\n".join(_report(config, counts, todo, cluster, cpu_nodes, plan, documents, seconds, basis, groups,
                              todo_groups, files))


def _groups(config: EmbedConfig, shards: list[Shard]):
    """(the groups a run would read, those it has left to do), as the run plans them: from the output's
    `_plan.json` and committed files, read without writing anything (storage.packing)."""
    committed: dict = {}
    fs = root = None
    if not config.overwrite:
        from pipeline.identity import read_all_facts
        from pipeline.storage.lance_sink import unit_facts
        from pipeline.storage.output import committed_files

        try:
            fs, root = get_fs(config.output, config.storage_options)
            root = root.rstrip("/") or root
            files = committed_files(fs, root)
        except (OSError, ValueError):
            files, fs, root = {}, None, None
        committed = dict.fromkeys(files)  # a file that cannot be read still counts as committed
        with contextlib.suppress(Exception):  # footers and Lance markers: statistics where they can be read
            facts = {**read_all_facts(fs, files), **unit_facts(fs, root, config.storage_options)} if fs else {}
            committed.update((name, f.stats) for name, f in facts.items())
    groups, _ = planned_groups(fs, root, shards, config.rows_per_file, committed, config.pack_files)
    return groups, [g for g in groups if not group_done(g, committed, config.rows_per_file)]


def _output_files(config: EmbedConfig, groups, documents: dict[str, int]) -> int:
    """About how many files the groups left to do will write: a group's documents / --rows-per-file."""
    return sum(max(1, math.ceil(sum(documents.get(s.key, 0) for s in g.shards) / config.rows_per_file)) for g in groups)


def _report(config, counts, todo, cluster, cpu_nodes, plan, documents, seconds, basis, groups, todo_groups,
            files) -> list[str]:
    from pipeline.engine.plan import COMMIT_CPUS, READ_CPUS

    methods = sorted({c.method for c in counts})
    total_bytes = sum(c.shard.size for c in counts)
    lines = [
        "embedpipe embed --dry-run: nothing is read beyond samples, nothing is embedded or written",
        f"input: {config.input}: {len(counts)} file(s) (shards), {_size(total_bytes)}"
        + (", a document per file" if config.document_per_file else ""),
    ]
    for c in counts[:10]:
        lines.append(f"  {c.shard.key} ({c.shard.format}, {_size(c.shard.size)}): {c.documents:,} documents ({c.method})")
    if len(counts) > 10:
        lines.append(f"  ... and {len(counts) - 10} more")
    lines.append(
        f"documents: {sum(c.documents for c in counts):,} in all ({', '.join(methods)}; 'estimated' = file size / "
        f"mean bytes per line of its first {SAMPLE_BYTES >> 20} MiB; past {MAX_COUNTED_SHARDS} shards, "
        f"{MAX_COUNTED_SHARDS} spread ones are counted and the others scaled by size)"
    )
    packed = sum(1 for g in groups if g.packed)
    lines.append(
        f"files: {len(groups)} group(s) of shards, {packed} of them small files packed together (each group is "
        f"read by one task; its rows go to files of at most {config.rows_per_file:,} rows)"
    )
    lines.append(
        f"output: {config.output}: {len(groups) - len(todo_groups)} group(s) already committed (skipped), "
        f"{len(todo_groups)} to embed ({len(todo)} shard(s)), about {documents:,} documents in about "
        f"{files:,} output file(s)"
    )
    lines.append(f"model: {config.model}; device {plan.device}")
    lines.append(_stored(config))
    node_text = ", ".join(f"{n['CPU']:g} CPU/{n['GPU']:g} GPU" for n in cluster.nodes[:8])
    lines.append(
        f"cluster: {cluster.where}: {len(cluster.nodes)} node(s) ({node_text}), "
        f"{cluster.resources.get('CPU', 0):g} CPUs, {cluster.resources.get('GPU', 0):g} GPUs"
    )
    lines.append("actor pools:")
    lines.append(f"  tokenize: {plan.num_tokenizers} actor(s) x {plan.tokenizer_cpus:g} CPU")
    if plan.device == "cuda":
        per_gpu = round(1 / plan.encoder_gpus) if plan.encoder_gpus else 1
        where = "one per GPU, on every GPU node" if per_gpu == 1 else f"{per_gpu} per GPU, on every GPU node"
        lines.append(f"  encode:   {plan.num_encoders} actor(s) x {plan.encoder_gpus:g} GPU + {plan.encoder_cpus:g} CPU ({where})")
    else:
        per_node = f"{plan.num_encoders / max(1, cpu_nodes):g} per node on {cpu_nodes} node(s)"
        lines.append(
            f"  encode:   {plan.num_encoders} actor(s) x {plan.encoder_cpus:g} CPU, "
            f"{plan.encoder_threads} thread(s) each ({per_node})"
        )
    lines.append(f"  read and commit: Ray tasks of {READ_CPUS:g} / {COMMIT_CPUS:g} CPU, one read task per group "
                 f"({len(todo_groups)})")
    lines.append(f"estimated duration: {_duration(seconds)} (an estimate: {basis})")
    return lines


def _stored(config: EmbedConfig) -> str:
    """What is stored of each vector, and the calibration pass int8/uint8 runs first."""
    from pipeline.config import DEFAULT_CALIBRATION_ROWS

    text = f"stored: {config.precision} vectors" + (f", truncated to {config.truncate_dim} dimensions" if config.truncate_dim else "")
    if config.precision in ("int8", "uint8"):
        if config.calibration:
            text += f"; ranges from {config.calibration}"
        else:
            rows = config.calibration_rows or DEFAULT_CALIBRATION_ROWS
            text += (f"; ranges from {rows:,} sampled documents, embedded by one Ray task before the run "
                     "(a resume reuses the output's own)")
    return text


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 120:
        return f"about {seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"

