"""The bucketed streaming loader: feature shards -> training batches, one aspect-ratio bucket per batch.

    shards = feature_shards(root, "sam", base_size=1024, multi_scale=True, caption_set="llava-...")
    loader = BucketedLoader(shards, batch_size=12, seed=0, rank=rank, world_size=world)
    loader.set_epoch(epoch)
    for batch in loader:            # {"latents" [B,4,h,w] fp32, "text" [B,120,d] fp16, "mask" [B,120], "img_hw" [B,2],
        ...                         #  "aspect_ratio" [B], "keys", (+ "cls" [B] for ImageNet)}
    # sample_posterior=False: "posterior" [B,8,h,w] fp16 and "noise_seed" [B] instead of "latents", for
    # pixart.data.finish.sample_posterior(batch["posterior"].cuda(), batch["noise_seed"]) on the GPU
    # pad_text=False: "text_rows" [sum of n_tokens, d] fp16 (the valid rows, sample after sample) and "n_tokens" [B]
    # instead of "text" and "mask", for pixart.data.finish.pad_text(batch["text_rows"].cuda(), batch["n_tokens"])
    state = loader.state_dict()     # resume mid-epoch: load_state_dict(state) replays exactly the remaining batches

How a batch is planned. Only the parquet indexes are read to plan: shard i goes to rank i mod world_size, and a
rank's shards (in index order) are dealt to its `num_workers` DataLoader workers in turn, so ranks and workers never
share a shard and a rank's samples do not depend on its worker count. Each (rank, worker) is one stream: its shards
come in an order permuted by (seed, epoch), and within a shard the keys are shuffled (seed, epoch, shard). Each
stream fills one buffer per bucket and emits a batch whenever a buffer reaches `batch_size`, as PixArt's
AspectRatioBatchSampler does. With drop_last (the default) a bucket's leftovers at an epoch's end (fewer than a
batch) are carried into the next epoch, where they open that bucket's buffer, as the official sampler keeps them
(its per-bucket lists are never cleared): nothing is dropped, and a bucket with fewer than `batch_size` samples
per stream is still trained on, its samples collected over epochs (so repeated in its batch, as officially). An
epoch's leftovers are recomputed from the indexes (`carried`: a pure function of seed and epoch, at most
`batch_size` earlier epochs' orders), so an epoch's plan does not depend on what ran before it. A bucket of n
samples per stream yields (e + 1) * n // batch_size batches over epochs 0..e: a stream's count per epoch follows
from the indexes alone (`batches_in_epoch`, `batches_per_rank(epoch=e)`), and epoch 0, with nothing carried in,
has the fewest. Without drop_last the partial batches come at the epoch's end and nothing is carried. A rank's
batches are its streams' taken in turn, skipping a stream that has run out: what a DataLoader over `dataset()`
delivers, and what iterating the loader gives. Text and latents are joined by key (a key missing or in error on
either side is skipped); a key listed twice in an index is an error.

Resume. `state_dict` records the epoch, the worker count, each stream's batches consumed and the stream next in
turn; `load_state_dict` then replays exactly the remaining batches in the uninterrupted order (a DataLoader's
worker w reads the stream w places after the next one), leftovers carried into the epoch included, since the plan
is a function of (seed, epoch). A state saved mid-epoch with another worker count is refused: its streams hold
other shards.

How a batch is read, and what is checked in every byte read: `pixart.data.collate` (`BatchReader`, which this loader
is): errors are `FeatureError`s naming the tar and the key, and nothing is skipped or cast.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from pixart.data.collate import BatchReader
from pixart.data.finish import SCALING_FACTOR
from pixart.data.index import Entry, FeatureShard, shard_entries
from pixart.data.tar_reads import FeatureError, TarReader
from storage.config import DEFAULT_MAX_TOKENS

__all__ = ["BucketedLoader", "FeatureError", "batches_in_epoch", "batches_per_rank"]



def _rng(*parts: Any) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def batches_in_epoch(bucket_counts: Iterable[int], batch_size: int, epoch: int) -> int:
    """Full batches a stream yields in `epoch` (drop_last, leftovers carried): per bucket of n samples in the stream,
    epochs 0..e together yield (e + 1) * n // batch_size of them, so epoch e yields
    (e + 1) * n // batch_size - e * n // batch_size: n // batch_size, or one more when the leftovers carried in fill
    a batch. Epoch 0 (nothing carried in) has the fewest."""
    return sum((epoch + 1) * n // batch_size - epoch * n // batch_size for n in bucket_counts)


def _left(n: int, batch_size: int, epoch: int) -> int:
    """Samples of a bucket of n (per pass over the stream) left over at the end of `epoch` (none before epoch 0)."""
    return (epoch + 1) * n % batch_size if epoch >= 0 else 0


def stream_bucket_counts(shards: list[FeatureShard], world_size: int, num_workers: int = 1,
                         threads: int = 16) -> list[list[list[int]]]:
    """Per rank, per stream (DataLoader worker): the sample count of each of its buckets, all a batch count needs.
    Every index is read once, `threads` at a time (object stores answer in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        counts = list(pool.map(lambda item: Counter(e.bucket for e in shard_entries(*item)), enumerate(shards)))
    out = []
    for rank in range(world_size):
        loader = BucketedLoader(shards, 1, rank=rank, world_size=world_size, num_workers=num_workers)
        streams = []
        for worker in range(num_workers):
            stream: Counter = Counter()
            for i in loader.stream_shards(worker):
                stream.update(counts[i])
            streams.append(sorted(stream.values()))
        out.append(streams)
    return out


def batches_per_rank(shards: list[FeatureShard], batch_size: int, world_size: int, num_workers: int = 1,
                     threads: int = 16, epoch: int = 0) -> list[int]:
    """Full batches (drop_last) that each rank's loader yields in `epoch` with `num_workers` DataLoader workers:
    per rank, the sum over its streams and their buckets of `batches_in_epoch` (each bucket's buffer carries across
    a stream's shards, and its leftovers into the next epoch). Epoch 0 gives every rank its fewest batches of any
    epoch; later ones add the batches that carried leftovers complete (`pixart.train.state.EpochSteps`)."""
    return [sum(batches_in_epoch(stream, batch_size, epoch) for stream in streams)
            for streams in stream_bucket_counts(shards, world_size, num_workers, threads)]


class BucketedLoader(BatchReader):
    """See the module docstring. Iterate it directly, or through `torch.utils.data.DataLoader(loader.dataset(),
    batch_size=None, num_workers=loader.num_workers)` with `loader.track(batch)` on each batch to keep `state_dict`
    exact (load a state before creating the DataLoader's iterator: its workers copy the loader then)."""

    def __init__(self, shards: list[FeatureShard], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 1, max_tokens: int = DEFAULT_MAX_TOKENS,
                 scaling_factor: float = SCALING_FACTOR, drop_last: bool = True, sample_posterior: bool = True,
                 pad_text: bool = True) -> None:
        if not shards:
            raise ValueError("no feature shards to load")
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: a rank reads through at least one stream (a DataLoader "
                             "with num_workers=0 reads them all in the training process)")
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.max_tokens, self.scaling_factor, self.drop_last = max_tokens, scaling_factor, drop_last
        self.sample_posterior, self.pad_text = sample_posterior, pad_text
        self.epoch = 0
        self.consumed: dict[int, int] = {}  # per stream (DataLoader worker): batches handed to training this epoch
        self.next = 0  # the stream whose batch comes next

    # -- plan ------------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed, self.next = epoch, {}, 0

    def stream_shards(self, worker: int = 0, epoch: int | None = None) -> list[int]:
        """This rank's stream `worker`: its shards in this epoch's order (or `epoch`'s). Which shards a stream gets
        is fixed (rank i mod world_size, then every num_workers-th of the rank's), only their order changes by
        epoch: so each rank's batch count per epoch follows from the indexes alone (`batches_per_rank`)."""
        order = _rng(self.seed, self.epoch if epoch is None else epoch).permutation(len(self.shards)).tolist()
        mine = set(range(self.rank, len(self.shards), self.world_size)[worker::self.num_workers])
        return [i for i in order if i in mine]

    def _entries(self, worker: int) -> dict[int, list[Entry]]:
        """The entries of stream `worker`'s shards, {shard: entries in index order}; indexes read in parallel."""
        mine = sorted(self.stream_shards(worker))
        if len(mine) <= 1:
            return {i: shard_entries(i, self.shards[i]) for i in mine}
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(16, len(mine))) as pool:
            return dict(zip(mine, pool.map(lambda i: shard_entries(i, self.shards[i]), mine), strict=True))

    def _pass(self, worker: int, epoch: int, entries: dict[int, list[Entry]]) -> Iterator[Entry]:
        """One pass over the stream in `epoch`'s order: shards permuted by (seed, epoch), keys by (seed, epoch,
        shard)."""
        for i in self.stream_shards(worker, epoch):
            shard = entries[i]
            for j in _rng(self.seed, epoch, self.shards[i].name).permutation(len(shard)).tolist():
                yield shard[j]

    def carried(self, worker: int = 0, epoch: int | None = None,
                entries: dict[int, list[Entry]] | None = None) -> dict[str, list[Entry]]:
        """Each bucket's leftovers that epoch `epoch` (default: this one) of stream `worker` starts with: what the
        previous epoch's plan left in its buffers, a pure function of (seed, epoch) recomputed from the indexes.
        Per bucket of n samples per pass, (epoch * n) % batch_size of them: the tail of the bucket's samples in
        the last epoch where it filled a batch, then all of its samples of the epochs after (a bucket with fewer
        than batch_size samples per pass collects them over epochs, repeats included, as the official sampler
        does). Only those epochs' orders are recomputed: at most batch_size of them, one for a bucket that fills a
        batch every epoch. None without drop_last (nothing is left over)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.drop_last or epoch <= 0:
            return {}
        entries = self._entries(worker) if entries is None else entries
        b = self.batch_size
        counts = Counter(e.bucket for shard in entries.values() for e in shard)
        since: dict[str, int] = {}  # bucket -> the last epoch before `epoch` in which it filled a batch (-1: none)
        for bucket, n in counts.items():
            if _left(n, b, epoch - 1):
                k = epoch - 1
                while k >= 0 and _left(n, b, k - 1) + n < b:
                    k -= 1
                since[bucket] = k
        out: dict[str, list[Entry]] = {bucket: [] for bucket in since}
        for k in range(max(0, min(since.values(), default=epoch)), epoch):
            seen: dict[str, list[Entry]] = {bucket: [] for bucket, first in since.items() if first <= k}
            for e in self._pass(worker, k, entries):
                if e.bucket in seen:
                    seen[e.bucket].append(e)
            for bucket, got in seen.items():
                out[bucket] += got[len(got) - _left(counts[bucket], b, k):] if k == since[bucket] else got
        return out

    def plan(self, worker: int = 0) -> Iterator[list[Entry]]:
        """The batches of one stream this epoch, in order, from the indexes alone: each bucket's buffer starts
        with the leftovers carried from the previous epoch (`carried`), then takes this epoch's pass."""
        entries = self._entries(worker)
        buffers = {bucket: list(left) for bucket, left in self.carried(worker, entries=entries).items()}
        for e in self._pass(worker, self.epoch, entries):
            buf = buffers.setdefault(e.bucket, [])
            buf.append(e)
            if len(buf) == self.batch_size:
                yield buf
                buffers[e.bucket] = []
        if not self.drop_last:
            yield from (buf for _, buf in sorted(buffers.items()) if buf)

    def iter_stream(self, worker: int = 0) -> Iterator[dict[str, Any]]:
        """Batches of one stream, skipping those already consumed (resume)."""
        skip = self.consumed.get(worker, 0)
        with TarReader() as files:
            for index, entries in enumerate(self.plan(worker)):
                if index < skip:
                    continue
                batch = self.collate(entries, files)
                batch.update(worker=worker, index=index)
                yield batch

    def iter_rank(self) -> Iterator[dict[str, Any]]:
        """This rank's batches: its streams in turn from the one next in turn, skipping those that ran out (what a
        DataLoader over `dataset()` delivers, in the same order)."""
        streams = {w: self.iter_stream(w) for w in range(self.num_workers)}
        turn = [(self.next + j) % self.num_workers for j in range(self.num_workers)]
        while turn:
            for w in list(turn):
                batch = next(streams[w], None)
                if batch is None:
                    turn.remove(w)
                else:
                    yield batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.iter_rank():
            self.track(batch)
            yield batch

    # -- DataLoader workers and resume --------------------------------------------------------------------------------

    def dataset(self) -> torch.utils.data.IterableDataset:
        return _StreamDataset(self)

    def track(self, batch: dict[str, Any]) -> None:
        """Record that training received this batch (call it on each batch from a DataLoader)."""
        worker = int(batch["worker"])
        self.consumed[worker] = int(batch["index"]) + 1
        self.next = (worker + 1) % self.num_workers

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "num_workers": self.num_workers,
                "consumed": dict(self.consumed), "next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has {self.seed}")
        consumed = {int(k): int(v) for k, v in state["consumed"].items() if int(v)}
        saved = state.get("num_workers")
        if saved is None and any(w != 0 for w in consumed):
            raise ValueError(f"loader state has progress for DataLoader workers {sorted(consumed)} but no worker "
                             "count (saved before the loader recorded it): it cannot be resumed exactly; resume from "
                             "an epoch's start")
        saved = 1 if saved is None else int(saved)
        if saved != self.num_workers and consumed:
            raise ValueError(f"loader state was saved mid-epoch with {saved} DataLoader workers per rank; this "
                             f"loader has {self.num_workers}. Each worker reads its own shards, so another count "
                             f"would repeat some samples and skip others: resume with {saved} workers, or from an "
                             "epoch's start")
        self.epoch, self.consumed = int(state["epoch"]), consumed
        self.next = int(state.get("next", 0)) % self.num_workers if consumed else 0  # nothing taken: the start


class _StreamDataset(torch.utils.data.IterableDataset):
    """The loader as an IterableDataset: each DataLoader worker reads one of the rank's streams. A DataLoader takes
    its workers' batches in turn from worker 0, skipping one that has run out; worker w reads the stream w places
    after the one next in turn, so a resumed run gets the uninterrupted order. Without workers (num_workers=0) the
    training process reads every stream in that same order."""

    def __init__(self, loader: BucketedLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        n = self.loader.num_workers
        if info is None:
            return self.loader.iter_rank()
        if info.num_workers != n:
            raise ValueError(f"BucketedLoader(num_workers={n}) is read by a DataLoader with {info.num_workers} "
                             "workers: pass the same count to both (it is part of the split and of the state)")
        return self.loader.iter_stream((self.loader.next + info.id) % n)
