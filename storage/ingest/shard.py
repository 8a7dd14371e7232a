"""Ingest one source shard into a parquet manifest: the per-shard function that the `ingest` stage maps.

    shards = list_shards(cfg)                    # from the dataset's source (storage/ingest/sources/), names checked
    ctx = prepare(cfg)                           # dataset-wide work once (JourneyDB: the annotation index)
    result = ingest_shard(shards[0], cfg, ctx)   # -> ShardResult; manifest + done marker committed
    write_duplicates(cfg.output_root, cfg.dataset)  # after all shards: keys seen in two shards (storage.ingest.dedupe)

Every sample ends as exactly one row: `ok` with size, hash and metadata, or `error` with a reason. Only an
unreadable source (missing, access denied, network) raises, so the orchestrator can fail or retry the shard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from storage.configio import config_dict
from storage.decode import probe_image
from storage.errors import ImageDecodeError
from storage.hashing import content_hash
from storage.ingest.config import IngestConfig
from storage.ingest.sources import SourceSample, SourceShard, get_source
from storage.layout import check_unique, manifest_url
from storage.lineage import lineage
from storage.manifest import MANIFEST_SCHEMA, STATUS_ERROR, STATUS_OK
from storage.shard import Row, ShardResult, ShardWriter
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


# ---------------------------------------------------------------------------------------------------------------------
# One shard -> one committed manifest
# ---------------------------------------------------------------------------------------------------------------------


def ingest_lineage(shard: SourceShard, cfg: IngestConfig) -> dict[str, Any]:
    """A manifest is made from its source archive (and the dataset's annotation or synset file), by size and
    mtime/etag, with the effective ingest config."""
    inputs = [shard.url] + [u for u in (cfg.annotations, cfg.synset_mapping) if u]
    return lineage(inputs, cfg, committed_inputs=False)


def ingest_shard(shard: SourceShard, cfg: IngestConfig, ctx: dict[str, Any] | None = None,
                 progress: Callable[[int], None] | None = None) -> ShardResult:
    """Write `<root>/manifests/<dataset>/<shard>.parquet` and its done marker; skip it when committed for the same
    lineage. A crash mid-shard resumes: rows already committed as parts are not probed again.

    Holds the shard's lease while it works (ShardBusyError when another run holds it). `progress(n)` is called
    as samples are processed.
    """
    out = manifest_url(cfg.output_root, cfg.dataset, shard.name)
    result = ShardResult(stage="ingest", dataset=cfg.dataset, shard=shard.name, input_url=shard.url, output_url=out)
    writer = ShardWriter.open(out, None, MANIFEST_SCHEMA, result, ingest_lineage(shard, cfg),
                              config=config_dict(cfg), force=cfg.force, redo_errors=cfg.redo == "errors")
    if writer.done is not None:
        return writer.done
    with writer:  # aborts (keeping committed parts) on any error
        ctx = prepare(cfg) if ctx is None else ctx
        seen: dict[str, int] = {}  # occurrences of each key in the stream, so a resumed run names duplicates alike
        for sample in get_source(cfg.dataset).iter_samples(shard, cfg, ctx):
            seen[sample.key] = n = seen.get(sample.key, 0) + 1
            key = sample.key if n == 1 else f"{sample.key}#dup{n}"  # '#' never occurs in a real key
            if key in writer.have:  # committed by an earlier attempt
                continue
            row = sample_row(sample, shard, cfg)
            if n > 1:  # every key appears once per manifest; later duplicates become error rows
                row.update(key=key, status=STATUS_ERROR, error=row["error"] or f"duplicate key {sample.key!r} in "
                           f"this shard")
            writer.add([row])
            if progress is not None:
                progress(1)
        return writer.finalize(count=_count)


def _count(rows: list[Row], result: ShardResult) -> None:
    result.bytes = sum(r.get("bytes") or 0 for r in rows)


def ingest_shard_record(shard: SourceShard, cfg: IngestConfig, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    """`ingest_shard` as a plain, picklable call returning a dict: the unit a process pool runs."""
    return ingest_shard(shard, cfg, ctx).to_dict()
