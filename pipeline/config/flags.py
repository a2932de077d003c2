"""The config fields as the CLI's options: `options(cls)` describes every field of a config class
(flag, argument group, type, default, help from its docstring) for the CLI (`pipeline.cli`) and
docs/reference.md (`pipeline.reference`)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from pipeline.config.runs import EmbedConfig, MineConfig, RerankConfig
from pipeline.config.search import SearchConfig
from pipeline.config.validators import _flag

GROUPS = ("input", "model", "output", "resources", "reliability", "mining", "rerank", "search")
"""The CLI's argument groups, in the order `--help` and docs/reference.md show them."""

FIELD_GROUPS: dict[type, dict[str, tuple[str, ...]]] = {
    EmbedConfig: {
        "input": ("input", "text_field", "id_field", "document_per_file", "encoding_errors", "storage_options"),
        "model": ("model", "pooling", "normalize", "max_seq_length", "prompt_name", "prompt", "role", "dtype", "backend",
                  "trust_remote_code"),
        "output": ("output", "format", "keep_columns", "precision", "truncate_dim", "calibration_rows", "calibration",
                   "output_dtype", "sparse_top_k", "chunk_tokens", "chunk_overlap", "rows_per_file", "pack_files", "quiet"),
        "resources": ("device", "max_batch_tokens", "num_encoders", "encoders_per_gpu", "encoders_per_node", "num_tokenizers",
                      "encoder_threads", "writer", "ray_address"),
        "reliability": ("on_invalid", "stall_timeout", "overwrite"),
        "mining": ("mine", "mine_output", "mine_top_k", "mine_max_pairs", "mine_threshold"),
        "rerank": ("rerank_model", "rerank_top", "rerank_output"),
    },
    MineConfig: {
        "input": ("embeddings", "storage_options"),
        "output": ("output", "quiet"),
        "resources": ("device", "block_size", "ray_address"),
        "mining": ("top_k", "max_pairs", "threshold", "same_document_pairs"),
        "rerank": ("rerank_model", "texts", "rerank_top", "rerank_output"),
    },
    RerankConfig: {
        "input": ("pairs", "texts", "embeddings", "text_field", "id_field", "document_per_file", "encoding_errors",
                  "storage_options"),
        "model": ("model", "dtype", "trust_remote_code"),
        "output": ("output", "quiet"),
        "resources": ("device", "max_batch_tokens", "num_encoders", "encoder_threads", "block_pairs", "join_parts",
                      "ray_address"),
        "reliability": ("overwrite",),
        "rerank": ("top",),
    },
    SearchConfig: {
        "input": ("embeddings", "query", "queries", "texts", "storage_options"),
        "model": ("model", "prompt_name", "prompt", "trust_remote_code"),
        "output": ("output", "quiet"),
        "resources": ("device", "block_size"),
        "search": ("top_k",),
    },
}
"""The argument group of every field of each config."""


@dataclass(frozen=True)
class Option:
    """One config field as the CLI (`--help`) and docs/reference.md show it."""

    name: str
    """The field, and its YAML key."""
    group: str
    """Its argument group (one of GROUPS)."""
    kind: str
    """What it holds: string, integer, number, boolean, list (comma-separated as a flag) or mapping (JSON as a flag)."""
    default: Any
    """The field's default; dataclasses.MISSING for a required field."""
    doc: str
    """The field's docstring, on one line."""
    positional: bool = False
    """A command-line argument (`embedpipe search EMBEDDINGS QUERY`), not a flag; a YAML key all the same."""

    @property
    def flag(self) -> str:
        """How the command line names it: `--top-k`, or `EMBEDDINGS` for an argument."""
        return self.name.upper() if self.positional else _flag(self.name)

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def shown_default(self) -> str | None:
        """'required', the default as a user would write it, or None where the docstring says it (None, {})."""
        if self.required:
            return "required"
        value = self.default
        if value is None or (isinstance(value, Mapping) and not value):
            return None
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, tuple):
            return ",".join(value) or "none"
        return str(value)

    @property
    def help(self) -> str:
        """The docstring, then '(default: X)' or '(required)'."""
        shown = self.shown_default
        if shown is None:
            return self.doc
        return f"{self.doc} ({shown if self.required else 'default: ' + shown})"


@functools.cache
def options(cls: type) -> tuple[Option, ...]:
    """Every field of a config class (EmbedConfig, MineConfig, RerankConfig, SearchConfig) as an Option, in
    field order."""
    docs = _field_docs(cls)
    positional = getattr(cls, "positional", ())
    hints = typing.get_type_hints(cls)
    groups = {name: group for group, names in FIELD_GROUPS[cls].items() for name in names}
    found = []
    for f in fields(cls):
        if f.name not in docs or f.name not in groups:
            raise TypeError(f"{cls.__name__}.{f.name} needs a docstring and an entry in FIELD_GROUPS")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        found.append(Option(f.name, groups[f.name], _kind(hints[f.name]), default, docs[f.name], f.name in positional))
    return tuple(found)


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string right under it in the class body), on one line."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        node.target.id: " ".join(after.value.value.split())
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
    }


def _kind(hint: Any) -> str:
    """`int | None` -> 'integer', `tuple[str, ...]` -> 'list', `Mapping[str, Any]` -> 'mapping', ..."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    origin = typing.get_origin(hint) or hint
    kinds = {str: "string", int: "integer", float: "number", bool: "boolean", tuple: "list", Mapping: "mapping"}
    return kinds[origin]
