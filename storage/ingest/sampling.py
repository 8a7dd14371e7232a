"""A measured sample of one dataset, for estimates made before ingest runs (`flows/pipeline_cost.py`).

    shards = list_shards(cfg)                             # storage/ingest/shard.py
    s = committed_sample(cfg, shards) or sample_source(cfg, shards, max_samples=64)
    s.ok / s.shards_read * s.shards                       # ok samples of the whole source, extrapolated

`committed_sample`: the committed manifests of the source's shards, when there are any; exact when every shard has
one. `sample_source`: the first `max_samples` samples of the source, over as many shards as they span, each made into
its manifest row exactly as ingest makes it (`sample_row`: the header probe, declared sizes, the hash), with nothing
written under the output root. A shard cut short at `max_samples` counts as the share of its bytes that was read,
so the count extrapolates by bytes within a shard (up to the next sample's header, where the tar gives offsets)
and by shards over the source. The dataset-wide preparation runs
once, as ingest would run it (JourneyDB: its annotation index, built once and then reused by ingest).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from storage.ingest.config import IngestConfig
from storage.ingest.shard import prepare, sample_row
from storage.ingest.sources import SourceShard, get_source
from storage.manifest import STATUS_OK, committed_manifests, read_manifest, write_manifest
from storage.urls import filesystem

TAR_BLOCK = 512


@dataclass
class DatasetSample:
    """What was measured of one dataset: counts over `shards_read` of its `shards` source shards."""

    shards: int  # source shards in all (after max_shards)
    shards_read: float  # whole shards count 1, a shard cut at max_samples the share of its bytes read
    rows: int  # manifest rows (ok and error) of the samples measured
    ok: int
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) of the ok samples
    image_bytes: int = 0  # bytes of the images measured
    manifest_bytes: int = 0  # bytes of the manifest parquet these rows make
    names: list[str] = field(default_factory=list)  # the shards measured
    committed: bool = False  # from committed manifests rather than the source

    @property
    def exact(self) -> bool:
        return self.shards_read >= self.shards


# ---------------------------------------------------------------------------------------------------------------------
# From committed manifests
# ---------------------------------------------------------------------------------------------------------------------


def committed_sample(cfg: IngestConfig, shards: list[SourceShard]) -> DatasetSample | None:
    """The committed manifests of `shards` (None if there are none), whatever lineage they were made for."""
    wanted = {s.name for s in shards}
    urls = [u for u in committed_manifests(cfg.output_root, cfg.dataset)
            if u.rsplit("/", 1)[-1].removesuffix(".parquet") in wanted]
    if not urls:
        return None
    out = DatasetSample(shards=len(shards), shards_read=len(urls), rows=0, ok=0, committed=True)
    for url in urls:
        rows = read_manifest(url, ["height", "width", "bytes", "status"]).to_pylist()
        ok = [r for r in rows if r["status"] == STATUS_OK]
        out.rows += len(rows)
        out.ok += len(ok)
        out.sizes += [(r["height"], r["width"]) for r in ok]
        out.image_bytes += sum(r["bytes"] or 0 for r in rows)
        fs, path = filesystem(url)
        out.manifest_bytes += int(fs.size(path))
        out.names.append(url.rsplit("/", 1)[-1].removesuffix(".parquet"))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# From the source
# ---------------------------------------------------------------------------------------------------------------------


def _shard_bytes(shard: SourceShard) -> int | None:
    """The archive's size (a class folder's total), or None where the store cannot say (then it is read whole)."""
    try:
        fs, path = filesystem(shard.url)
        return int(fs.du(path) if shard.kind == "folder" else fs.size(path)) or None
    except Exception:  # noqa: BLE001 - an HTTP link without a length, a backend error: read the shard whole
        return None


def _read_to(pos: int, shard: SourceShard, offset: int | None, length: int) -> int:
    """Bytes of the shard read once a member of `length` bytes is read: its end where the tar gives offsets; else
    a header and the padded data (a compressed tar's offsets are not given: JPEGs barely compress, so its
    uncompressed bytes stand for its compressed size); a folder's files, their bytes."""
    if offset is not None:
        return max(pos, offset + length)
    if shard.kind == "folder":
        return pos + length
    return pos + TAR_BLOCK + -(-length // TAR_BLOCK) * TAR_BLOCK


def sample_source(cfg: IngestConfig, shards: list[SourceShard], max_samples: int = 64) -> DatasetSample:
    """The first `max_samples` samples of `shards`, measured as ingest would make their manifest rows."""
    source, ctx = get_source(cfg.dataset), prepare(cfg)
    out = DatasetSample(shards=len(shards), shards_read=0.0, rows=0, ok=0)
    for shard in shards:
        if out.rows >= max_samples:
            break
        size, pos, cut, rows = _shard_bytes(shard), 0, False, []
        samples = iter(source.iter_samples(shard, cfg, ctx))
        for sample in samples:
            rows.append(sample_row(sample, shard, cfg))
            pos = _read_to(pos, shard, sample.offset, len(sample.data or b""))
            if out.rows + len(rows) >= max_samples and size is not None:
                after = next(samples, None)  # stop here unless this was the shard's last sample
                cut = after is not None
                if cut and after.offset is not None:  # the bytes read are all up to the next sample's header
                    pos = after.offset - TAR_BLOCK
                break
        out.shards_read += min(1.0, pos / size) if cut and size else 1.0
        out.names.append(shard.name)
        _add(out, rows)
    return out


def _add(out: DatasetSample, rows: list[dict]) -> None:
    """Count one shard's rows, and measure the manifest they make (written aside, not under the output root)."""
    ok = [r for r in rows if r["status"] == STATUS_OK]
    out.rows, out.ok = out.rows + len(rows), out.ok + len(ok)
    out.sizes += [(r["height"], r["width"]) for r in ok]
    out.image_bytes += sum(r.get("bytes") or 0 for r in rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.parquet"
        write_manifest(rows, str(path))
        out.manifest_bytes += path.stat().st_size
