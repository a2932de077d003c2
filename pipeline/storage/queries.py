"""The queries of `embedpipe search --queries FILE`: a .txt file, one query a line (its query id the
0-based line number; blank lines are skipped, so ids stay line numbers), or a .jsonl file, one
JSON object a line with `id` (a string or a number, written as a string) and `text`.

Local or s3://, read whole (queries are few next to the documents searched); strict UTF-8. Every
problem is an InputError naming the file and, where it has one, the line.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Mapping

from pipeline.errors import InputError
from pipeline.storage.filesystems import first_line, get_fs

QUERY_FORMATS = (".txt", ".jsonl")


def read_queries(path: str, storage_options: Mapping[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """(query ids, query texts) of a query file, in file order."""
    where = f"--queries {path}"
    suffix = posixpath.splitext(path.rstrip("/"))[1].lower()
    if suffix not in QUERY_FORMATS:
        raise InputError(f"{where}: expected a .txt file (one query a line) or a .jsonl file (`id` and `text` a line)")
    try:
        fs, root = get_fs(path, storage_options)
        if not fs.isfile(root):
            raise InputError(f"{where}: no such file")
        raw = fs.cat_file(root)
    except InputError:
        raise
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}: cannot be read ({first_line(exc)})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"{where}:{line}: not valid UTF-8") from None
    lines = text.lstrip("\ufeff").splitlines()
    ids, texts = _jsonl(lines, where) if suffix == ".jsonl" else _txt(lines)
    if not texts:
        raise InputError(f"{where}: holds no queries")
    seen: dict[str, int] = {}
    for k, query_id in enumerate(ids):
        if query_id in seen:
            raise InputError(f"{where}: query id {query_id!r} is given twice (queries {seen[query_id] + 1} and {k + 1}); "
                             "each query needs its own id")
        seen[query_id] = k
    return ids, texts


def _txt(lines: list[str]) -> tuple[list[str], list[str]]:
    kept = [(str(n), line.strip()) for n, line in enumerate(lines) if line.strip()]
    return [i for i, _ in kept], [t for _, t in kept]


def _jsonl(lines: list[str], where: str) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{where}:{n}: not a JSON object ({first_line(exc)})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}:{n}: not a JSON object")
        for key in ("id", "text"):
            if key not in row:
                raise InputError(f"{where}:{n}: has no {key!r} (each line needs `id` and `text`)")
        query_id, query = row["id"], row["text"]
        if isinstance(query_id, bool) or not isinstance(query_id, (str, int)) or str(query_id) == "":
            raise InputError(f"{where}:{n}: 'id' must be a non-empty string or an integer, got {query_id!r}")
        if not isinstance(query, str) or not query.strip():
            raise InputError(f"{where}:{n}: 'text' must be a non-empty string")
        ids.append(str(query_id))
        texts.append(query)
    return ids, texts
