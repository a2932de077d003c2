"""The one loader of every config: defaults <- YAML file <- flags."""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

import yaml

from pipeline.config.flags import options
from pipeline.config.runs import CONFIGS, EmbedConfig, MineConfig, RerankConfig
from pipeline.config.search import SearchConfig
from pipeline.errors import UsageError


def load_yaml(path: str, cls: type = EmbedConfig) -> dict[str, Any]:
    """Read a YAML config file for `cls`'s command; an unknown key is an error naming it.

    Keys are the fields of `cls`, '-' or '_' alike, either at the top level or under the
    command's section (`embed:`, `mine:`, `rerank:`, `search:`): one file may configure several commands.
    """
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option: value")
    values = data
    if any(isinstance(data.get(command), dict) for command in CONFIGS):  # a file of sections
        stray = next((key for key in data if key not in CONFIGS), None)
        if stray is not None:
            raise UsageError(f"--config {path}: unknown key {stray!r} beside the sections {', '.join(CONFIGS)}")
        values = data.get(cls.command) or {}
        if not isinstance(values, dict):
            raise UsageError(f"--config {path}: section {cls.command!r} must be a mapping of option: value")
    known = {f.name for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UsageError(f"--config {path}: unknown key {key!r}")
        out[name] = value
    return out


RENAMED_OPTIONS = {"output_dtype": "precision"}  # deprecated name -> its new name


def load_config(cls: type, config_file: str | None = None, **overrides: Any) -> Any:
    """A `cls` (EmbedConfig, MineConfig, RerankConfig, SearchConfig) from defaults <- YAML file <- `overrides`,
    the flags (None means 'not given'). Lists may be given as comma-separated text."""
    values: dict[str, Any] = load_yaml(config_file, cls) if config_file else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    for old, new in RENAMED_OPTIONS.items():  # a flag under its new name wins over the file's old name
        if new in given and old not in given:
            values.pop(old, None)
    values.update(given)
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise UsageError(f"unknown option(s): {', '.join(sorted(unknown))}")
    for option in options(cls):
        value = values.get(option.name)
        if value is None:
            if option.required:
                given_as = "an argument" if option.positional else "a flag"
                raise UsageError(f"{option.flag} is required (as {given_as} or in --config)")
        elif option.kind == "list":
            if isinstance(value, str):
                value = [c.strip() for c in value.split(",") if c.strip()]
            if not isinstance(value, (list, tuple)):
                raise UsageError(f"{option.flag} must be a list of names, got {value!r}")
            values[option.name] = tuple(value)
        elif option.kind == "string" and not isinstance(value, (str, bool, list, dict)):
            values[option.name] = str(value)  # YAML reads `output: 2024-01-01` as a date
    try:
        return cls(**values)
    except TypeError as exc:
        raise UsageError(str(exc)) from None


def build_config(config_file: str | None = None, **overrides: Any) -> EmbedConfig:
    """`embedpipe embed`'s config: defaults <- YAML file (top level or `embed:`) <- overrides (None: not given)."""
    return load_config(EmbedConfig, config_file, **overrides)


def build_mine_config(config_file: str | None = None, **overrides: Any) -> MineConfig:
    """`embedpipe mine`'s config: defaults <- YAML file (top level or `mine:`) <- overrides (None: not given)."""
    return load_config(MineConfig, config_file, **overrides)


def build_rerank_config(config_file: str | None = None, **overrides: Any) -> RerankConfig:
    """`embedpipe rerank`'s config: defaults <- YAML file (top level or `rerank:`) <- overrides (None: not given)."""
    return load_config(RerankConfig, config_file, **overrides)


def build_search_config(config_file: str | None = None, **overrides: Any) -> SearchConfig:
    """`embedpipe search`'s config: defaults <- YAML file (top level or `search:`) <- overrides (None: not given)."""
    return load_config(SearchConfig, config_file, **overrides)
