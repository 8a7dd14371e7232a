"""Keys that occur in more than one shard of a dataset (a tar copied under a second name, an overlapping re-dump).

    report = mark_duplicates(root, "sam")     # after every shard of a run is committed

Shards are ranked by name. A key's first ok occurrence stays ok; each later one becomes an error row
"duplicate of key <k> in shard <first>", rewritten atomically with a fresh done marker, and is listed in
`manifests/<dataset>/_duplicates.parquet`. Only the key, shard and status columns are read, into arrow arrays,
so 10M keys take a few hundred MB, not Python objects.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from storage.commit import commit_shard, read_done, write_done
from storage.layout import duplicates_url, shard_of
from storage.manifest import STATUS_ERROR, STATUS_OK, committed_manifests, read_manifest, write_manifest
from storage.parquet import read_table, write_table

DUPLICATE_PREFIX = "duplicate of key"
_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("first_shard", pa.string())])


def find_duplicates(manifests: list[str]) -> pa.Table:
    """(key, shard, first_shard) for every ok row whose key is ok in an earlier-ranked shard."""
    parts = []
    for rank, url in enumerate(manifests):
        t = read_manifest(url, ["key", "status"])
        t = t.filter(pc.equal(t["status"], STATUS_OK)).select(["key"])
        parts.append(t.append_column("rank", pa.array([rank] * t.num_rows, pa.int32())))
    if not parts:
        return _SCHEMA.empty_table()
    keys = pa.concat_tables(parts)
    first = keys.group_by("key").aggregate([("rank", "min"), ("rank", "count")])
    first = first.filter(pc.greater(first["rank_count"], 1))
    if first.num_rows == 0:
        return _SCHEMA.empty_table()
    joined = keys.join(first.select(["key", "rank_min"]), "key")
    joined = joined.filter(pc.not_equal(joined["rank"], joined["rank_min"]))
    names = [shard_of(u) for u in manifests]
    rows = [{"key": k, "shard": names[r], "first_shard": names[f]}
            for k, r, f in zip(joined["key"].to_pylist(), joined["rank"].to_pylist(), joined["rank_min"].to_pylist(),
                               strict=True)]
    rows.sort(key=lambda r: (r["shard"], r["key"]))
    return pa.Table.from_pylist(rows, schema=_SCHEMA)


def _rewrite(url: str, firsts: dict[str, str]) -> int:
    rows = read_manifest(url).to_pylist()
    changed = 0
    for row in rows:
        first = firsts.get(row["key"])
        if first is not None and row["status"] == STATUS_OK:
            row.update(status=STATUS_ERROR, error=f"{DUPLICATE_PREFIX} {row['key']!r} in shard {first}")
            changed += 1
    record = read_done(url) or {}
    with commit_shard(url) as tmp:
        write_manifest(rows, tmp)
    record.update(num_ok=sum(r["status"] == STATUS_OK for r in rows), num_duplicates=record.get("num_duplicates", 0)
                  + changed)
    record["num_error"] = len(rows) - record["num_ok"]
    write_done(url, record)
    return changed


def mark_duplicates(root: str, dataset: str) -> dict[str, Any]:
    """Turn later occurrences of keys into error rows naming the first shard; see the module docstring."""
    manifests = committed_manifests(root, dataset)
    dups = find_duplicates(manifests)
    by_shard: dict[str, dict[str, str]] = {}
    for row in dups.to_pylist():
        by_shard.setdefault(row["shard"], {})[row["key"]] = row["first_shard"]
    changed = sum(_rewrite(u, by_shard[shard_of(u)]) for u in manifests if shard_of(u) in by_shard)
    listed = _listed(root, dataset)
    if dups.num_rows or listed is not None:
        merged = dups if listed is None else pa.concat_tables([listed, dups])
        with commit_shard(duplicates_url(root, dataset)) as tmp:
            write_table(merged.group_by(["key", "shard", "first_shard"]).aggregate([]), tmp)
    return {"duplicates": changed, "shards": sorted(by_shard)}


def _listed(root: str, dataset: str) -> pa.Table | None:
    try:
        return read_table(duplicates_url(root, dataset))
    except (FileNotFoundError, OSError):
        return None


def duplicate_report(root: str, dataset: str) -> dict[str, Any]:
    """For `pixart audit`: keys still ok in two shards (unmarked), and rows already marked as duplicates."""
    manifests = committed_manifests(root, dataset)
    unmarked = find_duplicates(manifests).num_rows
    marked = 0
    for url in manifests:
        errors = read_manifest(url, ["error"])["error"]
        marked += pc.sum(pc.starts_with(pc.fill_null(errors, ""), DUPLICATE_PREFIX)).as_py() or 0
    return {"unmarked_duplicates": unmarked, "marked_duplicates": marked}
