"""`pipeline.embed_dataset`: embed's tokenize and encode stages on any Ray Dataset, Dataset in, Dataset out.

    ds (any Ray Data source: from_items, read_parquet, read_sql, read_delta, ...)
      -> prepare_rows (map_batches: the text field as `text`, _valid, the id)
      -> TokenizeStage -> EncodeStage (pipeline.engine.chain.embed_stages: the same plan, micro-batches
         and vectors as `embedpipe embed`; no sink)
      -> finish_rows (map_batches: --precision/--truncate-dim applied, the bookkeeping columns dropped)

What it does not give: exactly-once commits and resume belong to `embedpipe embed`'s own sink (files
committed whole, the output's lock and identity); a Dataset written with `write_parquet`,
`write_lance` or `write_iceberg` gets what Ray Data's sinks give (a failed write may leave partial
files; a rerun writes everything again). Row order is Ray Data's (not preserved unless the
DataContext says so): join on an id column.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import DEFAULT_MODEL, EmbedConfig
from pipeline.errors import InputError, UsageError
from pipeline.quantization import NEEDS_RANGES, VectorFormat, from_column
from pipeline.storage.rows import embeddable
from pipeline.stages.columns import EMBEDDING, ID, N_CHUNKS, N_TOKENS, ROW, TEXT, TRUNCATED, VALID

# EmbedConfig fields that concern files, runs or other commands: refused here
NOT_FOR_DATASETS = ("input", "output", "rows_per_file", "overwrite", "keep_columns", "on_invalid", "calibration_rows",
                    "mine", "mine_output", "mine_top_k", "mine_max_pairs", "mine_threshold", "rerank_model",
                    "rerank_top", "rerank_output", "stall_timeout", "storage_options", "encoding_errors", "output_dtype",
                    "writer", "pack_files", "document_per_file", "format")
SOURCE_SINK_CPUS = 1.0  # per node, left to the caller's read and write operators
ADDED_ID = "_embedpipe_added_id"  # marks rows whose `id` column embed_dataset added (and removes)


def embed_dataset(ds, model: str = DEFAULT_MODEL, text_field: str = "text", id_field: str | None = None,
                  **options: Any):
    """`ds` with an `embedding` column added to its rows, computed by embedpipe's tokenize and encode
    stages on the Ray cluster in use, with the resource plan and vectors of `embedpipe embed`.

    `options` are the model, encoding and precision fields of `EmbedConfig` (`normalize`, `prompt_name`,
    `dtype`, `device`, `num_encoders`, `max_batch_tokens`, `precision`, `truncate_dim`, `chunk_tokens`,
    ...). int8/uint8 need `calibration=` (a .npy of ranges, or an earlier output): there is no run
    to sample. With `chunk_tokens` (which needs `id_field`) a row becomes one row per chunk, with `id`
    (`doc#k`), `doc_id`, `chunk`, `start`, `end`, and the text column holding the chunk's text.
    Rows whose text is empty, blank or null get a null embedding.

    Not given here: exactly-once commits and resume, which belong to `embedpipe embed`'s own sink; a
    Ray Data sink gives what Ray Data gives. Row order is Ray Data's.
    """
    from pipeline.commands.embed import _onnx_graph, check_chunking
    from pipeline.engine.calibration import vector_format
    from pipeline.engine.chain import embed_stages
    from pipeline.engine.plan import COMMIT_CPUS, READ_CPUS
    from pipeline.models.describe import ModelFacts
    from pipeline.models.loading import check_model

    config = dataset_config(model, text_field, id_field, options)
    check_model(config)
    info, vectors, spec = ModelFacts(config).result()
    check_chunking(config, info, spec)
    fmt = vector_format(config, info, vectors, None)
    if fmt.precision in NEEDS_RANGES and fmt.ranges is None:
        raise UsageError(f"precision={fmt.precision}: embed_dataset needs calibration= (a .npy of ranges, or an "
                         "earlier embedpipe output of the same model): there is no run to sample them from")
    _ensure_ray()
    plan = _plan(config, vectors, info)
    # The plan leaves READ_CPUS + COMMIT_CPUS free beside the actor pools: these two tasks fit there
    # (a task of Ray Data's default 1 CPU would wait for ever beside them)
    ds = ds.map_batches(prepare_rows, fn_kwargs={"text_field": text_field, "id_field": id_field},
                        batch_format="pyarrow", zero_copy_batch=True, num_cpus=READ_CPUS)
    ds = embed_stages(ds, config, plan, None, spec, _onnx_graph(config, plan, info), None)
    return ds.map_batches(finish_rows, fn_kwargs={"fmt": fmt if info.kind == "dense" else None, "text_field": text_field},
                          batch_format="pyarrow", zero_copy_batch=True, num_cpus=COMMIT_CPUS)


def dataset_config(model: str, text_field: str, id_field: str | None, options: dict[str, Any]) -> EmbedConfig:
    refused = sorted(set(options) & set(NOT_FOR_DATASETS))
    if refused:
        raise UsageError(f"embed_dataset: {', '.join(refused)} concern(s) files or runs, which a Dataset's own "
                         "sources and sinks handle (use `embedpipe embed` for exactly-once files)")
    if options.get("chunk_tokens") and not id_field:
        raise UsageError("embed_dataset: chunk_tokens needs id_field, the column that names each document "
                         "(a chunk's id is '<id>#<chunk>')")
    # keep_columns=(text_field,): TokenizeStage keeps the text, which is the input's own column here
    return EmbedConfig(input="<dataset>", output="<dataset>", model=model, text_field=text_field, id_field=id_field,
                       keep_columns=(text_field,), quiet=True, **options)


def _plan(config: EmbedConfig, vectors: dict, info):
    """embed's plan, its actors' CPU reservations scaled down to leave SOURCE_SINK_CPUS per node: the
    caller's own read and write operators (Ray Data's default: a CPU each) must find room beside the
    actor pools, or they wait for ever (embed's own read and commit tasks take a quarter of a CPU).
    The actors keep their threads: a reservation is Ray's bookkeeping, not a limit."""
    from dataclasses import replace

    import ray

    from pipeline.engine.plan import alive_nodes, plan_from_cluster

    plan = plan_from_cluster(config, vectors.get("vocab_size"), info.weights_per_token)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    scale = max(0.25, (cpus - SOURCE_SINK_CPUS * alive_nodes()) / cpus) if cpus else 1.0
    return replace(plan, tokenizer_cpus=plan.tokenizer_cpus * min(scale, 1.0), encoder_cpus=plan.encoder_cpus * min(scale, 1.0))


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()


def prepare_rows(table: pa.Table, text_field: str, id_field: str | None) -> pa.Table:
    """A block of the input as TokenizeStage reads it: the text under `text`, `_valid`, and `id`
    (id_field's values as strings; without id_field, an `id` column is added only where there is none)."""
    if text_field not in table.column_names:
        raise InputError(f"embed_dataset: the rows have no {text_field!r} column (columns are {table.column_names[:12]})")
    if text_field != TEXT:
        if TEXT in table.column_names:
            raise InputError(f"embed_dataset: the rows have a {TEXT!r} column besides text_field={text_field!r}; "
                             "rename one of them")
        table = table.rename_columns([TEXT if c == text_field else c for c in table.column_names])
    texts = table[TEXT].combine_chunks().cast(pa.string())
    valid = embeddable(texts)
    table = table.set_column(table.column_names.index(TEXT), TEXT, pc.fill_null(texts, ""))
    table = table.append_column(VALID, valid)
    if id_field:
        ids = table[id_field].cast(pa.string())
        if ID in table.column_names:
            table = table.set_column(table.column_names.index(ID), ID, ids)
        else:
            table = table.append_column(ID, ids)
    elif ID not in table.column_names:
        table = table.append_column(ID, pa.nulls(table.num_rows, pa.string())).append_column(
            ADDED_ID, pa.repeat(True, table.num_rows))
    return table


def finish_rows(table: pa.Table, fmt: VectorFormat | None, text_field: str) -> pa.Table:
    """The encoders' block as the caller's rows: the stored vectors (--precision, --truncate-dim),
    null for invalid rows, the text back under its own name, the bookkeeping columns gone."""
    valid = np.asarray(table[VALID].to_numpy(zero_copy_only=False), bool)
    if fmt is not None and EMBEDDING in table.column_names:
        column = fmt.stored(from_column(table[EMBEDDING]))
        if not valid.all():
            column = pa.FixedSizeListArray.from_arrays(column.values, column.type.list_size, mask=pa.array(~valid))
        table = table.set_column(table.column_names.index(EMBEDDING), EMBEDDING, column)
    drop = [c for c in (VALID, ROW, N_TOKENS, TRUNCATED, N_CHUNKS) if c in table.column_names]
    if ADDED_ID in table.column_names:
        drop += [ADDED_ID, ID]
    table = table.drop_columns(drop)
    if text_field != TEXT:
        table = table.rename_columns([text_field if c == TEXT else c for c in table.column_names])
    return table
