"""Committed progress of an unfinished shard: its parts, and the two checks every merge of them makes.

    <dir>/_parts/<shard>/lineage.json                       what the parts were made from (others are not resumed)
    <dir>/_parts/<shard>/part-<time>-<attempt>-<seq>.parquet    rows, each file written atomically
    <dir>/_parts/<shard>/part-<time>-<attempt>-<seq>.tar        tar members of those rows (feature shards)

Names never collide across attempts (unique attempt ids), so two attempts that run at once both keep their parts;
the merge (`first_row_per_key`, in part order) and `check_exactly_once` make the committed shard exact anyway.
`storage.shard.ShardWriter` is the only writer.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pyarrow as pa

from storage.commit import commit_shard, write_atomic
from storage.errors import PipelineError
from storage.parquet import Row, read_rows, write_table
from storage.urls import filesystem, join, to_url


class PartStore:
    """`part-<time>-<attempt>-<seq>.parquet` files (and a `.tar` beside each for tar members), each written
    atomically; names never collide across runs. `lineage.json` records what the parts were made from."""

    def __init__(self, url: str, schema: pa.Schema) -> None:
        self.url, self.schema = url, schema
        self.fs, self.path = filesystem(url)
        self.attempt = uuid.uuid4().hex[:8]
        self.seq = 0

    def files(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        return sorted(self.fs.glob(f"{self.path}/part-*.parquet"))

    def read(self) -> list[Row]:
        """Every part's rows in part order; each row carries `_part` (its part's URL without suffix)."""
        rows: list[Row] = []
        for p in self.files():
            try:
                part = read_rows(to_url(self.fs, p))
            except FileNotFoundError:  # another attempt finished the shard and cleared the parts meanwhile
                continue
            stem = to_url(self.fs, p).removesuffix(".parquet")
            rows += [{**r, "_part": stem} for r in part]
        return rows

    def lineage(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.path}/lineage.json"))
        except FileNotFoundError:
            return None

    def set_lineage(self, record: dict[str, Any]) -> None:
        write_atomic(join(self.url, "lineage.json"), json.dumps(record, sort_keys=True).encode())

    def next_name(self) -> str:
        name = join(self.url, f"part-{time.time_ns():020d}-{self.attempt}-{self.seq:05d}")
        self.seq += 1
        return name

    def write(self, rows: list[Row], stem: str | None = None) -> None:
        if not rows:
            return
        with commit_shard((stem or self.next_name()) + ".parquet") as tmp:
            write_table(rows, tmp, self.schema)

    def clear(self) -> None:
        """Remove this shard's parts, and `_parts/` itself once no other shard has any left. The parent goes by a
        non-recursive rmdir, which fails while another shard's writer has its folder there: a recursive delete
        after an "is it empty" check once removed a folder another shard had just created."""
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
        try:
            self.fs.rmdir(self.fs._parent(self.path))
        except (FileNotFoundError, OSError, NotImplementedError):  # not empty, already gone, or no folders (s3)
            pass


def first_row_per_key(rows: list[Row]) -> list[Row]:
    seen: set[str] = set()
    out = []
    for r in rows:
        if r["key"] not in seen:
            seen.add(r["key"])
            out.append(r)
    return out


def check_exactly_once(keys: list[str] | None, rows: list[Row]) -> None:
    """Every key has exactly one row, and no row has a key outside `keys` (None: keys only need to be unique)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["key"]] = counts.get(r["key"], 0) + 1
    dup = sorted(k for k, n in counts.items() if n > 1)
    missing = sorted(set(keys) - counts.keys()) if keys is not None else []
    extra = sorted(counts.keys() - set(keys)) if keys is not None else []
    if dup or missing or extra:
        raise PipelineError(f"exactly-once check failed: {len(dup)} duplicated, {len(missing)} missing, "
                            f"{len(extra)} unknown keys (e.g. {(dup + missing + extra)[:3]})")


