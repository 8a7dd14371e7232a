"""The stage kit's one committed-shard writer, and the result record every shard returns.

Every sharded stage (ingest, captioning, feature extraction) writes its output through `ShardWriter`:

    writer = ShardWriter.open(out_url, keys, SCHEMA, result, lineage(...), config=cfg)
    if writer.done: return writer.done        # committed for the same lineage: skipped, no lease taken
    writer.todo                               # keys that still need a row (parts of earlier attempts resumed)
    writer.add(rows)                          # parquet rows, committed as small parts
    writer.add_sample(key, members, row)      # or: tar members plus their index row (feature shards)
    writer.finalize(marker_extra)             # merge, exactly-once check, commit, done marker with lineage last
    writer.abort()                            # or give up: committed parts stay for the next attempt

Open: a shard committed for the same lineage (`storage.lineage`) is skipped; one committed for another lineage is
stale and redone, and `result.stats["redone"]` says why. Then the shard's lease is taken (ShardBusyError when
another live run holds it) and the parts of earlier attempts are read back, unless they were written for another
lineage. A crash therefore loses at most one part (`part_rows` rows).

Exactly-once: two attempts that ran at once (a scheduler that started a second copy, or a lease that expired under
a stalled run) write parts under different attempt ids; the merge keeps the first row per key in part order, so
the committed shard holds exactly one row per key, and a feature tar exactly one sample per ok row.

Tar members: `add_sample` writes into a part tar, committed before its part index. `finalize` copies each kept
sample's byte range into the shard's tar in key order and rewrites the offsets, so the tar and its index agree.
Before it publishes the tar, the index and the marker, it checks that the lease is still its own: a run that stalled
past the ttl and lost the shard to another stops there (ShardBusyError, nothing more published), so two attempts
cannot interleave their tar and index. What remains is the moment between that check and each rename.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from storage.commit import commit_shard, read_done, write_done
from storage.errors import PipelineError
from storage.layout import parts_dir, shard_of
from storage.lease import DEFAULT_TTL, Lease
from storage.lineage import content_id, stale_reason
from storage.parquet import Row, read_rows, write_table
from storage.parts import PartStore, check_exactly_once, first_row_per_key
from storage.urls import filesystem
from storage.wds import ShardTarWriter

TAR_END = bytes(1024)  # two zero blocks end a tar archive


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
    content_id: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_marker(cls, record: dict[str, Any], **fixed: Any) -> ShardResult:
        fields = {k: record[k] for k in cls.__dataclass_fields__ if k in record}
        return cls(**{**fields, **fixed})


class OpenShard:
    """What every stage's shard object shares (`captioning.shard.CaptionShard`, `pixart.features.extract.TextShard`
    and `LatentShard`): its writer, result and stored result (`done`), and the protocol the executors drive (the
    local loops and `flows/_ray_stage.py`): `name`, `complete`, `finalize`, `abort`."""

    writer: ShardWriter
    result: ShardResult

    @property
    def done(self) -> ShardResult | None:
        """The stored result when the output is committed for this lineage (then nothing else is set up)."""
        return self.writer.done

    @property
    def name(self) -> str:
        return self.result.shard

    @property
    def complete(self) -> bool:
        """Every input key has its row (sample or error)."""
        return self.writer.complete

    def finalize(self) -> ShardResult:
        return self.writer.finalize()

    def abort(self) -> None:
        """Give up: nothing is published, committed parts stay for the next attempt, the lease is released."""
        self.writer.abort()


def current(output_url: str, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The marker of `output_url` when it is committed for the `wanted` lineage, else None (missing or stale)."""
    record = read_done(output_url)
    return record if record is not None and stale_reason(record, wanted) is None else None


def committed_result(output_url: str, wanted: dict[str, Any], redo_errors: bool = False) -> ShardResult | None:
    """The stored result, marked skipped, of a shard that `ShardWriter.open` would skip (committed for `wanted`;
    with redo_errors, without error rows); None when it must be (re)made. For a caller that decides before it opens
    the shard (captioning reads the next shard ahead only when it will run)."""
    record = current(output_url, wanted)
    if record is None or (redo_errors and record.get("num_error")):
        return None
    result = ShardResult.from_marker(record, output_url=output_url)
    result.skipped = True
    return result


def why_pending(output_url: str, wanted: dict[str, Any], redo_errors: bool = False) -> str | None:
    """Why `output_url` must be (re)made for the `wanted` lineage: "missing", "stale: <reason>", or (with
    redo_errors) "redo: N error rows"; None if current."""
    record = read_done(output_url)
    if record is None:
        return "missing"
    reason = stale_reason(record, wanted)
    if reason is not None:
        return f"stale: {reason}"
    if redo_errors and record.get("num_error"):
        return f"redo: {record['num_error']} error rows"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------------------------------


class ShardWriter:
    """Open → add → finalize (or abort) for one output shard; see the module docstring.

    `keys`: every key the shard must end with one row for (None when the input is a stream whose keys are only
    known as it is read, as in ingest: then keys need only be unique). `tar_url`: the feature tar for
    `add_sample`. `config`: the resolved config dict saved in the marker.
    """

    def __init__(self, output_url: str, keys: list[str] | None, schema: pa.Schema, result: ShardResult,
                 lineage: dict[str, Any], *, config: dict[str, Any] | None = None, tar_url: str | None = None,
                 part_rows: int = 256) -> None:
        self.output_url, self.keys, self.schema, self.result = output_url, keys, schema, result
        self.lineage, self.config, self.tar_url, self.part_rows = lineage, config or {}, tar_url, part_rows
        self.done: ShardResult | None = None
        self.lease: Lease | None = None
        self.todo: list[str] = []
        self.have: set[str] = set()
        self.buffer: list[Row] = []
        self.tar: ShardTarWriter | None = None
        self.stem = ""

    @classmethod
    def open(cls, output_url: str, keys: list[str] | Callable[[], list[str]] | None, schema: pa.Schema,
             result: ShardResult,
             lineage: dict[str, Any], *, config: dict[str, Any] | None = None, tar_url: str | None = None,
             force: bool = False, redo_errors: bool = False, part_rows: int = 256,
             lease_ttl: float = DEFAULT_TTL) -> ShardWriter:
        """Skip (`.done` set, no lease), or lease the shard and resume its parts. Raises ShardBusyError. `keys` may
        be a callable, called under the lease only when the shard is not skipped (it may read the input).
        `redo_errors`: a current shard with error rows is reopened with its ok rows kept, so only those keys run."""
        writer = cls(output_url, None, schema, result, lineage, config=config, tar_url=tar_url, part_rows=part_rows)
        if not force and writer._skip(redo_errors):
            return writer
        writer.lease = Lease(output_url, lease_ttl)
        writer.lease.acquire()
        try:
            if not force and writer._skip(redo_errors):  # finished by another run meanwhile
                writer.lease.release()
                return writer
            writer.parts = PartStore(parts_dir(output_url), schema)
            if force or writer.parts.lineage() not in (None, lineage):
                writer.parts.clear()  # made for other inputs or another config: nothing to resume
            if writer.parts.lineage() is None:
                writer.parts.set_lineage(lineage)
            if writer.done is not None:  # redo_errors: the committed ok rows become a part, the rest is to do
                writer._adopt_committed()
                writer.done = None
            writer.have = {r["key"] for r in writer.parts.read()}
            writer.keys = keys() if callable(keys) else keys
        except BaseException:
            writer.lease.release()
            raise
        keys = writer.keys
        result.resumed_rows = len(writer.have if keys is None else writer.have & set(keys))
        writer.todo = [k for k in keys if k not in writer.have] if keys is not None else []
        writer.remaining = set(writer.todo)
        writer.start = time.perf_counter()
        return writer

    def _skip(self, redo_errors: bool) -> bool:
        """Committed for this lineage, and (with redo_errors) without error rows."""
        done = self._current()
        if done is not None and redo_errors and done.num_error:
            self.result.stats["redone"] = f"redo: {done.num_error} error rows"
            return False
        return done is not None

    def _adopt_committed(self) -> None:
        """The committed output's ok rows (and their tar bytes) as one part, so that they are kept as they are."""
        rows = [r for r in read_rows(self.output_url) if r["status"] == "ok"]
        if not rows:
            return
        stem = self.parts.next_name()
        if self.tar_url is not None:
            fs, path = filesystem(self.tar_url)
            with commit_shard(stem + ".tar") as tmp:
                fs.copy(path, filesystem(tmp)[1])  # the same filesystem: the output root's
        self.parts.write(rows, stem)

    def _current(self) -> ShardResult | None:
        """The stored result when the output is committed for this lineage (else None; a stale reason is noted)."""
        record = read_done(self.output_url)
        if record is None:
            return None
        reason = stale_reason(record, self.lineage)
        if reason is not None:
            self.result.stats["redone"] = reason
            return None
        self.done = ShardResult.from_marker(record, output_url=self.output_url, stage=self.result.stage,
                                            dataset=self.result.dataset, shard=self.result.shard,
                                            input_url=self.result.input_url)
        self.done.skipped = True
        return self.done

    @property
    def name(self) -> str:
        return shard_of(self.output_url)

    @property
    def complete(self) -> bool:
        """Every expected key has a row (always False for a stream without known keys)."""
        return self.keys is not None and not self.remaining

    # -- adding ----------------------------------------------------------------------------------------------------

    def add(self, rows: list[Row]) -> None:
        """Rows (ok or error); committed as a part every `part_rows` rows and when the last key arrives."""
        for r in rows:
            self.remaining.discard(r["key"])
        self.buffer += rows
        if len(self.buffer) >= self.part_rows or self.complete:
            self.flush()

    def add_sample(self, key: str, members: dict[str, bytes], row: Row, array: str | None = None) -> None:
        """One sample's tar members (`{ext: bytes}`) and its index row; `array` names the member whose header
        offset the row keeps (`array_offset`) for direct reads."""
        if self.tar is None:
            self.stem = self.parts.next_name()
            self.tar = ShardTarWriter(self.stem + ".tar").__enter__()
        offset, length = self.tar.write({"__key__": key, **members})
        self.add([{**row, "key": key, "offset": offset, "bytes": length,
                   "array_offset": self.tar.members.get(array) if array else None}])

    def flush(self) -> None:
        """Commit the buffered rows as one part (its tar first, when it has one)."""
        if self.tar is not None:
            self.tar.__exit__(None, None, None)
            self.tar = None
        self.parts.write(self.buffer, self.stem or None)
        self.buffer, self.stem = [], ""

    # -- finishing -------------------------------------------------------------------------------------------------

    def finalize(self, marker_extra: dict[str, Any] | None = None, count=None) -> ShardResult:
        """Merge the parts (in key order when keys are known), check exactly-once, commit, write the marker last,
        drop the parts. `count(rows, result)` fills stage statistics from the merged rows first."""
        try:
            self.flush()
            rows = first_row_per_key(self.parts.read())
            check_exactly_once(self.keys, rows)
            if self.keys is not None:
                order = {k: i for i, k in enumerate(self.keys)}
                rows.sort(key=lambda r: order[r["key"]])
            result = self.result
            result.num_ok = sum(r["status"] == "ok" for r in rows)
            result.num_error = len(rows) - result.num_ok
            tar_url = self._merge_tar(rows) if self.tar_url is not None else None
            rows = [{k: v for k, v in r.items() if k != "_part"} for r in rows]
            if count is not None:
                count(rows, result)
            result.seconds = round(result.seconds + time.perf_counter() - self.start, 3)
            self._fence()
            with commit_shard(self.output_url) as tmp:
                write_table(rows, tmp, self.schema)
            if not result.bytes:  # bytes written, unless the stage counts its own (ingest: image bytes read)
                fs, path = filesystem(self.output_url)
                result.bytes = int(fs.size(path))
            result.config_hash = self.lineage.get("config", "")
            result.content_id = content_id(self.output_url, self.lineage)
            extra = {**(marker_extra or {}), **({"tar_url": tar_url} if self.tar_url is not None else {})}
            self._fence()
            write_done(self.output_url, {**extra, **result.to_dict(), "config": self.config,
                                         "lineage": self.lineage})
            self.parts.clear()
            return result
        finally:
            self._release()

    def _merge_tar(self, rows: list[Row]) -> str | None:
        """Copy each ok row's sample range from its part tar into the shard's tar; rewrite the row's offsets."""
        ok = [r for r in rows if r["status"] == "ok"]
        if not ok:
            return None
        total = 0
        self._fence()
        with commit_shard(self.tar_url) as tmp:
            tfs, tpath = filesystem(tmp)
            with tfs.open(tpath, "wb") as out:
                for r in ok:
                    pfs, ppath = filesystem(r["_part"] + ".tar")
                    data = pfs.cat_file(ppath, start=r["offset"], end=r["offset"] + r["bytes"])
                    if len(data) != r["bytes"]:
                        raise PipelineError(f"{r['_part']}.tar: sample {r['key']!r} is truncated")
                    if r.get("array_offset") is not None:
                        r["array_offset"] = total + r["array_offset"] - r["offset"]
                    r["offset"] = total
                    out.write(data)
                    total += len(data)
                out.write(TAR_END)
        self.result.bytes = total
        return self.tar_url

    def abort(self) -> None:
        """Give up without finalizing (an error): committed parts stay for the next attempt."""
        if self.tar is not None:
            err = RuntimeError("aborted")
            self.tar.__exit__(RuntimeError, err, None)  # the unfinished part tar is discarded
            self.tar = None
        self._release()

    def _fence(self) -> None:
        """Before each publishing step: the lease must still be ours (ShardBusyError otherwise). A run that stalled
        past the lease's ttl and lost it stops here, so it cannot pair its tar with another attempt's index."""
        if self.lease is not None:
            self.lease.check_held()

    def _release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
