"""Run configuration of every command: one frozen object per command, built from defaults <- YAML <- flags.

`EmbedConfig` (`embedpipe embed`), `MineConfig` (`mine`), `RerankConfig` (`rerank`) and
`SearchConfig` (`search`) are validated once, in `__post_init__`, by the shared validators, and each
error names the flag (or YAML key) to fix. One loader (`load_config`) reads them all. A field's docstring is its
CLI help and its entry in docs/reference.md: `options(cls)` describes every field (flag, group,
type, default, help) for the CLI (`pipeline.cli`) and the reference (`pipeline.reference`).

The modules, each with one job (import from here, `pipeline.config`):

- `runs`: the embed, mine and rerank configs, their constants and `CONFIGS`;
- `search`: `SearchConfig`;
- `validators`: the checks the configs share, and `_Recorded` (a config as the manifest records it);
- `flags`: the fields as the CLI's options (`Option`, `options`, `GROUPS`, `FIELD_GROUPS`);
- `loading`: the YAML-plus-flags loader (`load_yaml`, `load_config`, `build_*`).
"""

from pipeline.config.flags import FIELD_GROUPS, GROUPS, Option, options
from pipeline.config.loading import (
    build_config, build_mine_config, build_rerank_config, build_search_config, load_config, load_yaml,
)
from pipeline.config.runs import (
    BACKENDS, CONFIGS, DEFAULT_CALIBRATION_ROWS, DEFAULT_MODEL, DEVICES, DTYPES, ENCODING_ERRORS, PRECISIONS, POOLING_MODES, RERANK_DTYPES,
    EmbedConfig, MineConfig, RerankConfig, pooling_modes,
)
from pipeline.config.search import SearchConfig

__all__ = [
    "BACKENDS", "CONFIGS", "DEFAULT_CALIBRATION_ROWS", "DEFAULT_MODEL", "DEVICES", "DTYPES", "ENCODING_ERRORS", "FIELD_GROUPS", "GROUPS",
    "PRECISIONS", "POOLING_MODES", "RERANK_DTYPES", "EmbedConfig", "MineConfig", "Option", "RerankConfig",
    "SearchConfig", "build_config", "build_mine_config", "build_rerank_config", "build_search_config", "load_config",
    "load_yaml", "options", "pooling_modes",
]
