"""Ingest one source shard into a parquet manifest: the per-shard function that the `ingest` stage maps.

    shards = list_shards(cfg)                    # from the dataset's source (storage/ingest/sources/), names checked
    ctx = prepare(cfg)                           # dataset-wide work once (JourneyDB: the annotation index)
    result = ingest_shard(shards[0], cfg, ctx)   # -> ShardResult; manifest + done marker committed
    mark_duplicates(cfg.output_root, cfg.dataset)   # after all shards: keys seen in two shards (storage.ingest.dedupe)

Every sample ends as exactly one row: `ok` with size, hash and metadata, or `error` with a reason. Only an
unreadable source (missing, access denied, network) raises, so the orchestrator can fail or retry the shard.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from storage.commit import commit_shard, is_done, write_done
from storage.configio import config_dict, config_hash
from storage.decode import probe_image
from storage.errors import ImageDecodeError
from storage.hashing import content_hash
from storage.ingest.config import IngestConfig
from storage.ingest.sources import SourceSample, SourceShard, get_source
from storage.layout import check_unique, manifest_url
from storage.lease import Lease
from storage.manifest import STATUS_ERROR, STATUS_OK, write_manifest
from storage.shard import ShardResult, lineage, skipped
from storage.urls import absolute_url

_FIELDS = ("label", "wnid", "prompt", "prompt_raw", "caption")


def list_shards(cfg: IngestConfig) -> list[SourceShard]:
    """The source shards of `cfg.dataset` with absolute URLs, in name order, limited to `max_shards`.

    Two sources that would share an output name are refused here, naming both."""
    shards = [SourceShard(name=s.name, url=absolute_url(s.url), kind=s.kind)
              for s in get_source(cfg.dataset).list_shards(cfg)]
    shards.sort(key=lambda s: s.name)
    check_unique([(s.name, s.url) for s in shards], "source shards")
    return shards[: cfg.max_shards] if cfg.max_shards else shards


def prepare(cfg: IngestConfig) -> dict[str, Any]:
    """Dataset-wide work done once before the shards; returns the context every shard gets."""
    return get_source(cfg.dataset).prepare(cfg)


# ---------------------------------------------------------------------------------------------------------------------
# One sample -> one row
# ---------------------------------------------------------------------------------------------------------------------


def sample_row(sample: SourceSample, shard: SourceShard, cfg: IngestConfig) -> dict[str, Any]:
    """The manifest row of one sample: probe the image, check declared sizes, record the error if any."""
    row: dict[str, Any] = {"key": sample.key, "dataset": cfg.dataset, "shard": shard.name, "source_url": shard.url,
                           "member": sample.member, "offset": sample.offset, "status": STATUS_OK, "error": None}
    row.update({k: sample.fields.get(k) for k in _FIELDS})
    error = sample.error
    if sample.data is not None:
        row["bytes"] = len(sample.data)
        row["hash"] = content_hash(sample.data, cfg.hash)
        if cfg.hash == "sha256":
            row["sha256"] = row["hash"].removeprefix("sha256:")
        if error is None:
            try:
                info = probe_image(sample.data, max_pixels=cfg.decode.max_pixels, verify=cfg.decode.verify,
                                   max_decoded_bytes=cfg.decode.max_decoded_bytes)
                row.update(width=info.width, height=info.height, format=info.format)
                declared = (sample.fields.get("json_width"), sample.fields.get("json_height"))
                if declared[0] is not None and declared not in ((info.width, info.height), (info.height, info.width)):
                    error = f"JSON says {declared[0]}x{declared[1]}, image is {info.width}x{info.height}"
            except ImageDecodeError as e:
                error = str(e)
    elif error is None:
        error = "no image data"
    if error is not None:
        row.update(status=STATUS_ERROR, error=error)
    return row


def _unique_key(key: str, keys: set[str]) -> str:
    """A distinct key for a later duplicate: '#' never occurs in a real key, so it cannot shadow one."""
    n = 2
    while f"{key}#dup{n}" in keys:
        n += 1
    return f"{key}#dup{n}"


# ---------------------------------------------------------------------------------------------------------------------
# One shard -> one committed manifest
# ---------------------------------------------------------------------------------------------------------------------


def ingest_shard(shard: SourceShard, cfg: IngestConfig, ctx: dict[str, Any] | None = None,
                 progress: Callable[[int], None] | None = None) -> ShardResult:
    """Write `<root>/manifests/<dataset>/<shard>.parquet` and its done marker; skip it when already committed.

    Holds the shard's lease while it works (ShardBusyError when another run holds it). `progress(n)` is called
    as samples are processed.
    """
    out = manifest_url(cfg.output_root, cfg.dataset, shard.name)
    fixed = {"stage": "ingest", "dataset": cfg.dataset, "shard": shard.name, "input_url": shard.url}
    if not cfg.force and (done := skipped(out, **fixed)) is not None:
        return done
    ctx = prepare(cfg) if ctx is None else ctx
    with Lease(out):
        if not cfg.force and (done := skipped(out, **fixed)) is not None:  # finished by another run meanwhile
            return done
        start = time.perf_counter()
        result = ShardResult(output_url=out, config_hash=config_hash(cfg), **fixed)
        rows, keys = [], set()
        for sample in get_source(cfg.dataset).iter_samples(shard, cfg, ctx):
            row = sample_row(sample, shard, cfg)
            if row["key"] in keys:  # every key appears once per manifest; later duplicates become error rows
                row.update(key=_unique_key(row["key"], keys), status=STATUS_ERROR,
                           error=row["error"] or f"duplicate key {row['key']!r} in this shard")
            keys.add(row["key"])
            rows.append(row)
            result.bytes += row.get("bytes") or 0
            if progress is not None:
                progress(1)
        result.num_ok = sum(r["status"] == STATUS_OK for r in rows)
        result.num_error = len(rows) - result.num_ok
        with commit_shard(out) as tmp:
            write_manifest(rows, tmp)
        result.seconds = round(time.perf_counter() - start, 3)
        write_done(out, {**result.to_dict(), "config": config_dict(cfg),
                         "lineage": lineage([shard.url], result.config_hash, committed_inputs=False)})
    return result


def ingest_shard_record(shard: SourceShard, cfg: IngestConfig, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    """`ingest_shard` as a plain, picklable call returning a dict: the unit a process pool runs."""
    return ingest_shard(shard, cfg, ctx).to_dict()


def is_committed(shard: SourceShard, cfg: IngestConfig) -> bool:
    return is_done(manifest_url(cfg.output_root, cfg.dataset, shard.name))
