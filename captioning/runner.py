"""The local executor: caption shards one after another with one model, keeping it busy.

    runner = CaptionRunner(cfg, Captioner(cfg), T5TokenCounter(cfg.t5_tokenizer))
    for i, url in enumerate(urls):
        runner.run(url, upcoming=urls[i + 1] if i + 1 < len(urls) else None)

Images are read and decoded on CPU threads `prefetch_batches` batches ahead of `generate()`; while a shard's last
batches are generated, the first batches of the `upcoming` shard are already being decoded, so the model does not
wait at shard boundaries. Rows go through `ShardAssembler`, so a crash loses at most one part of work.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from captioning.captioner import Captioner
from captioning.config import CaptionConfig
from captioning.records import add_t5_counts, error_row
from captioning.shard import CaptionShardResult, ShardAssembler, finished_row, skipped_result
from storage.errors import ImageDecodeError
from storage.readers import iter_manifest_images

Row = dict[str, Any]


def _batches(rows: list[Row], cfg: CaptionConfig) -> Iterator[tuple[list[tuple[Row, bytes]], list[Row]]]:
    """(images to caption, error rows) per batch, reading each source archive once."""
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


def _prepare(items: list[tuple[Row, bytes]], cfg: CaptionConfig, captioner: Captioner):
    """On a CPU thread: decode, pad, shrink and encode one batch -> (good rows, error rows, inputs or None)."""
    good, images, errors = [], [], []
    for row, data in items:
        try:
            images.append(captioner.prep.shrink(captioner.prep.decode(data)))
            good.append(row)
        except ImageDecodeError as e:
            errors.append(error_row(row, cfg, f"image not decodable: {e}"))
    return good, errors, captioner.encode(images) if images else None


class _Job:
    """One shard in flight: its assembler, its batch source, and batches being decoded."""

    def __init__(self, url: str, cfg: CaptionConfig, captioner: Captioner, pool: ThreadPoolExecutor) -> None:
        self.url, self.cfg, self.captioner, self.pool = url, cfg, captioner, pool
        self.shard = ShardAssembler(url, cfg)
        not_ingested = [error_row(r, cfg, f"not ingested: {r['error']}") for r in self.shard.todo
                        if r["status"] != "ok"]
        self.source = _batches([r for r in self.shard.todo if r["status"] == "ok"], cfg)
        self.pending: deque[tuple[Future | None, list[Row]]] = deque([(None, not_ingested)] if not_ingested else [])
        self.exhausted = False

    def fill(self) -> None:
        while not self.exhausted and len(self.pending) < self.cfg.prefetch_batches + 1:
            nxt = next(self.source, None)
            if nxt is None:
                self.exhausted = True
            else:
                self.pending.append((self.pool.submit(_prepare, nxt[0], self.cfg, self.captioner), nxt[1]))


class CaptionRunner:
    """Runs shards through one captioner; see the module docstring."""

    def __init__(self, cfg: CaptionConfig, captioner: Captioner, counter) -> None:
        self.cfg, self.captioner, self.counter = cfg, captioner, counter
        self.pool = ThreadPoolExecutor(max_workers=cfg.prefetch_batches, thread_name_prefix="decode")
        self.warm: _Job | None = None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _job(self, url: str) -> _Job:
        if self.warm is not None and self.warm.url == url:
            job, self.warm = self.warm, None
            return job
        return _Job(url, self.cfg, self.captioner, self.pool)

    def run(self, manifest_url: str, progress: Callable[[int], None] | None = None,
            upcoming: str | None = None) -> CaptionShardResult:
        """Caption one manifest into the caption set (skipped when committed); start decoding `upcoming` early."""
        skipped = skipped_result(manifest_url, self.cfg)
        if skipped is not None:
            return skipped
        job = self._job(manifest_url)
        stats = job.shard.result
        job.fill()
        while job.pending:
            if job.exhausted and self.warm is None and upcoming and skipped_result(upcoming, self.cfg) is None:
                self.warm = _Job(upcoming, self.cfg, self.captioner, self.pool)
                self.warm.fill()
            future, rows = job.pending.popleft()
            if future is not None:
                good, decode_errors, inputs = future.result()
                rows = rows + decode_errors
                if inputs is not None:
                    start = time.perf_counter()
                    captions = self.captioner.generate(inputs)
                    took = time.perf_counter() - start
                    stats.generate_seconds += took
                    for row, cap in zip(good, captions, strict=True):
                        stats.generated_tokens += cap.n_tokens
                        rows.append(finished_row(row, self.cfg, cap.text, cap.n_tokens, cap.finish_reason,
                                                 took / len(captions)))
            job.fill()
            add_t5_counts(rows, self.counter, self.cfg.max_t5_tokens)
            job.shard.add(rows)
            if progress is not None:
                progress(len(rows))
        return job.shard.finalize()


def caption_shard(manifest_url: str, cfg: CaptionConfig, captioner: Captioner, counter,
                  progress: Callable[[int], None] | None = None) -> CaptionShardResult:
    """Caption one manifest (no look-ahead to other shards)."""
    runner = CaptionRunner(cfg, captioner, counter)
    try:
        return runner.run(manifest_url, progress)
    finally:
        runner.close()
