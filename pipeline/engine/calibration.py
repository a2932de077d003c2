"""A run's vector format (pipeline.quantization) and, for int8/uint8, its ranges: computed once per run.

sentence-transformers computes int8/uint8 ranges from whatever one `encode` call holds; in a sharded
job that would give every block its own scale. A run has one set instead, fixed before its first
commit and kept in `_run.json`, so a resume reuses it:

- `--calibration FILE`: a `.npy` of shape (2, dim), or an earlier output (its directory or its
  `_manifest.json`), whose `quantization.ranges` are taken;
- else `--calibration-rows N` (default 2000) documents sampled across the shards: the first valid
  rows of every shard (N / shards each; with more shards than N, N shards evenly spread), embedded
  by one Ray task with sentence-transformers on the encoders' device (GPU: --dtype, float16 for auto;
  CPU: float32, whatever --dtype),
  truncated and normalised as the run's vectors are, and their per-dimension minimum and maximum taken.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from typing import Any

import numpy as np

from pipeline.config import DEFAULT_CALIBRATION_ROWS, EmbedConfig
from pipeline.errors import InputError, PipelineError, UsageError
from pipeline.quantization import NEEDS_RANGES, VectorFormat, ranges_of
from pipeline.stages.columns import TEXT, VALID
from pipeline.storage.filesystems import get_fs

log = logging.getLogger(__name__)


def vector_format(config: EmbedConfig, info, vectors: dict[str, Any], earlier_run: dict | None) -> VectorFormat:
    """What this run stores, with its ranges where they are already known (a file, or the run being
    resumed); `calibrate` finds them otherwise."""
    if info.kind != "dense":
        return VectorFormat(config.precision)
    model_dim = vectors.get("dim")
    if config.truncate_dim is not None and model_dim is not None and config.truncate_dim > model_dim:
        raise UsageError(f"--truncate-dim {config.truncate_dim}: model {config.model} makes {model_dim}-dimensional "
                         "vectors; it can only be shortened")
    truncate = config.truncate_dim or vectors.get("model_truncate_dim")
    if truncate is not None and model_dim is not None and truncate >= model_dim:
        truncate = None
    fmt = VectorFormat(config.precision, truncate or model_dim, truncate, info.normalize)
    if config.precision not in NEEDS_RANGES:
        return fmt
    if config.calibration:
        return _with_ranges(fmt, load_ranges(config, fmt.dim))
    previous = (earlier_run or {}).get("settings", {})
    if previous.get("precision") == config.precision and (previous.get("quantization") or {}).get("ranges"):
        return _with_ranges(fmt, np.asarray(previous["quantization"]["ranges"], np.float32))
    return fmt


def _with_ranges(fmt: VectorFormat, ranges: np.ndarray) -> VectorFormat:
    from dataclasses import replace

    return replace(fmt, ranges=(tuple(float(x) for x in ranges[0]), tuple(float(x) for x in ranges[1])))


def quantization_source(config: EmbedConfig, earlier_run: dict | None) -> dict[str, Any] | None:
    """How the ranges were obtained, when they were not computed by this run."""
    if config.precision not in NEEDS_RANGES:
        return None
    if config.calibration:
        return {"from": "file", "path": config.calibration}
    return (earlier_run or {}).get("quantization_source") or {"from": "resumed run"}


# --------------------------------------------------------------------------- --calibration FILE


def load_ranges(config: EmbedConfig, dim: int | None) -> np.ndarray:
    """(2, dim) float32 ranges from `config.calibration`: a .npy, an output directory or its manifest."""
    path = config.calibration
    fs, root = get_fs(path, config.storage_options)
    try:
        if path.endswith(".npy"):
            with fs.open(root, "rb") as f:
                ranges = np.load(io.BytesIO(f.read()), allow_pickle=False)
        else:
            manifest_path = root if root.endswith(".json") else root.rstrip("/") + "/_manifest.json"
            manifest = json.loads(fs.cat_file(manifest_path))
            ranges = (manifest.get("quantization") or {}).get("ranges")
            if ranges is None:
                raise UsageError(f"--calibration {path}: its manifest records no int8/uint8 ranges "
                                 f"(precision {manifest.get('precision') or manifest.get('output_dtype')})")
            ranges = np.asarray(ranges)
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"--calibration {path}: no such file (a .npy, an output directory or its _manifest.json)") from None
    except ValueError as exc:
        raise InputError(f"--calibration {path}: unreadable ({exc})") from None
    ranges = np.asarray(ranges, np.float32)
    if ranges.ndim != 2 or ranges.shape[0] != 2 or (dim is not None and ranges.shape[1] != dim):
        raise UsageError(f"--calibration {path}: ranges of shape {tuple(ranges.shape)}, this run needs (2, {dim})")
    if not np.isfinite(ranges).all() or (ranges[0] > ranges[1]).any():
        raise UsageError(f"--calibration {path}: ranges must be finite with every minimum at most its maximum")
    return ranges


# --------------------------------------------------------------------------- --calibration-rows N


def calibrate(config: EmbedConfig, fmt: VectorFormat, shards: list, device: str) -> tuple[VectorFormat, dict]:
    """`fmt` with ranges from sampled documents embedded on the cluster (Ray must be running), and
    the source recorded in the manifest."""
    import ray

    began = time.time()
    wanted = config.calibration_rows or DEFAULT_CALIBRATION_ROWS
    texts, used = sample_texts(config, shards, wanted)
    if len(texts) < 2:
        raise InputError(f"--input {config.input}: {len(texts)} non-empty document(s) to compute the int8/uint8 ranges "
                         "from; give ranges with --calibration FILE")
    if len(texts) < 100:
        log.warning("int8/uint8 ranges from only %d documents: values outside them are clipped; more rows, or "
                    "--calibration FILE, give steadier ranges", len(texts))
    resources = {"num_gpus": 1, "num_cpus": 0} if device == "cuda" else {"num_cpus": 1}
    task = ray.remote(_embed_sample).options(**resources, max_retries=2)
    try:
        vectors = ray.get(task.remote(config, texts, device), timeout=config.stall_timeout or None)
    except ray.exceptions.GetTimeoutError:
        raise PipelineError(f"embedding the {len(texts)} calibration documents took more than --stall-timeout "
                            f"{config.stall_timeout:g}s (no {'GPU' if device == 'cuda' else 'CPU'} free for it?)") from None
    ranges = ranges_of(fmt.finish(vectors))
    source = {"from": "rows", "rows": len(texts), "shards": used, "device": device,
              "seconds": round(time.time() - began, 3)}
    log.info("int8/uint8 ranges from %d documents of %d shard(s) in %.1fs", len(texts), used, source["seconds"])
    return _with_ranges(fmt, ranges), source


def sample_texts(config: EmbedConfig, shards: list, wanted: int) -> tuple[list[str], int]:
    """Up to `wanted` valid texts: the first rows of every shard, or of `wanted` shards evenly spread."""
    from pipeline.storage.formats import ReadSpec
    from pipeline.storage.rows import read_shard

    shards = sorted(shards, key=lambda s: s.key)
    if len(shards) > wanted:
        shards = [shards[int(i * len(shards) / wanted)] for i in range(wanted)]
    quota = math.ceil(wanted / max(1, len(shards)))
    spec = ReadSpec(config.text_field, config.id_field, (), config.encoding_errors, config.storage_options)
    texts: list[str] = []
    used = 0
    for shard in shards:
        taken = []
        for table in read_shard(shard, spec):
            valid = table.filter(table[VALID])[TEXT].to_pylist()
            taken += valid[: quota - len(taken)]
            if len(taken) >= quota:
                break
        used += bool(taken)
        texts += taken
        if len(texts) >= wanted:
            break
    return texts[:wanted], used


def _embed_sample(config: EmbedConfig, texts: list[str], device: str) -> np.ndarray:
    """The float32 vectors of `texts`, as SentenceTransformer.encode gives them, untruncated (a Ray task)."""
    import torch

    from pipeline.models.loading import load_model, model_normalizes, resolve_prompt

    model = load_model(config, device=device, weights=True)
    if device == "cuda":
        model.to(torch.float16 if config.dtype in ("auto", "float16") else getattr(torch, config.dtype))
    model.truncate_dim = None  # truncation is the run's, applied afterwards with its normalisation
    normalize = bool(config.normalize) and not model_normalizes(model)
    vectors = model.encode(texts, prompt=resolve_prompt(model, config), batch_size=64, convert_to_numpy=True,
                           normalize_embeddings=normalize, show_progress_bar=False)
    return np.asarray(vectors, np.float32)
