"""What the configs share: the validators (each error is a `UsageError` naming the flag (or YAML key)
to fix) and `_Recorded`, how a config is written into a manifest."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from pipeline.errors import UsageError


class _Recorded:
    """What every config shares: how it is written into a manifest."""

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data (tuples as lists), without storage options (they may hold secrets)."""
        return {
            f.name: list(value) if isinstance(value, tuple) else value
            for f in fields(self) if f.name != "storage_options" for value in [getattr(self, f.name)]
        }


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _required(flag: str, value: str | None) -> None:
    if not value:
        raise UsageError(f"{flag} is required (as a flag or in --config)")


def _positive(flag: str, value: int | None, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{flag} must be a positive integer, got {value!r}")


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def _cosine(flag: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0):
        raise UsageError(f"{flag} must be a cosine between -1 and 1, got {value!r}")


def _seconds(flag: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UsageError(f"{flag} must be a number of seconds >= 0, got {value!r}")


def _dtype_on_device(dtype: str, device: str) -> None:
    if device == "cpu" and dtype == "float16":
        raise UsageError("--dtype float16 needs --device cuda; use float32 or bfloat16 on CPU")


def _check_rerank_options(model: str | None, top: int | None, **others: Any) -> None:
    """--rerank-top must be positive, and the rerank options mean nothing without --rerank-model."""
    _positive("--rerank-top", top)
    given = [name for name, value in {"rerank_top": top, **others}.items() if value is not None]
    if given and not model:
        raise UsageError(f"{_flag(given[0])} is only used with --rerank-model")


def _whole_files(document_per_file: bool, id_field: str | None, keep_columns, text_field: str) -> None:
    """--document-per-file: a document is a whole file, with no fields to take an id or columns from."""
    if document_per_file and (id_field or set(keep_columns) - {text_field}):
        flag = "--id-field" if id_field else "--keep-columns"
        raise UsageError(f"{flag}: with --document-per-file a document is a whole file, with no fields: its id "
                         "is its path (--keep-columns may name the text only)")
