"""The local executor: caption shards one after another with one model, keeping it busy.

    runner = CaptionRunner(cfg, Captioner(cfg), T5TokenCounter(cfg.t5_tokenizer))
    for i, url in enumerate(urls):
        runner.run(url, upcoming=urls[i + 1] if i + 1 < len(urls) else None)

Images are read and decoded on CPU threads `prefetch_batches` batches ahead of `generate()`; while a shard's last
batches are generated, the first batches of the `upcoming` shard are already being decoded, so the model does not
wait at shard boundaries. A look-ahead that fails (a missing archive, a shard leased by another run) is dropped
quietly: that shard then fails, or is skipped, in its own task and never in the current one. Rows go through
`CaptionShard`, so a crash loses at most one part of work.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from captioning.captioner import Captioner
from captioning.config import CaptionConfig
from captioning.shard import CaptionShard, Outcome, skipped_result
from storage.errors import ImageDecodeError
from storage.parquet import Row
from storage.readers import iter_manifest_images
from storage.shard import ShardResult


def _batches(rows: list[Row], batch_size: int) -> Iterator[tuple[list[tuple[Row, bytes]], list[Outcome]]]:
    """(images to caption, read errors) per batch, reading each source archive once."""
    items, errors = [], []
    for row, data, err in iter_manifest_images(rows):
        if err is not None:
            errors.append(Outcome(row["key"], error=err))
        else:
            items.append((row, data))
        if len(items) == batch_size:
            yield items, errors
            items, errors = [], []
    if items or errors:
        yield items, errors


def _prepare(items: list[tuple[Row, bytes]], captioner: Captioner):
    """On a CPU thread: decode, pad, shrink and encode one batch -> (good rows, error outcomes, inputs or None)."""
    good, images, errors = [], [], []
    for row, data in items:
        try:
            images.append(captioner.prep.shrink(captioner.prep.decode(data)))
            good.append(row)
        except ImageDecodeError as e:
            errors.append(Outcome(row["key"], error=f"image not decodable: {e}"))
    return good, errors, captioner.encode(images) if images else None


class _Job:
    """One shard in flight: its `CaptionShard`, its batch source, and batches being decoded."""

    def __init__(self, url: str, cfg: CaptionConfig, captioner: Captioner, counter, pool: ThreadPoolExecutor):
        self.url, self.cfg, self.captioner, self.pool = url, cfg, captioner, pool
        self.shard = CaptionShard(url, cfg, counter)
        self.source = _batches(self.shard.todo, captioner.batch_size)  # batch_size=auto resolved on the device
        self.pending: deque[tuple[Future, list[Outcome]]] = deque()
        self.exhausted = False

    def fill(self) -> None:
        while not self.exhausted and len(self.pending) < self.cfg.prefetch_batches + 1:
            nxt = next(self.source, None)
            if nxt is None:
                self.exhausted = True
            else:
                self.pending.append((self.pool.submit(_prepare, nxt[0], self.captioner), nxt[1]))


class CaptionRunner:
    """Runs shards through one captioner; see the module docstring."""

    def __init__(self, cfg: CaptionConfig, captioner: Captioner, counter) -> None:
        self.cfg, self.captioner, self.counter = cfg, captioner, counter
        self.pool = ThreadPoolExecutor(max_workers=cfg.prefetch_batches, thread_name_prefix="decode")
        self.warm: _Job | None = None

    def close(self) -> None:
        self._drop_warm()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _drop_warm(self) -> None:
        if self.warm is not None:
            self.warm.shard.abort()
            self.warm = None

    def _job(self, url: str) -> _Job:
        if self.warm is not None and self.warm.url == url:
            job, self.warm = self.warm, None
            return job
        self._drop_warm()
        return _Job(url, self.cfg, self.captioner, self.counter, self.pool)

    def _warm_up(self, upcoming: str) -> None:
        """Start decoding the next shard. Whatever goes wrong here belongs to that shard, not this one."""
        try:
            if skipped_result(upcoming, self.cfg) is None:
                self.warm = _Job(upcoming, self.cfg, self.captioner, self.counter, self.pool)
                self.warm.fill()
        except Exception:  # noqa: BLE001 - re-raised, with its own retries, when that shard's task runs
            self._drop_warm()
            self.warm = None

    def run(self, manifest_url: str, progress: Callable[[int], None] | None = None,
            upcoming: str | None = None) -> ShardResult:
        """Caption one manifest into the caption set (skipped when committed); start decoding `upcoming` early."""
        skipped = skipped_result(manifest_url, self.cfg)
        if skipped is not None:
            return skipped
        job = self._job(manifest_url)
        if job.shard.done is not None:  # committed by another run since the check above
            return job.shard.done
        try:
            job.fill()
            while job.pending:
                if job.exhausted and self.warm is None and upcoming:
                    self._warm_up(upcoming)
                    upcoming = None
                future, outcomes = job.pending.popleft()
                good, decode_errors, inputs = future.result()
                outcomes = outcomes + decode_errors
                if inputs is not None:
                    start = time.perf_counter()
                    captions = self.captioner.generate(inputs)
                    per_image = (time.perf_counter() - start) / len(captions)
                    outcomes += [Outcome(row["key"], text=c.text, n_tokens=c.n_tokens, finish_reason=c.finish_reason,
                                         seconds=per_image) for row, c in zip(good, captions, strict=True)]
                job.fill()
                job.shard.accept(outcomes)
                if progress is not None:
                    progress(len(outcomes))
            return job.shard.finalize()
        except BaseException:
            job.shard.abort()
            raise


def caption_shard(manifest_url: str, cfg: CaptionConfig, captioner: Captioner, counter,
                  progress: Callable[[int], None] | None = None) -> ShardResult:
    """Caption one manifest (no look-ahead to other shards)."""
    runner = CaptionRunner(cfg, captioner, counter)
    try:
        return runner.run(manifest_url, progress)
    finally:
        runner.close()
