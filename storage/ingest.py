"""Ingest one source shard into a parquet manifest: the per-shard function that the `ingest` flow maps.

    shards = list_shards(cfg)                    # SA-1B tars, JourneyDB tgz archives, ImageNet folders or tars
    prepare(cfg)                                 # JourneyDB only: index the annotation jsonl once
    result = ingest_shard(shards[0], cfg)        # -> ShardResult; manifest + done marker committed

Every sample ends as exactly one row: `ok` with size, hash and metadata, or `error` with a reason. Only an
unreadable source (missing, access denied, network) raises, so the orchestrator can retry the shard.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from storage.commit import commit_dir, commit_shard, is_done, read_done, write_done
from storage.config import IngestConfig
from storage.configio import config_dict, config_hash
from storage.decode import probe_image
from storage.errors import ImageDecodeError, SourceError
from storage.manifest import STATUS_ERROR, STATUS_OK, manifest_dir, manifest_url, write_manifest
from storage.sources import imagenet, journeydb, sa1b
from storage.sources.base import SourceSample, SourceShard
from storage.urls import filesystem, join

_FIELDS = ("label", "wnid", "prompt", "prompt_raw", "caption")


@dataclass
class ShardResult:
    """What one shard produced; stored in its done marker and returned to the orchestrator."""

    dataset: str
    shard: str
    source_url: str
    output_url: str
    num_ok: int = 0
    num_error: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: bool = False
    config_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# Shards and per-dataset preparation
# ---------------------------------------------------------------------------------------------------------------------


def list_shards(cfg: IngestConfig) -> list[SourceShard]:
    """The source shards of `cfg.dataset`, in name order, limited to `max_shards`."""
    lister = {"sam": sa1b.list_shards, "journeydb": journeydb.list_shards, "imagenet": imagenet.list_shards}
    shards = sorted(lister[cfg.dataset](cfg.source), key=lambda s: s.name)
    if cfg.dataset == "imagenet":
        if cfg.synset_mapping:
            imagenet.load_synset_mapping(cfg.synset_mapping)  # a bad mapping fails the run now, not every shard
        elif any(s.kind == "folder" for s in shards):
            raise SourceError(f"{cfg.source}: ImageNet class folders need synset_mapping (LOC_synset_mapping.txt)")
    return shards[: cfg.max_shards] if cfg.max_shards else shards


def annotation_index_url(cfg: IngestConfig) -> str:
    """JourneyDB annotations, partitioned by image folder: `<index>/folder=NNN/*.parquet` (+ `<index>.done`)."""
    return join(manifest_dir(cfg.output_root, cfg.dataset), "_index", "annotations")


_INDEX_SCHEMA = pa.schema([("folder", pa.string()), ("key", pa.string()), ("img_path", pa.string()),
                           ("prompt", pa.string()), ("prompt_raw", pa.string()), ("caption", pa.string()),
                           ("line", pa.int64())])
_INDEX_BATCH = 50_000
MAX_REPORTED_ERRORS = 100


def prepare(cfg: IngestConfig) -> dict[str, Any]:
    """Dataset-wide work done once before the shards.

    JourneyDB: stream the annotation jsonl (4M+ lines) once into a folder-partitioned parquet dataset, so each
    shard later reads only its own folder's records. Memory stays bounded by one batch.
    """
    if cfg.dataset != "journeydb":
        return {}
    url = annotation_index_url(cfg)
    done = read_done(url)
    if done and done.get("annotations") == cfg.annotations and not cfg.force:
        return done
    counts, errors = {"records": 0, "errors": 0}, []

    def batches() -> Iterator[pa.RecordBatch]:
        buffer = []
        for rec in journeydb.iter_annotations(cfg.annotations or ""):
            if "error" in rec:
                counts["errors"] += 1
                if len(errors) < MAX_REPORTED_ERRORS:
                    errors.append(rec["error"])
                continue
            counts["records"] += 1
            buffer.append(rec)
            if len(buffer) == _INDEX_BATCH:
                yield pa.RecordBatch.from_pylist(buffer, schema=_INDEX_SCHEMA)
                buffer = []
        if buffer:
            yield pa.RecordBatch.from_pylist(buffer, schema=_INDEX_SCHEMA)

    with commit_dir(url) as (fs, tmp):
        pads.write_dataset(pa.RecordBatchReader.from_batches(_INDEX_SCHEMA, batches()), tmp, format="parquet",
                           filesystem=PyFileSystem(FSSpecHandler(fs)), partitioning=["folder"],
                           partitioning_flavor="hive", max_rows_per_group=_INDEX_BATCH,
                           existing_data_behavior="overwrite_or_ignore")
    record = {"annotations": cfg.annotations, "num_records": counts["records"], "num_error": counts["errors"],
              "errors": errors}
    write_done(url, record)
    return record


def _journeydb_records(cfg: IngestConfig, folder: str) -> list[dict[str, Any]]:
    fs, path = filesystem(annotation_index_url(cfg))
    rows: list[dict[str, Any]] = []
    for part in sorted(fs.glob(f"{path}/folder={folder}/*.parquet")):
        with fs.open(part, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def _samples(shard: SourceShard, cfg: IngestConfig) -> Iterator[SourceSample]:
    if cfg.dataset == "sam":
        return sa1b.iter_samples(shard, full_json=cfg.decode.verify == "full")
    if cfg.dataset == "journeydb":
        return journeydb.iter_samples(shard, _journeydb_records(cfg, shard.name))
    mapping = imagenet.load_synset_mapping(cfg.synset_mapping) if cfg.synset_mapping else None
    return imagenet.iter_samples(shard, mapping)


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
        row["sha256"] = hashlib.sha256(sample.data).hexdigest()
        if error is None:
            try:
                info = probe_image(sample.data, max_pixels=cfg.decode.max_pixels, verify=cfg.decode.verify)
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


# ---------------------------------------------------------------------------------------------------------------------
# One shard -> one committed manifest
# ---------------------------------------------------------------------------------------------------------------------


def ingest_shard(
    shard: SourceShard, cfg: IngestConfig, progress: Callable[[int], None] | None = None
) -> ShardResult:
    """Write `<root>/manifests/<dataset>/<shard>.parquet` and its done marker; skip it when already committed.

    `progress(n)` is called as samples are processed (for progress bars).
    """
    out = manifest_url(cfg.output_root, cfg.dataset, shard.name)
    if is_done(out) and not cfg.force:
        previous = read_done(out) or {}
        fields = {k: previous[k] for k in ShardResult.__dataclass_fields__ if k in previous}
        result = ShardResult(**{**fields, "dataset": cfg.dataset, "shard": shard.name, "source_url": shard.url,
                                "output_url": out})
        result.skipped = True
        return result
    start = time.perf_counter()
    result = ShardResult(dataset=cfg.dataset, shard=shard.name, source_url=shard.url, output_url=out,
                         config_hash=config_hash(cfg))
    rows, keys = [], set()
    for sample in _samples(shard, cfg):
        row = sample_row(sample, shard, cfg)
        if row["key"] in keys:  # every key appears once per manifest; later duplicates become distinct error rows
            row.update(key=f"{row['key']}__dup{len(rows)}", status=STATUS_ERROR,
                       error=row["error"] or f"duplicate key {row['key']!r}")
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
    write_done(out, {**result.to_dict(), "config": config_dict(cfg)})
    return result


def ingest_shard_record(shard: SourceShard, cfg: IngestConfig) -> dict[str, Any]:
    """`ingest_shard` as a plain, picklable call returning a dict: the unit a process pool runs."""
    return ingest_shard(shard, cfg).to_dict()
