"""The stage kit's shard: one result record, lineage, and the partitioned exactly-once shard.

Every stage is a function over one shard that returns a `ShardResult` and writes its done marker last. Stages
whose work on a shard is long (captioning, feature extraction) use `PartitionedShard`:

    shard = PartitionedShard(out_url, keys, SCHEMA, result)   # lease, then read the parts of earlier attempts
    shard.todo                                               # keys that still need a row
    shard.add(rows)                                          # committed as small parts with a unique attempt id
    shard.finalize(marker_extra)                             # merge (one row per key), check, commit, marker

A crash loses at most one part. Two attempts that ran at once (a scheduler that started a second copy, or a lease
that expired under a stalled run) write parts under different attempt ids; the merge keeps the first row per key
in part order, so the committed shard still holds exactly one row per key.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from storage.commit import commit_shard, is_done, read_done, write_done
from storage.errors import PipelineError
from storage.layout import parts_dir, shard_of
from storage.lease import DEFAULT_TTL, Lease
from storage.parquet import read_rows, write_table
from storage.urls import filesystem, join, to_url

Row = dict[str, Any]


@dataclass
class ShardResult:
    """What one shard produced; stored in its done marker and returned to the orchestrator. `stats` holds the
    stage's own counters (captions: degenerate rows, generated tokens, generate seconds)."""

    stage: str
    dataset: str
    shard: str
    input_url: str
    output_url: str
    num_ok: int = 0
    num_error: int = 0
    resumed_rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: bool = False
    config_hash: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_marker(cls, record: dict[str, Any], **fixed: Any) -> ShardResult:
        fields = {k: record[k] for k in cls.__dataclass_fields__ if k in record}
        return cls(**{**fields, **fixed})


def skipped(output_url: str, **fixed: Any) -> ShardResult | None:
    """The stored result of a committed shard, marked skipped; None when it is not committed."""
    record = read_done(output_url)
    if record is None:
        return None
    result = ShardResult.from_marker(record, output_url=output_url, **fixed)
    result.skipped = True
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Lineage: what an output was made from, so later stages can tell what is stale
# ---------------------------------------------------------------------------------------------------------------------


def marker_hash(url: str) -> str | None:
    """sha256 (12 hex) of a committed input's done marker: changes whenever the input is rewritten."""
    fs, path = filesystem(url + ".done")
    try:
        return hashlib.sha256(fs.cat_file(path)).hexdigest()[:12]
    except FileNotFoundError:
        return None


def source_identity(url: str) -> str:
    """Size plus mtime or etag of a source file: enough to notice it was replaced or grew."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except (FileNotFoundError, OSError):
        return "missing"
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{stamp}".strip('"')


def lineage(inputs: list[str], config_hash: str, models: dict[str, str] | None = None,
            committed_inputs: bool = True) -> dict[str, Any]:
    """The lineage record of a done marker: input URLs with their marker hashes (or file identity for raw
    sources), the config hash and the model ids."""
    ident = marker_hash if committed_inputs else source_identity
    return {"inputs": [{"url": u, "id": ident(u)} for u in inputs], "config_hash": config_hash,
            "models": dict(models or {})}


# ---------------------------------------------------------------------------------------------------------------------
# Parts: committed progress of an unfinished shard
# ---------------------------------------------------------------------------------------------------------------------


class PartStore:
    """`part-<time>-<attempt>-<seq>.parquet` files, each written atomically; names never collide across runs."""

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
        rows: list[Row] = []
        for p in self.files():
            try:
                rows += read_rows(to_url(self.fs, p))
            except FileNotFoundError:  # another attempt finished the shard and cleared the parts meanwhile
                continue
        return rows

    def write(self, rows: list[Row]) -> None:
        if not rows:
            return
        name = f"part-{time.time_ns():020d}-{self.attempt}-{self.seq:05d}.parquet"
        self.seq += 1
        with commit_shard(join(self.url, name)) as tmp:
            write_table(rows, tmp, self.schema)

    def clear(self) -> None:
        """Remove this shard's parts, and `_parts/` itself once no other shard has any left."""
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
        parent = self.fs._parent(self.path)
        try:
            if self.fs.exists(parent) and not self.fs.ls(parent):
                self.fs.rm(parent, recursive=True)
        except (FileNotFoundError, OSError):  # another shard's attempt wrote or removed it meanwhile
            pass


def first_row_per_key(rows: list[Row]) -> list[Row]:
    seen: set[str] = set()
    out = []
    for r in rows:
        if r["key"] not in seen:
            seen.add(r["key"])
            out.append(r)
    return out


def check_exactly_once(keys: list[str], rows: list[Row]) -> None:
    """Every key has exactly one row, and no row has a key outside `keys`."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["key"]] = counts.get(r["key"], 0) + 1
    dup = sorted(k for k, n in counts.items() if n > 1)
    missing = sorted(set(keys) - counts.keys())
    extra = sorted(counts.keys() - set(keys))
    if dup or missing or extra:
        raise PipelineError(f"exactly-once check failed: {len(dup)} duplicated, {len(missing)} missing, "
                            f"{len(extra)} unknown keys (e.g. {(dup + missing + extra)[:3]})")


class PartitionedShard:
    """Lease → parts → merge → check → commit → marker for one output shard; see the module docstring.

    Holds the shard's lease from construction to `finalize`/`close` (raises ShardBusyError when another run
    holds it). `part_rows` rows are buffered before a part is committed.
    """

    def __init__(self, output_url: str, keys: list[str], schema: pa.Schema, result: ShardResult, *,
                 force: bool = False, part_rows: int = 256, lease_ttl: float = DEFAULT_TTL) -> None:
        self.output_url, self.keys, self.schema, self.result = output_url, keys, schema, result
        self.part_rows = part_rows
        self.lease = Lease(output_url, lease_ttl)
        self.lease.acquire()
        try:
            self.parts = PartStore(parts_dir(output_url), schema)
            if force:
                self.parts.clear()
            have = {r["key"] for r in self.parts.read()}
        except BaseException:
            self.lease.release()
            raise
        self.result.resumed_rows = len(have & set(keys))
        self.todo = [k for k in keys if k not in have]
        self.remaining = set(self.todo)
        self.buffer: list[Row] = []
        self.start = time.perf_counter()

    @property
    def name(self) -> str:
        return shard_of(self.output_url)

    @property
    def complete(self) -> bool:
        return not self.remaining

    def add(self, rows: list[Row]) -> None:
        for r in rows:
            self.remaining.discard(r["key"])
        self.buffer += rows
        if len(self.buffer) >= self.part_rows or self.complete:
            self.flush()

    def flush(self) -> None:
        self.parts.write(self.buffer)
        self.buffer = []

    def finalize(self, marker_extra: dict[str, Any], count=None) -> ShardResult:
        """Merge the parts in key order, check exactly-once, commit, write the marker, drop the parts.

        `count(rows, result)` fills stage-specific statistics from the merged rows before the marker is written.
        """
        try:
            self.flush()
            rows = first_row_per_key(self.parts.read())
            check_exactly_once(self.keys, rows)
            order = {k: i for i, k in enumerate(self.keys)}
            rows.sort(key=lambda r: order[r["key"]])
            self.result.num_ok = sum(r["status"] == "ok" for r in rows)
            self.result.num_error = len(rows) - self.result.num_ok
            if count is not None:
                count(rows, self.result)
            self.result.seconds = round(self.result.seconds + time.perf_counter() - self.start, 3)
            with commit_shard(self.output_url) as tmp:
                write_table(rows, tmp, self.schema)
            write_done(self.output_url, {**marker_extra, **self.result.to_dict()})
            self.parts.clear()
            return self.result
        finally:
            self.lease.release()

    def close(self) -> None:
        """Give up without finalizing (an error): committed parts stay for the next attempt."""
        self.lease.release()

    def __enter__(self) -> PartitionedShard:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.close()


def committed_elsewhere(output_url: str) -> bool:
    """After a failure: did another attempt commit this shard meanwhile? Then the failure is moot."""
    return is_done(output_url)
