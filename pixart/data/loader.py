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

What is checked. Errors are `FeatureError`s naming the tar (or index) and the key; a corrupt sample stops the epoch
like any other read error (the loader never skips or casts data it cannot vouch for). Every sample's range must lie
inside its tar and be no longer than its array needs before anything is allocated for it. Every .npy header must
keep the format's promise before its data is used: float16, C order, a latent of [8, h/8, w/8] for its bucket at
the shard's base size, T5 rows [n_tokens, d] with the index's n_tokens and the batch's d. img_hw, the aspect ratio
and the class come from the index (from the json and cls members only for indexes written before they held them).

How a batch is read. The indexes give each sample's byte range and (those with `array_offset`) the offset of its
.npy member and the fields its json holds (orig size, class). Such arrays are read with one os.preadv each: the
member's tar header and .npy header into a scratch buffer, the data straight into the sample's own slot of the
batch array, then the headers are checked (name, checksum, shape, dtype, size) before the slot counts as read; a
check that fails, a remote file or an older index sends the sample down the range path (the range read, members
located by their tar headers, arrays through `load_npy`, which never unpickles), where a header that breaks the
promise is an error. The first sample of each batch takes the range path: its checked header fixes the batch's
shapes. T5 features are padded with zeros to `max_tokens` and the mask rebuilt; the [B, 120, d] text array
comes from a pool that hands an array out again only once nothing else references it (`ArrayPool`), so held
batches are never overwritten. With pad_text=False the valid rows are read back to back into one pooled array
instead (no padding to zero, and about 40 % fewer bytes to pin and send at LLaVA caption lengths); `pad_text`
pads them on the training device. Latents are sampled from the stored posterior, (mean + std * eps) *
scaling_factor, with eps drawn from a generator seeded by (seed, epoch, key): the same sample gets the same noise
whichever rank or worker reads it, and a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from pixart.buckets import bucket_table
from pixart.data.finish import SCALING_FACTOR, sample_posterior
from pixart.data.index import Entry, FeatureShard, shard_entries
from pixart.data.tar_reads import READ_ERRORS, ArrayPool, FeatureError, LocatedArray, TarReader, named
from pixart.features.format import (
    CLASS_MEMBER,
    FEATURE_DTYPE,
    JSON_MEMBER,
    LATENT_CHANNELS,
    LATENT_MEMBER,
    T5_MEMBER,
    tar_of,
)
from storage.wds import load_npy, npy_layout, sample_members

__all__ = ["BucketedLoader", "FeatureError", "batches_in_epoch", "batches_per_rank"]

VAE_FACTOR = 8  # latent pixels per image pixel, each side
RANGE_SLACK = 1 << 20  # a sample's range beyond its array's data: tar headers, the .npy header, json, class


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


def batches_per_rank(shards: list[FeatureShard], batch_size: int, world_size: int, num_workers: int = 1,
                     threads: int = 16, epoch: int = 0) -> list[int]:
    """Full batches (drop_last) that each rank's loader yields in `epoch` with `num_workers` DataLoader workers:
    per rank, the sum over its streams and their buckets of `batches_in_epoch` (each bucket's buffer carries across
    a stream's shards, and its leftovers into the next epoch). Epoch 0 gives every rank its fewest batches of any
    epoch: a step count taken from it (the trainer's steps_per_epoch, min over ranks) is there in every epoch. Every
    index is read once, `threads` at a time (object stores answer in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        counts = list(pool.map(lambda item: Counter(e.bucket for e in shard_entries(*item)), enumerate(shards)))
    out = []
    for rank in range(world_size):
        loader = BucketedLoader(shards, batch_size, rank=rank, world_size=world_size, num_workers=num_workers)
        total = 0
        for worker in range(num_workers):
            stream: Counter = Counter()
            for i in loader.stream_shards(worker):
                stream.update(counts[i])
            total += batches_in_epoch(stream.values(), batch_size, epoch)
        out.append(total)
    return out


@functools.cache
def _latent_shape(base_size: int, bucket: str) -> tuple[int, int, int]:
    table = bucket_table(base_size)
    if bucket not in table:
        raise ValueError(f"bucket {bucket!r} is not one of base size {base_size}'s")
    h, w = table[bucket]
    return LATENT_CHANNELS, h // VAE_FACTOR, w // VAE_FACTOR


@functools.cache
def _latent_limit(base_size: int, bucket: str) -> int:
    """The longest sample range a latent of this bucket can need."""
    return math.prod(_latent_shape(base_size, bucket)) * FEATURE_DTYPE.itemsize + RANGE_SLACK


def _describe(shape: tuple[int, ...], fortran: bool, dtype: np.dtype) -> str:
    return f"{dtype.str}{list(shape)}{' in fortran order' if fortran else ''}"


class BucketedLoader:
    """See the module docstring. Iterate it directly, or through `torch.utils.data.DataLoader(loader.dataset(),
    batch_size=None, num_workers=loader.num_workers)` with `loader.track(batch)` on each batch to keep `state_dict`
    exact (load a state before creating the DataLoader's iterator: its workers copy the loader then)."""

    def __init__(self, shards: list[FeatureShard], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 1, max_tokens: int = 120,
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

    # -- reading -----------------------------------------------------------------------------------------------------

    def _noise_seed(self, key: str) -> int:
        digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def _latent_shape(self, e: Entry) -> tuple[int, int, int] | None:
        base = self.shards[e.shard].base_size
        return None if base is None else _latent_shape(base, e.bucket)

    def collate(self, entries: list[Entry], files: TarReader) -> dict[str, Any]:
        """Read one planned batch straight into its batch arrays. Every sample's ranges are checked first (inside
        its tars, no longer than its arrays need). Where the index gives a sample's array offset, each array is one
        os.preadv into its slot of the batch, headers checked (`TarReader.read_array_rows`); otherwise the sample's
        byte range is read, its members located by their tar headers, checked and copied in (`_read_text` for the
        T5 rows). The first sample of a batch takes the range path: its checked header fixes the shapes."""
        n = len(entries)
        out = _Batch(n, self.max_tokens, files.arrays)
        tars = [self._tars(e) for e in entries]
        at = ["", ""]  # the (tar, key) being read: what an error names
        try:
            ranges = []
            for e, (latent_tar, text_tar) in zip(entries, tars, strict=True):
                at[:] = latent_tar, e.key
                base = self.shards[e.shard].base_size
                files.check_span(latent_tar, e.latent, None if base is None else _latent_limit(base, e.bucket))
                ranges.append((latent_tar, e.latent, e.key))
                if text_tar is not None:
                    at[0] = text_tar
                    files.check_span(text_tar, e.text)  # bounded by its width once the batch's is known: _read_text
                    ranges.append((text_tar, e.text, e.key))
            files.fetch(ranges)  # remote tars: the whole batch's ranges at once (errors name their key)
            for i, (e, (latent_tar, _)) in enumerate(zip(entries, tars, strict=True)):
                at[:] = latent_tar, e.key
                self._latent_into(out, i, e, latent_tar, files)
            text_tars = [text for _, text in tars]
            if all(text_tars):
                self._read_text(out, entries, text_tars, files, at)
        except READ_ERRORS as err:
            error = named(*at, err)
            if error is err:
                raise
            raise error from err
        assert out.posterior is not None
        seeds = torch.tensor([self._noise_seed(e.key) for e in entries], dtype=torch.int64)
        posterior = torch.from_numpy(out.posterior)
        batch: dict[str, Any] = {"img_hw": torch.from_numpy(out.img_hw), "aspect_ratio": torch.from_numpy(out.ratio)}
        if self.sample_posterior:
            batch["latents"] = sample_posterior(posterior, seeds, self.scaling_factor)
        else:
            batch.update(posterior=posterior, noise_seed=seeds)
        if out.text is not None:
            batch.update(text=torch.from_numpy(out.text), mask=torch.from_numpy(out.mask))
        if out.rows is not None:
            batch.update(text_rows=torch.from_numpy(out.rows), n_tokens=torch.tensor(out.n_tokens, dtype=torch.int64))
        labelled = [c is not None for c in out.cls]
        if any(labelled):
            if not all(labelled):
                raise FeatureError(f"batch {[e.key for e in entries]}: samples without a class "
                                   f"{[e.key for e, c in zip(entries, labelled, strict=True) if not c]} in "
                                   f"{self.shards[entries[0].shard].latents}")
            batch["cls"] = torch.tensor(out.cls, dtype=torch.long)
        batch["keys"] = [e.key for e in entries]
        return batch

    def _tars(self, e: Entry) -> tuple[str, str | None]:
        shard = self.shards[e.shard]
        text = None if e.text is None or shard.text is None else tar_of(shard.text)
        return tar_of(shard.latents), text

    def _latent_into(self, out: _Batch, i: int, e: Entry, url: str, files: TarReader) -> None:
        """Sample i's posterior into its slot; img_hw, aspect ratio and class from the index (from the json and cls
        members only where the index does not hold them)."""
        direct = out.posterior is not None and e.latent_array is not None and files.read_array_rows(
            url, e.latent_array[0], f"{e.key}.{LATENT_MEMBER}", out.posterior[i], len(out.posterior[i]),
            len(out.posterior[i]))
        if not direct:
            members = sample_members(files.read(url, e.latent), e.key)
            if LATENT_MEMBER not in members:
                raise ValueError(f"no {e.key}.{LATENT_MEMBER} member in the sample's range")
            shape, fortran, dtype, _ = npy_layout(members[LATENT_MEMBER])
            want = self._latent_shape(e) or (None if out.posterior is None else out.posterior.shape[1:])
            if (dtype != FEATURE_DTYPE or fortran or len(shape) != 3 or shape[0] != LATENT_CHANNELS
                    or (want is not None and shape != tuple(want))):
                expected = (LATENT_CHANNELS, "h/8", "w/8") if want is None else want
                raise ValueError(f"{e.key}.{LATENT_MEMBER} is {_describe(shape, fortran, dtype)}, not the "
                                 f"{FEATURE_DTYPE.str}{list(expected)} of bucket {e.bucket}")
            arr = load_npy(members[LATENT_MEMBER])  # checks the data's size against the header
            if out.posterior is None:
                out.posterior = files.arrays.empty((out.n, *arr.shape), arr.dtype)
            out.posterior[i] = arr
        if e.latent_array is not None:
            _, h, w, label = e.latent_array
            out.img_hw[i] = (h, w)
        else:  # an index written before it held them (no direct read then: members were read above)
            out.img_hw[i] = json.loads(bytes(members[JSON_MEMBER]))["orig_hw"]
            label = int(bytes(members[CLASS_MEMBER])) if CLASS_MEMBER in members else None
        out.ratio[i] = float(e.bucket)
        out.cls[i] = None if label is None else int(label)

    def _text_check(self, found: LocatedArray, e: Entry, width: int | None) -> int:
        """Its T5 header against the promise: float16 rows [n_tokens of the index, the batch's width]; the width."""
        ok = (found.dtype == FEATURE_DTYPE and not found.fortran and len(found.shape) == 2
              and (e.n_tokens is None or found.shape[0] == e.n_tokens)
              and (width is None or found.shape[1] == width))
        if not ok:
            rows = "n_tokens" if e.n_tokens is None else e.n_tokens
            raise ValueError(f"{e.key}.{T5_MEMBER} is {_describe(found.shape, found.fortran, found.dtype)}, not the "
                             f"{FEATURE_DTYPE.str}[{rows}, {'d' if width is None else width}] its index and batch "
                             "promise")
        return int(found.shape[1])

    def _read_text(self, out: _Batch, entries: list[Entry], urls: list[str], files: TarReader, at: list[str]
                   ) -> None:
        """The batch's T5 rows straight from the files: into their slots of the padded [B, max_tokens, d] text
        (pad_text), or back to back into one array. Row counts come from the index; the first sample (it fixes the
        width) and samples without an array offset are located by their headers, which must agree with the index.
        A direct read whose headers do not check out is redone from the sample's range."""
        plan: list[tuple[int, Entry, str, LocatedArray | None]] = []
        width: int | None = None
        for i, (e, url) in enumerate(zip(entries, urls, strict=True)):
            if i > 0 and e.text_array is not None and e.text_array[1] > 0:
                plan.append((min(e.text_array[1], self.max_tokens), e, url, None))
                continue
            at[:] = url, e.key
            if width is not None and e.n_tokens is not None:
                files.check_span(url, e.text, e.n_tokens * width * FEATURE_DTYPE.itemsize + RANGE_SLACK)
            found = files.locate_array(url, e.text, e.key, T5_MEMBER)
            width = self._text_check(found, e, width)
            plan.append((min(found.shape[0], self.max_tokens), e, url, found))
        assert width is not None
        counts = [n for n, *_ in plan]
        if self.pad_text:
            text = out.new_text((width,), FEATURE_DTYPE)
            dests = [text[i, :n] for i, n in enumerate(counts)]
        else:
            rows = out.new_rows(sum(counts), (width,), FEATURE_DTYPE, self.max_tokens)
            starts = np.cumsum([0, *counts]).tolist()
            dests = [rows[a:b] for a, b in zip(starts, starts[1:], strict=False)]
        for dest, (n, e, url, found) in zip(dests, plan, strict=True):
            at[:] = url, e.key
            if found is None and e.text_array is not None:
                offset, stored = e.text_array
                if files.read_array_rows(url, offset, f"{e.key}.{T5_MEMBER}", dest, n, stored):
                    continue
                files.check_span(url, e.text, stored * width * FEATURE_DTYPE.itemsize + RANGE_SLACK)
                found = files.locate_array(url, e.text, e.key, T5_MEMBER)
                self._text_check(found, e, width)
            assert found is not None
            found.read_into(dest)
        out.finish_text(counts)

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


class _Batch:
    """The arrays of one batch being read; text and posterior come from the pool (`ArrayPool`)."""

    def __init__(self, n: int, max_tokens: int, pool: ArrayPool) -> None:
        self.n, self.max_tokens, self.pool = n, max_tokens, pool
        self.posterior: np.ndarray | None = None
        self.text: np.ndarray | None = None
        self.mask: np.ndarray | None = None
        self.rows: np.ndarray | None = None  # pad_text=False: the valid T5 rows back to back
        self.n_tokens: list[int] = []
        self.img_hw = np.empty((n, 2), dtype=np.float32)
        self.ratio = np.empty(n, dtype=np.float32)
        self.cls: list[int | None] = [None] * n

    def new_text(self, row_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        self.text = self.pool.empty((self.n, self.max_tokens, *row_shape), dtype)
        self.mask = np.zeros((self.n, self.max_tokens), dtype=np.int64)
        return self.text

    def new_rows(self, total: int, row_shape: tuple[int, ...], dtype: np.dtype, max_tokens: int) -> np.ndarray:
        """[total, ...] rows, a view of a pooled array sized for a full batch of max_tokens each (so one shape
        serves every batch; the view keeps the array held while the batch lives)."""
        self.rows = self.pool.empty((self.n * max_tokens, *row_shape), dtype)[:total]
        return self.rows

    def finish_text(self, counts: list[int]) -> None:
        """Sample i holds counts[i] valid rows: padded, zero the rest and set the mask; packed, record the counts."""
        self.n_tokens = counts
        if self.text is not None and self.mask is not None:
            for i, rows in enumerate(counts):
                self.text[i, rows:] = 0
                self.mask[i, :rows] = 1


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
