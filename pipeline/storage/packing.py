"""Groups of shards: what each read task reads and which output files it makes, planned from the listing.

A shard is the unit of input, a *group* the unit of reading and naming. Small shards are packed:
consecutive shards (in key order) go into one group while their bytes add up to at most
`group_bytes(rows_per_file)`; a shard bigger than that is a group of its own. The plan uses names
and byte sizes only: no shard is read to make it.

A group's rows, shard after shard, become output files of at most `rows_per_file` rows: a group of
one shard is cut every `rows_per_file` rows (a large shard is split as ever); a packed group is cut
between two shards, so that a file holds several whole small shards (or, for a small shard of very
many rows, a part of it). The cuts depend on the rows alone, so every run of the same input cuts
them in the same places. Names: a group of one shard keeps the shard's own names (`a.txt.parquet`,
`a.txt-00001.parquet`), a packed group is named after its first shard and how many follow it
(`a.txt+2499.parquet`, `a.txt+2499-00001.parquet`).

The plan is written to the output (`_plan.json`) before the first commit, and every resume uses it,
so a rerun after a crash reads the same groups and skips the files already committed. The input
may change between runs: shards the plan does not know become new groups, and old groups are not
touched. A group whose files are all committed stays as it is (a warning names its shards that are
gone or changed: the files keep their old rows); a group not yet complete whose shard is gone or
has changed size cannot be completed as planned, and the run is refused. An output written before
plans existed has one group per shard, as it was made.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pipeline.errors import InputError, UsageError
from pipeline.storage.discovery import Shard, output_stem
from pipeline.storage.filesystems import write_bytes_atomic

log = logging.getLogger(__name__)

PLAN_FILE = "_plan.json"
PLAN_FORMAT = "embedpipe/plan"
PLAN_VERSION = 1
ROW_BYTES = 256  # a short document in a text file, for packing shards into groups of about rows_per_file rows
MAX_GROUP_BYTES = 64 << 20  # a group is read by one task; past this, reading it would hold a tokenizer back


def group_bytes(rows_per_file: int) -> int:
    """The byte budget of a packed group: about `rows_per_file` short documents."""
    return max(1, min(rows_per_file * ROW_BYTES, MAX_GROUP_BYTES))


@dataclass(frozen=True)
class Group:
    """Shards read one after the other by one read task, their rows cut into output files."""

    shards: tuple[Shard, ...]

    @property
    def key(self) -> str:
        return self.shards[0].key

    @property
    def last_key(self) -> str:
        return self.shards[-1].key

    @property
    def packed(self) -> bool:
        return len(self.shards) > 1

    @property
    def size(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def stem(self) -> str:
        stem = output_stem(self.key)
        return f"{stem}+{len(self.shards) - 1}" if self.packed else stem

    def file_name(self, index: int, multi: bool) -> str:
        return f"{self.stem}-{index:05d}.parquet" if multi else f"{self.stem}.parquet"


def as_group(item: Group | Shard) -> Group:
    """A shard stands for the group of itself alone."""
    return item if isinstance(item, Group) else Group((item,))


def pack_shards(shards: Iterable[Shard], rows_per_file: int) -> list[Group]:
    """Consecutive shards whose bytes add up to at most `group_bytes(rows_per_file)`, as groups."""
    budget = group_bytes(rows_per_file)
    groups: list[Group] = []
    current: list[Shard] = []
    size = 0
    for shard in shards:
        if current and size + shard.size > budget:
            groups.append(Group(tuple(current)))
            current, size = [], 0
        current.append(shard)
        size += shard.size
    if current:
        groups.append(Group(tuple(current)))
    return groups


def group_done(group: Group | Shard, committed: Mapping[str, Any], rows_per_file: int) -> bool:
    """Whether every file of `group` is committed, judged from the output alone, without reading it.

    `committed`: {file name: its statistics or None}. A group of one file is done when that file is
    there; one of several when files 0..K are all there and file K's statistics say it is the
    group's last (`last`). Files of older versions have no `last`: there only a shard's last file
    can be short, so a short file K ends it; a full one cannot tell, and the group is read again,
    its committed files skipped as it goes.
    """
    group = as_group(group)
    if group.file_name(0, multi=False) in committed:
        return True
    k = 0
    while group.file_name(k, multi=True) in committed:
        k += 1
    if k == 0:
        return False
    stats = committed[group.file_name(k - 1, multi=True)]
    if not isinstance(stats, dict):
        return False
    if stats.get("last") is not None:
        return bool(stats["last"])
    rows = stats.get("rows")
    return not group.packed and isinstance(rows, int) and rows < rows_per_file


def planned_groups(fs, root: str | None, shards: list[Shard], rows_per_file: int, committed: Mapping[str, Any],
                   pack: bool = True) -> tuple[list[Group], bool]:
    """(this run's groups, whether the plan in `root` must be written). `committed`: {file: stats} of the
    files in the output; once there is one, the output's plan (or, without one, one group per shard)
    is kept. `pack`: small shards are packed together (else every shard is its own group)."""
    new = pack_shards if pack else _alone
    stored = read_plan(fs, root) if root is not None and committed else None
    if stored is None:
        # committed by a version without plans: every shard was its own group
        groups = _alone(shards, rows_per_file) if committed else new(shards, rows_per_file)
        return check_names(groups, set(committed)), True
    groups, unknown = _reconciled(stored, shards, committed, rows_per_file)
    added = new(unknown, rows_per_file)
    return check_names(groups + added, set(committed)), bool(added)


def check_names(groups: list[Group], committed: frozenset[str] | set[str] = frozenset()) -> list[Group]:
    """`groups`, if no two of them name their output files alike; else InputError naming both inputs.

    Output names are flat (`a/b.txt` -> `a__b.txt.parquet`), so `a/b.txt` and `a__b.txt` would write
    (and resume) the same files, and a group named `x` owns `x-00001.parquet` too, unless the output
    already holds its only file `x.parquet`. `committed`: the output's files, which a rename of the
    input cannot change (then only --overwrite helps)."""
    by_stem: dict[str, Group] = {}
    for group in groups:
        other = by_stem.setdefault(group.stem, group)
        if other is not group:
            raise InputError(_clash_line(other, group, f"{group.stem}.parquet", committed))
    for group in groups:
        base, dash, index = group.stem.rpartition("-")
        if (dash and len(index) >= 5 and index.isdigit() and base in by_stem
                and f"{base}.parquet" not in committed):  # `base` wrote one file: it owns no -NNNNN name
            raise InputError(_clash_line(by_stem[base], group, f"{group.stem}.parquet", committed))
    return groups


def _clash_line(a: Group, b: Group, name: str, committed) -> str:
    written = any(_of_group(g, n) for g in (a, b) for n in committed)
    fix = ("this output already holds files of one of them: use --overwrite to embed everything again"
           if written else "rename one of them")
    return (f"inputs {a.key} and {b.key} would both write the output file {name} (an output file is "
            f"named after its input's path, with / as __): {fix}")


def _alone(shards: Iterable[Shard], rows_per_file: int) -> list[Group]:
    return [Group((s,)) for s in shards]


def _reconciled(stored: dict, shards: list[Shard], committed: Mapping[str, Any],
                rows_per_file: int) -> tuple[list[Group], list[Shard]]:
    """The stored plan's groups with this listing's shards, and the shards to plan anew.

    A shard has changed when its size or its version (S3's ETag, a local mtime) differs from the plan's.
    A group whose files are all committed is kept as it is, even if some of its shards are gone or
    have changed since (warned: its files hold their old rows). A group with no file committed yet
    binds nothing: its shards still there are planned again with the new ones. A group partly
    committed must find every one of its shards unchanged: otherwise the files left could not be cut
    as before (one changed shard moves every later cut), and the run is refused."""
    by_key = {s.key: s for s in shards}
    groups, stale = [], []
    for entry in stored["groups"]:
        members = [(key, size, version, by_key.pop(key, None)) for key, size, *version in entry]
        changed = [(key, size, s) for key, size, version, s in members if _changed(size, version, s)]
        # a shard gone or changed stays in the plan as planned (its files hold it as it was)
        group = Group(tuple(_placeholder(key, size, version) if _changed(size, version, s) else s
                            for key, size, version, s in members))
        if changed and not group_done(group, committed, rows_per_file):
            if any(_of_group(group, name) for name in committed):
                raise InputError(_changed_line(group, *changed[0]))
            by_key.update((s.key, s) for *_, s in members if s is not None)  # nothing of it committed
            continue
        stale += changed
        groups.append(group)
    if stale:
        key, size, now = stale[0]
        log.warning("%d input shard(s) have changed or are gone since their files were committed, e.g. %s (%s); "
                    "those files keep the old rows (--overwrite embeds everything again)",
                    len(stale), key, "gone" if now is None else f"{size:,} -> {now.size:,} bytes" if now.size != size
                    else "a new version")
    return groups, sorted(by_key.values(), key=lambda s: s.key)


def _changed(size: int, version: list, shard: Shard | None) -> bool:
    """Whether a planned shard (its size, and its version where the plan has one) is gone or differs."""
    if shard is None or shard.size != size:
        return True
    return bool(version and version[0] and shard.version and shard.version != version[0])


def _of_group(group: Group, name: str) -> bool:
    """Whether output file `name` is one of `group`'s (`STEM.parquet` or `STEM-NNNNN.parquet`)."""
    stem = group.stem
    return name == f"{stem}.parquet" or (name.startswith(f"{stem}-") and name[len(stem) + 1:-8].isdigit()
                                         and name.endswith(".parquet"))


def _placeholder(key: str, size: int, version: list) -> Shard:
    """A planned shard that is gone or has changed, as the plan holds it: named in its group, never read."""
    return Shard(path=key, key=key, format="", size=size, version=version[0] if version else "")


def _changed_line(group: Group, key: str, size: int, now: Shard | None) -> str:
    what = "is gone" if now is None else (f"has changed size ({size:,} -> {now.size:,} bytes)" if now.size != size
                                           else "has changed (its listing's ETag or modification time)")
    return (f"{key} {what} since this output planned its files, and its group's files ({group.stem}…, "
            f"{len(group.shards)} shard(s)) are only partly committed: they cannot be completed from the new "
            f"input; restore it, or use --overwrite to embed everything again")


def read_plan(fs, root: str) -> dict | None:
    """The output's stored plan, or None if it has none."""
    path = posixpath.join(root, PLAN_FILE)
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise UsageError(f"{path}: not a valid plan ({exc}); use --overwrite to start the output again") from None
    if data.get("format") != PLAN_FORMAT or not isinstance(data.get("groups"), list):
        raise UsageError(f"{path}: not an embedpipe plan; use --overwrite to start the output again")
    return data


def write_plan(fs, root: str, groups: list[Group], rows_per_file: int) -> None:
    """`_plan.json`: every group's shards (key, bytes, version), in order. Written before the first commit."""
    data = {
        "format": PLAN_FORMAT, "version": PLAN_VERSION, "rows_per_file": rows_per_file,
        "group_bytes": group_bytes(rows_per_file),
        "groups": [[[s.key, s.size, s.version] for s in g.shards] for g in groups],
    }
    write_bytes_atomic(fs, posixpath.join(root, PLAN_FILE), json.dumps(data, separators=(",", ":")).encode())


def describe(groups: list[Group]) -> dict[str, int]:
    """The manifest's and the dry run's account of the input: shards, bytes, groups, packed groups."""
    return {
        "files": sum(len(g.shards) for g in groups),
        "bytes": sum(g.size for g in groups),
        "groups": len(groups),
        "packed_groups": sum(1 for g in groups if g.packed),
    }
