"""Exactly once per manifest key, resumable after a crash: how captioned rows become a committed shard.

    shard = ShardAssembler(manifest_url, cfg)     # reads the manifest and the parts of an interrupted attempt
    shard.todo                                    # manifest rows that still need a row
    shard.add(rows)                               # from any executor; committed as small part files
    shard.finalize()                              # merge, check exactly-once, commit <shard>.parquet + marker

A re-run reads the parts and captions only the keys still missing. `finalize` checks that every manifest key has
exactly one row before committing, then deletes the parts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from captioning.config import CaptionConfig
from captioning.records import CAPTION_SCHEMA, caption_row, caption_url, parts_dir
from captioning.text import clean_caption, degenerate_reason
from storage.commit import commit_shard, is_done, read_done, write_done
from storage.configio import config_dict
from storage.errors import PipelineError
from storage.manifest import read_manifest
from storage.urls import basename, filesystem, join

Row = dict[str, Any]


@dataclass
class CaptionShardResult:
    shard: str
    output_url: str
    num_ok: int = 0
    num_error: int = 0
    num_degenerate: int = 0
    resumed_rows: int = 0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    wall_seconds: float = 0.0
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# Part files: committed progress of an unfinished shard
# ---------------------------------------------------------------------------------------------------------------------


class PartStore:
    """`part-NNNNN.parquet` files under one directory, each written atomically."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = filesystem(url)

    def files(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        return sorted(p for p in self.fs.glob(f"{self.path}/part-*.parquet"))

    def read(self) -> list[Row]:
        rows: list[Row] = []
        for p in self.files():
            with self.fs.open(p, "rb") as f:
                rows += pq.read_table(f).to_pylist()
        return rows

    def write(self, rows: list[Row]) -> None:
        if not rows:
            return
        url = join(self.url, f"part-{len(self.files()):05d}.parquet")
        with commit_shard(url) as tmp:
            fs, path = filesystem(tmp)
            with fs.open(path, "wb") as f:
                pq.write_table(pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA), f)

    def clear(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)


# ---------------------------------------------------------------------------------------------------------------------
# Assembling a shard from finished rows (any executor)
# ---------------------------------------------------------------------------------------------------------------------


def check_exactly_once(manifest_keys: list[str], rows: list[Row]) -> None:
    """Every manifest key has exactly one row, and no row has a key outside the manifest."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["key"]] = counts.get(r["key"], 0) + 1
    dup = sorted(k for k, n in counts.items() if n > 1)
    missing = sorted(set(manifest_keys) - counts.keys())
    extra = sorted(counts.keys() - set(manifest_keys))
    if dup or missing or extra:
        raise PipelineError(f"exactly-once check failed: {len(dup)} duplicated, {len(missing)} missing, "
                            f"{len(extra)} unknown keys (e.g. {(dup + missing + extra)[:3]})")


def finalize_shard(manifest_rows: list[Row], parts: PartStore, result: CaptionShardResult,
                   extra: dict[str, Any]) -> None:
    """Merge the parts in manifest order, check exactly-once, commit the shard, write the marker, drop the parts."""
    rows = parts.read()
    check_exactly_once([r["key"] for r in manifest_rows], rows)
    order = {r["key"]: i for i, r in enumerate(manifest_rows)}
    rows.sort(key=lambda r: order[r["key"]])
    result.num_ok = sum(r["status"] == "ok" for r in rows)
    result.num_error = len(rows) - result.num_ok
    result.num_degenerate = sum(bool(r["degenerate"]) for r in rows)
    with commit_shard(result.output_url) as tmp:
        fs, path = filesystem(tmp)
        with fs.open(path, "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA), f, compression="zstd")
    write_done(result.output_url, {**extra, **result.to_dict()})
    parts.clear()


def finished_row(manifest_row: Row, cfg: CaptionConfig, raw_text: str, n_tokens: int, finish_reason: str,
                 seconds: float) -> Row:
    """The output row of one generated caption: cleaned, flagged if degenerate (T5 counts added per batch)."""
    text = clean_caption(raw_text, cfg.prompt)
    return caption_row(manifest_row, cfg, caption=text, n_tokens=n_tokens, finish_reason=finish_reason,
                       degenerate=degenerate_reason(text, finish_reason), seconds=seconds)


class ShardAssembler:
    """Collects the finished rows of one shard from any executor, commits them as parts, and finalizes the shard
    once every manifest key has its row. Resumes from the parts of an earlier, interrupted attempt."""

    def __init__(self, manifest_url: str, cfg: CaptionConfig) -> None:
        self.cfg = cfg
        self.manifest_url = manifest_url
        shard = basename(manifest_url).removesuffix(".parquet")
        self.caption_set = cfg.resolved_caption_set()
        self.result = CaptionShardResult(shard=shard, output_url=caption_url(cfg.output_root, cfg.dataset,
                                                                             self.caption_set, shard))
        self.manifest_rows = read_manifest(manifest_url).to_pylist()
        self.parts = PartStore(parts_dir(cfg.output_root, cfg.dataset, self.caption_set, shard))
        if cfg.force:
            self.parts.clear()
        done = {r["key"] for r in self.parts.read()}
        self.result.resumed_rows = len(done)
        self.todo = [r for r in self.manifest_rows if r["key"] not in done]
        self.remaining = {r["key"] for r in self.todo}
        self.buffer: list[Row] = []
        self.start = time.perf_counter()

    @property
    def complete(self) -> bool:
        return not self.remaining

    def add(self, rows: list[Row]) -> None:
        for r in rows:
            self.remaining.discard(r["key"])
        self.buffer += rows
        if len(self.buffer) >= self.cfg.part_rows or self.complete:
            self.parts.write(self.buffer)
            self.buffer = []

    def finalize(self) -> CaptionShardResult:
        self.parts.write(self.buffer)
        self.buffer = []
        self.result.wall_seconds = round(time.perf_counter() - self.start, 3)
        finalize_shard(self.manifest_rows, self.parts, self.result,
                       {"manifest_url": self.manifest_url, "caption_set": self.caption_set,
                        "config": config_dict(self.cfg)})
        return self.result


def skipped_result(manifest_url: str, cfg: CaptionConfig) -> CaptionShardResult | None:
    """The stored result when this shard is already committed in the caption set (and not forced), else None."""
    shard = basename(manifest_url).removesuffix(".parquet")
    out = caption_url(cfg.output_root, cfg.dataset, cfg.resolved_caption_set(), shard)
    if cfg.force or not is_done(out):
        return None
    done = read_done(out) or {}
    result = CaptionShardResult(**{k: v for k, v in done.items() if k in CaptionShardResult.__dataclass_fields__})
    result.skipped = True
    return result


def pending_manifests(manifests: Iterable[str], cfg: CaptionConfig) -> list[str]:
    """Committed manifests whose caption shard is not committed yet (all of them with force)."""
    caption_set = cfg.resolved_caption_set()
    return [m for m in manifests if cfg.force or not is_done(
        caption_url(cfg.output_root, cfg.dataset, caption_set, basename(m).removesuffix(".parquet")))]
