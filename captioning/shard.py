"""Caption one ingested shard, exactly once per manifest key, resumable after a crash.

    result = caption_shard(manifest_url, cfg, captioner, t5_counter)

Rows are appended to small committed part files as batches finish; a re-run reads the parts, captions only the
keys that are still missing, then merges everything into `<shard>.parquet`, checks that every manifest key has
exactly one row, commits it with its done marker, and deletes the parts. Images are read and decoded on CPU
threads, `prefetch_batches` ahead of `generate()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from captioning.captioner import Captioner
from captioning.config import CaptionConfig
from captioning.records import CAPTION_SCHEMA, add_t5_counts, caption_row, caption_url, error_row, parts_dir
from captioning.text import clean_caption, degenerate_reason
from storage.commit import commit_shard, is_done, read_done, write_done
from storage.configio import config_dict
from storage.errors import ImageDecodeError, PipelineError
from storage.manifest import read_manifest
from storage.readers import iter_manifest_images
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


# ---------------------------------------------------------------------------------------------------------------------
# CPU side: read, decode, prepare, encode
# ---------------------------------------------------------------------------------------------------------------------


def _prepare_batch(items: list[tuple[Row, bytes]], cfg: CaptionConfig, captioner: Captioner):
    """Decode and encode one batch on a CPU thread -> (good rows, error rows, processor inputs or None)."""
    good, images, errors = [], [], []
    for row, data in items:
        try:
            images.append(captioner.prep.shrink(captioner.prep.decode(data)))
            good.append(row)
        except ImageDecodeError as e:
            errors.append(error_row(row, cfg, f"image not decodable: {e}"))
    return good, errors, captioner.encode(images) if images else None


def _batches(rows: list[Row], cfg: CaptionConfig) -> Iterator[tuple[list[tuple[Row, bytes]], list[Row]]]:
    """(images to caption, error rows) per batch, reading sources in manifest order."""
    items, errors = [], []
    for row, data, err in iter_manifest_images(rows):
        if err is not None:
            errors.append(error_row(row, cfg, err))
        else:
            items.append((row, data))
        if len(items) == cfg.batch_size:
            yield items, errors
            items, errors = [], []
    if items or errors:
        yield items, errors


# ---------------------------------------------------------------------------------------------------------------------
# One shard
# ---------------------------------------------------------------------------------------------------------------------


def finished_row(manifest_row: Row, cfg: CaptionConfig, raw_text: str, n_tokens: int, finish_reason: str,
                 seconds: float) -> Row:
    """The output row of one generated caption: cleaned, flagged if degenerate (T5 counts added per batch)."""
    text = clean_caption(raw_text, cfg.prompt)
    return caption_row(manifest_row, cfg, caption=text, n_tokens=n_tokens, finish_reason=finish_reason,
                       degenerate=degenerate_reason(text, finish_reason), seconds=seconds)


def caption_rows(todo: list[Row], cfg: CaptionConfig, captioner: Captioner, counter,
                 stats: CaptionShardResult) -> Iterator[list[Row]]:
    """Caption the manifest rows `todo`; yields the finished rows batch by batch."""
    not_ingested = [error_row(r, cfg, f"not ingested: {r['error']}") for r in todo if r["status"] != "ok"]
    if not_ingested:
        yield not_ingested
    pending: list[tuple[Future, list[Row]]] = []
    with ThreadPoolExecutor(max_workers=cfg.prefetch_batches, thread_name_prefix="decode") as pool:
        source = _batches([r for r in todo if r["status"] == "ok"], cfg)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < cfg.prefetch_batches:
                nxt = next(source, None)
                if nxt is None:
                    exhausted = True
                else:
                    pending.append((pool.submit(_prepare_batch, nxt[0], cfg, captioner), nxt[1]))
            if not pending:
                break
            future, read_errors = pending.pop(0)
            good, decode_errors, inputs = future.result()
            rows = read_errors + decode_errors
            if inputs is not None:
                start = time.perf_counter()
                captions = captioner.generate(inputs)
                took = time.perf_counter() - start
                stats.generate_seconds += took
                for row, cap in zip(good, captions, strict=True):
                    stats.generated_tokens += cap.n_tokens
                    rows.append(finished_row(row, cfg, cap.text, cap.n_tokens, cap.finish_reason,
                                             took / len(captions)))
            add_t5_counts(rows, counter, cfg.max_t5_tokens)
            yield rows


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


def caption_shard(manifest_url: str, cfg: CaptionConfig, captioner: Captioner, counter,
                  progress: Callable[[int], None] | None = None) -> CaptionShardResult:
    """Caption every key of one committed manifest into the caption set; skip when already committed."""
    skipped = skipped_result(manifest_url, cfg)
    if skipped is not None:
        return skipped
    shard = ShardAssembler(manifest_url, cfg)
    for rows in caption_rows(shard.todo, cfg, captioner, counter, shard.result):
        shard.add(rows)
        if progress is not None:
            progress(len(rows))
    return shard.finalize()


def pending_manifests(manifests: Iterable[str], cfg: CaptionConfig) -> list[str]:
    """Committed manifests whose caption shard is not committed yet (all of them with force)."""
    caption_set = cfg.resolved_caption_set()
    return [m for m in manifests if cfg.force or not is_done(
        caption_url(cfg.output_root, cfg.dataset, caption_set, basename(m).removesuffix(".parquet")))]
