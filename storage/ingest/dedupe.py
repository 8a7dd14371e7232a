"""Keys that occur in more than one shard of a dataset (a tar copied under a second name, an overlapping re-dump).

    report = write_duplicates(root, "sam")          # after every shard of an ingest run is committed
    firsts = duplicates_of(root, "sam", "sa_000007")  # {key: first shard}: what later stages turn into error rows

Shards are ranked by name. A key's first ok occurrence is the sample; each later one is listed in the dataset's
duplicates table (`duplicates/<dataset>.parquet`: key, shard, first_shard), a committed output of its own with a
done marker. Manifests are never rewritten, so the identity that caption and feature lineage recorded for a
manifest stays true. Captioning and latent extraction read the table and write "duplicate of key <k> in shard
<first>" error rows for the listed keys; the table's rows for a shard are part of that shard's lineage
(`duplicates_identity`), so a later ingest that adds duplicates to a shard makes its captions and latents stale.

Only the key, shard and status columns are read, into arrow arrays, so 10M keys take a few hundred MB, not Python
objects.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from storage.commit import commit_shard, is_done, write_done
from storage.layout import duplicates_url, shard_of
from storage.manifest import STATUS_OK, committed_manifests, read_manifest
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


def write_duplicates(root: str, dataset: str) -> dict[str, Any]:
    """Commit the dataset's duplicates table from every committed manifest; see the module docstring."""
    manifests = committed_manifests(root, dataset)
    dups = find_duplicates(manifests)
    url = duplicates_url(root, dataset)
    with commit_shard(url) as tmp:
        write_table(dups, tmp, _SCHEMA)
    shards = sorted(set(dups["shard"].to_pylist()))
    write_done(url, {"stage": "dedupe", "dataset": dataset, "num_duplicates": dups.num_rows, "shards": shards,
                     "manifests": [shard_of(u) for u in manifests]})
    return {"duplicates": dups.num_rows, "shards": shards}


def _table(root: str, dataset: str) -> pa.Table:
    url = duplicates_url(root, dataset)
    return read_table(url) if is_done(url) else _SCHEMA.empty_table()


def duplicates_of(root: str, dataset: str, shard: str) -> dict[str, str]:
    """{key: first shard} for the keys of `shard` that an earlier-ranked shard already holds."""
    t = _table(root, dataset)
    t = t.filter(pc.equal(t["shard"], shard))
    return dict(zip(t["key"].to_pylist(), t["first_shard"].to_pylist(), strict=True))


def duplicate_error(key: str, first_shard: str) -> str:
    return f"{DUPLICATE_PREFIX} {key!r} in shard {first_shard}"


def duplicates_identity(firsts: dict[str, str]) -> str:
    """The lineage identity of one shard's duplicate keys (the same for every shard without any)."""
    return hashlib.sha256(json.dumps(sorted(firsts.items())).encode()).hexdigest()[:12]


def duplicate_report(root: str, dataset: str) -> dict[str, Any]:
    """For `pixart audit`: keys listed as duplicates, and keys ok in two shards that the table does not list (an
    ingest that has not finished, or a table older than the manifests)."""
    found = find_duplicates(committed_manifests(root, dataset))
    listed = _table(root, dataset)
    have = set(zip(listed["key"].to_pylist(), listed["shard"].to_pylist(), strict=True))
    unlisted = sum((k, s) not in have for k, s in zip(found["key"].to_pylist(), found["shard"].to_pylist(),
                                                       strict=True))
    return {"listed_duplicates": listed.num_rows, "unlisted_duplicates": unlisted}
