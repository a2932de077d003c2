"""The output directory across runs: leftovers of killed runs, and `--overwrite`.

A resumed run first clears what a killed run left half-done: `_tmp.*` files
(never visible to readers) and `_pieces/` (parts of files not yet joined).

`--overwrite` never removes the old output before the new one is complete.
The new files are written under `_overwrite/` (hidden from readers); once
every one is committed, a swap plan (`_overwrite/_swap.json`: the new
manifest, the new `_run.json` and the old files to drop) is written, then
carried out: old manifest removed, new `_run.json` written, stale files
removed, new files moved in, new manifest written. A run killed during the swap leaves the plan behind, and the next
run of any kind finishes the swap before doing anything else.
"""

from __future__ import annotations

import json
import logging
import posixpath

from pipeline.identity import RUN_FILE
from pipeline.manifest import write as write_manifest
from pipeline.storage.packing import PLAN_FILE
from pipeline.storage import lance_sink
from pipeline.storage.sink import MANIFEST, PIECES_DIR, read_file_stats
from pipeline.storage.filesystems import is_local, write_bytes_atomic

log = logging.getLogger(__name__)

STAGING_DIR = "_overwrite"
SWAP_PLAN = "_swap.json"
TMP_PREFIX = "_tmp."


def staging_uri(output: str) -> str:
    return output.rstrip("/") + "/" + STAGING_DIR


def clear_leftovers(fs, directory: str, storage_options=None) -> None:
    """Remove the half-done parts a killed run left in `directory` (and finish or drop its pending
    Lance units: pipeline.storage.lance_sink)."""
    lance_sink.clear_leftovers(fs, directory, storage_options)
    pieces = posixpath.join(directory, PIECES_DIR)
    if fs.exists(pieces):
        fs.rm(pieces, recursive=True)
    if is_local(fs) and fs.isdir(directory):
        for path in fs.ls(directory, detail=False):
            if posixpath.basename(path).startswith(TMP_PREFIX):
                fs.rm(path)


def clear_staging(fs, root: str) -> str:
    """Remove `_overwrite/` (unswapped files of an earlier --overwrite run); returns its path.

    An --overwrite run starts from an empty one; a resumed run needs none.
    """
    staging = posixpath.join(root, STAGING_DIR)
    if fs.exists(staging):
        log.warning("removing %s left by an --overwrite run that did not finish", staging)
        fs.rm(staging, recursive=True)
    return staging


def swap_in(fs, root: str, manifest: dict, committed: dict[str, str], run: dict | None = None) -> None:
    """Replace the old output in `root` by the complete new one staged in `_overwrite/`.

    `committed` are the final files now in `root`; those written by embedpipe
    and not part of the new output are removed. `run` is the new output's `_run.json`.
    """
    # a Lance output's units are named as Parquet files would be: none of the old files stays beside it
    new = {entry["file"] for entry in manifest["files"]} if manifest.get("table_format") != "lance" else set()
    stale = sorted(name for name, path in committed.items() if name not in new and read_file_stats(fs, path) is not None)
    has_plan = fs.exists(posixpath.join(root, STAGING_DIR, PLAN_FILE))
    plan = {"manifest": manifest, "stale": stale, "run": run, "input_plan": has_plan,
            "lance": lance_sink.swap_plan(fs, root, posixpath.join(root, STAGING_DIR))}
    write_bytes_atomic(fs, posixpath.join(root, STAGING_DIR, SWAP_PLAN), json.dumps(plan).encode())
    finish_swap(fs, root)


def finish_swap(fs, root: str) -> bool:
    """Carry out a swap plan left in `root/_overwrite/`, if any (idempotent). True if there was one."""
    staging = posixpath.join(root, STAGING_DIR)
    plan_path = posixpath.join(staging, SWAP_PLAN)
    if not fs.exists(plan_path):
        return False
    with fs.open(plan_path, "rb") as f:
        plan = json.loads(f.read())
    manifest_path = posixpath.join(root, MANIFEST)
    if fs.exists(manifest_path):  # it describes the old output, which is going away
        fs.rm(manifest_path)
    if plan.get("run"):  # the new settings, before the first new file is in place (plans of older versions have none)
        write_bytes_atomic(fs, posixpath.join(root, RUN_FILE), json.dumps(plan["run"], indent=2).encode())
    staged_plan = posixpath.join(staging, PLAN_FILE)
    if fs.exists(staged_plan):  # the new output's groups (pipeline.storage.packing)
        fs.mv(staged_plan, posixpath.join(root, PLAN_FILE))
    elif not plan.get("input_plan", True) and fs.exists(posixpath.join(root, PLAN_FILE)):
        fs.rm(posixpath.join(root, PLAN_FILE))  # the old output's, which binds nothing now
    for name in plan["stale"]:
        path = posixpath.join(root, name)
        if fs.exists(path):
            fs.rm(path)
    lance_sink.finish_swap(fs, root, staging, plan.get("lance"))
    for entry in plan["manifest"]["files"]:
        source = posixpath.join(staging, entry["file"])
        if fs.exists(source):
            fs.mv(source, posixpath.join(root, entry["file"]))
    write_manifest(fs, root, plan["manifest"])
    fs.rm(staging, recursive=True)
    return True


def committed_files(fs, root: str) -> dict[str, str]:
    """Final output files already in `root`: {name: path}, from a fresh listing (never s3fs's cache)."""
    try:
        entries = fs.ls(root, detail=False, refresh=True)
    except FileNotFoundError:
        return {}
    out = {}
    for path in entries:
        name = posixpath.basename(path.rstrip("/"))
        if name.endswith(".parquet") and not name.startswith(("_", ".")):
            out[name] = path
    return out
