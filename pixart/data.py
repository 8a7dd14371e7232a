"""The bucketed streaming loader: feature shards -> training batches, one aspect-ratio bucket per batch.

    shards = feature_shards(root, "sam", base_size=1024, multi_scale=True, caption_set="llava-...")
    loader = BucketedLoader(shards, batch_size=12, seed=0, rank=rank, world_size=world)
    loader.set_epoch(epoch)
    for batch in loader:            # {"latents" [B,4,h,w] fp32, "text" [B,120,d] fp16, "mask" [B,120], "img_hw" [B,2],
        ...                         #  "aspect_ratio" [B], "keys", (+ "cls" [B] for ImageNet)}
    # sample_posterior=False: "posterior" [B,8,h,w] fp16 and "noise_seed" [B] instead of "latents", for
    # pixart.finish.sample_posterior(batch["posterior"].cuda(), batch["noise_seed"]) on the GPU
    # pad_text=False: "text_rows" [sum of n_tokens, d] fp16 (the valid rows, sample after sample) and "n_tokens" [B]
    # instead of "text" and "mask", for pixart.finish.pad_text(batch["text_rows"].cuda(), batch["n_tokens"])
    state = loader.state_dict()     # resume mid-epoch: load_state_dict(state) replays exactly the remaining batches

How a batch is planned. Only the parquet indexes are read to plan: shard i goes to stream i mod (world_size x
dataloader workers), so ranks and workers never share a shard; a stream's shards come in an order permuted by
(seed, epoch), and within a shard the keys are shuffled (seed, epoch, shard). Each stream fills one buffer per
bucket and emits a batch whenever a buffer reaches `batch_size`, as PixArt's AspectRatioBatchSampler does; with
drop_last the leftovers are dropped, so a stream yields the same number of batches every epoch. Text and latents
are joined by key (a key missing or in error on either side is skipped).

How a batch is read. The indexes give each sample's byte range and (those with `array_offset`) the offset of its
.npy member and the fields its json holds (orig size, class). Such arrays are read with one os.preadv each: the
member's tar header and .npy header into a scratch buffer, the data straight into the sample's slot of the batch
array, then the headers are checked (name, checksum, shape, dtype, size); a check that fails, a remote file or an
older index sends the sample down the range path (the range read, members located by their tar headers, arrays
through `load_npy`, which never unpickles). The first sample of each batch takes the range path: it fixes the
batch's shapes. T5 features are padded with zeros to `max_tokens` and the mask rebuilt; the [B, 120, d] text array
comes from a pool that hands an array out again only once nothing else references it (`ArrayPool`), so held
batches are never overwritten. With pad_text=False the valid rows are read back to back into one pooled array
instead (no padding to zero, and about 40 % fewer bytes to pin and send at LLaVA caption lengths); `pad_text`
pads them on the training device. Latents are sampled from the stored posterior, (mean + std * eps) *
scaling_factor, with eps drawn from a generator seeded by (seed, epoch, key): the same sample gets the same noise
whichever rank or worker reads it, and a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pixart.config import ExtractConfig
from pixart.features import latent_urls, text_urls
from pixart.finish import SCALING_FACTOR, sample_posterior
from pixart.tar_reads import ArrayPool, LocatedArray, TarReader
from storage.commit import is_done
from storage.layout import latents_dir
from storage.parquet import read_rows
from storage.urls import filesystem
from storage.wds import load_npy, sample_members


@dataclass(frozen=True)
class FeatureShard:
    """One shard's latent index (and text index, for captioned datasets), both committed."""

    name: str
    latents: str
    text: str | None = None


@dataclass(frozen=True)
class Entry:
    """One sample as its shards' indexes describe it: byte ranges, plus what lets it be read directly (the tar
    offset of its .npy member and the fields its json would give), when the index has them."""

    shard: int
    key: str
    bucket: str
    latent: tuple[int, int]
    text: tuple[int, int] | None
    text_array: tuple[int, int] | None = None  # (offset of its .t5.npy member, n_tokens)
    latent_array: tuple[int, int, int, int | None] | None = None  # (offset of its .latent.npy, orig h, w, label)


def feature_shards(root: str, dataset: str, base_size: int, multi_scale: bool = False,
                   caption_set: str | None = None) -> list[FeatureShard]:
    """Committed latent shards (joined with the caption set's text shards when given), in name order. A latent
    shard whose text shard is not committed yet is left out."""
    cfg = ExtractConfig(dataset=dataset, what="latents", base_size=base_size, multi_scale=multi_scale,
                        caption_set=caption_set, output_root=root)
    fs, path = filesystem(latents_dir(root, dataset, base_size, multi_scale))
    names = sorted(p.rsplit("/", 1)[-1].removesuffix(".parquet") for p in fs.glob(f"{path}/*.parquet")
                   if not p.endswith("/buckets.parquet"))
    shards = []
    for name in names:
        lat = latent_urls(cfg, name)[1]
        txt = text_urls(cfg, name)[1] if caption_set else None
        if is_done(lat) and (txt is None or is_done(txt)):
            shards.append(FeatureShard(name, lat, txt))
    return shards


def _rng(*parts: Any) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def batches_per_rank(shards: list[FeatureShard], batch_size: int, world_size: int, threads: int = 16) -> list[int]:
    """Full batches (drop_last) that each rank's loader yields per epoch, the same in every epoch: per rank, the sum
    over buckets of (samples of that bucket in its shards) // batch_size, since each bucket's buffer carries across
    shards. Every index is read once, `threads` at a time (object stores answer in parallel)."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        counts = list(pool.map(lambda item: Counter(e.bucket for e in shard_entries(*item)), enumerate(shards)))
    out = []
    for rank in range(world_size):
        total: Counter = Counter()
        for i in BucketedLoader(shards, batch_size, rank=rank, world_size=world_size).stream_shards():
            total.update(counts[i])
        out.append(sum(n // batch_size for n in total.values()))
    return out


def shard_entries(index: int, shard: FeatureShard) -> list[Entry]:
    """The samples of one shard that are ok on every side, in index order."""
    text = {}
    if shard.text is not None:
        for r in read_rows(shard.text):  # array_offset is absent from indexes written before it existed
            if r["status"] == "ok":
                direct = None if r.get("array_offset") is None else (r["array_offset"], r["n_tokens"])
                text[r["key"]] = (r["offset"], r["bytes"]), direct
    out = []
    for r in read_rows(shard.latents):
        if r["status"] != "ok" or (shard.text is not None and r["key"] not in text):
            continue
        span, direct = text.get(r["key"], (None, None))
        latent = None
        if r.get("array_offset") is not None and r.get("orig_h") is not None:
            latent = (r["array_offset"], r["orig_h"], r["orig_w"], r.get("label"))
        out.append(Entry(index, r["key"], r["bucket"], (r["offset"], r["bytes"]), span, direct, latent))
    return out


class BucketedLoader:
    """See the module docstring. Iterate it directly, or through `torch.utils.data.DataLoader(loader.dataset(),
    batch_size=None, num_workers=N)` with `loader.track(batch)` on each batch to keep `state_dict` exact."""

    def __init__(self, shards: list[FeatureShard], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, max_tokens: int = 120, scaling_factor: float = SCALING_FACTOR,
                 drop_last: bool = True, sample_posterior: bool = True, pad_text: bool = True) -> None:
        if not shards:
            raise ValueError("no feature shards to load")
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.max_tokens, self.scaling_factor, self.drop_last = max_tokens, scaling_factor, drop_last
        self.sample_posterior, self.pad_text = sample_posterior, pad_text
        self.epoch = 0
        self.consumed: dict[int, int] = {}  # per dataloader worker: batches handed to training this epoch
        self.num_workers = 1

    # -- plan ------------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, {}

    def stream_shards(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """This stream's shards in this epoch's order. Which shards a stream gets is fixed (shard i goes to stream
        i mod streams), only their order changes by epoch: so every epoch gives each rank the same number of
        batches (`batches_per_rank`), and equal step counts across ranks hold in every epoch."""
        order = _rng(self.seed, self.epoch).permutation(len(self.shards)).tolist()
        streams = self.world_size * num_workers
        stream = self.rank * num_workers + worker
        return [i for i in order if i % streams == stream]

    def plan(self, worker: int = 0, num_workers: int = 1) -> Iterator[list[Entry]]:
        """The batches of one stream this epoch, in order, from the indexes alone."""
        buffers: dict[str, list[Entry]] = {}
        for i in self.stream_shards(worker, num_workers):
            entries = shard_entries(i, self.shards[i])
            for j in _rng(self.seed, self.epoch, self.shards[i].name).permutation(len(entries)).tolist():
                e = entries[j]
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

    def collate(self, entries: list[Entry], files: TarReader) -> dict[str, Any]:
        """Read one planned batch straight into its batch arrays. Where the index gives a sample's array offset,
        each array is one os.preadv into its slot of the batch, headers checked (`TarReader.read_array_rows`);
        otherwise the sample's byte range is read, its members located by their tar headers and copied in
        (`_read_text` for the T5 rows). The first sample of a batch takes the range path: it fixes the shapes."""
        n = len(entries)
        out = _Batch(n, self.max_tokens, files.arrays)
        tars = [self._tars(e) for e in entries]
        ranges = []
        for e, (latent_tar, text_tar) in zip(entries, tars, strict=True):
            ranges.append((latent_tar, e.latent))
            if text_tar is not None:
                ranges.append((text_tar, e.text))
        files.fetch(ranges)  # remote tars: the whole batch's ranges at once
        for i, (e, (latent_tar, _)) in enumerate(zip(entries, tars, strict=True)):
            self._latent_into(out, i, e, latent_tar, files)
        text_tars = [text for _, text in tars]
        if all(text_tars):
            self._read_text(out, entries, text_tars, files)
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
        if out.cls:
            if len(out.cls) != n:
                raise ValueError(f"batch {[e.key for e in entries]}: only {len(out.cls)} of {n} samples have a class")
            batch["cls"] = torch.tensor(out.cls, dtype=torch.long)
        batch["keys"] = [e.key for e in entries]
        return batch

    def _tars(self, e: Entry) -> tuple[str, str | None]:
        shard = self.shards[e.shard]
        text = None if e.text is None or shard.text is None else shard.text.removesuffix(".parquet") + ".tar"
        return shard.latents.removesuffix(".parquet") + ".tar", text

    def _latent_into(self, out: _Batch, i: int, e: Entry, url: str, files: TarReader) -> None:
        if out.posterior is not None and e.latent_array is not None:
            at, h, w, label = e.latent_array
            if files.read_array_rows(url, at, f"{e.key}.latent.npy", out.posterior[i], len(out.posterior[i]),
                                     len(out.posterior[i])):
                out.img_hw[i], out.ratio[i] = (h, w), float(e.bucket)
                if label is not None:
                    out.cls.append(int(label))
                return
        lat = sample_members(files.read(url, e.latent), e.key)
        arr = load_npy(lat["latent.npy"])
        if out.posterior is None:
            out.posterior = files.arrays.empty((out.n, *arr.shape), arr.dtype)
        if arr.shape != out.posterior.shape[1:]:
            raise ValueError(f"{e.key}: latent shape {arr.shape} differs from its batch's {out.posterior.shape[1:]}"
                             f" in bucket {e.bucket}")
        out.posterior[i] = arr
        meta = json.loads(bytes(lat["json"]))
        out.img_hw[i], out.ratio[i] = meta["orig_hw"], float(meta["bucket"])
        if "cls" in lat:
            out.cls.append(int(bytes(lat["cls"])))

    def _read_text(self, out: _Batch, entries: list[Entry], urls: list[str], files: TarReader) -> None:
        """The batch's T5 rows straight from the files: into their slots of the padded [B, max_tokens, d] text
        (pad_text), or back to back into one array. Row counts come from the index where it has the array's offset;
        the first sample (it fixes the width) and samples without one are located by their headers. A direct read
        whose headers do not check out is redone from the sample's range; if that gives another row count than its
        index, the batch is laid out again from the headers alone."""
        for trust_index in (True, False):
            plan: list[tuple[int, Entry, str, LocatedArray | None]] = []
            for i, (e, url) in enumerate(zip(entries, urls, strict=True)):
                if trust_index and i > 0 and e.text_array is not None and e.text_array[1] > 0:
                    plan.append((min(e.text_array[1], self.max_tokens), e, url, None))
                else:
                    found = files.locate_array(url, e.text, e.key, "t5.npy")
                    if plan:
                        first = plan[0][3]
                        assert first is not None
                        found.check(first.shape[1:], first.dtype)
                    plan.append((min(found.shape[0], self.max_tokens), e, url, found))
            head = plan[0][3]
            assert head is not None
            counts = [n for n, *_ in plan]
            if self.pad_text:
                text = out.new_text(head.shape[1:], head.dtype)  # fp16 as stored
                dests = [text[i, :n] for i, n in enumerate(counts)]
            else:
                rows = out.new_rows(sum(counts), head.shape[1:], head.dtype, self.max_tokens)
                starts = np.cumsum([0, *counts]).tolist()
                dests = [rows[a:b] for a, b in zip(starts, starts[1:], strict=False)]
            for dest, (n, e, url, found) in zip(dests, plan, strict=True):
                if found is None and e.text_array is not None:
                    at, stored = e.text_array
                    if files.read_array_rows(url, at, f"{e.key}.t5.npy", dest, n, stored):
                        continue
                    found = files.locate_array(url, e.text, e.key, "t5.npy")
                    found.check(head.shape[1:], head.dtype)
                    if min(found.shape[0], self.max_tokens) != n:
                        break  # the index's n_tokens is wrong: lay the batch out from the headers
                assert found is not None
                found.read_into(dest)
            else:
                out.finish_text(counts)
                return

    def iter_stream(self, worker: int = 0, num_workers: int = 1) -> Iterator[dict[str, Any]]:
        """Batches of one stream, skipping those already consumed (resume)."""
        skip = self.consumed.get(worker, 0)
        with TarReader() as files:
            for index, entries in enumerate(self.plan(worker, num_workers)):
                if index < skip:
                    continue
                batch = self.collate(entries, files)
                batch.update(worker=worker, index=index)
                yield batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.num_workers = 1
        for batch in self.iter_stream():
            self.track(batch)
            yield batch

    # -- DataLoader workers and resume --------------------------------------------------------------------------------

    def dataset(self) -> torch.utils.data.IterableDataset:
        return _StreamDataset(self)

    def track(self, batch: dict[str, Any]) -> None:
        """Record that training received this batch (call it on each batch from a DataLoader)."""
        self.consumed[int(batch["worker"])] = int(batch["index"]) + 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "consumed": dict(self.consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has {self.seed}")
        self.epoch = int(state["epoch"])
        self.consumed = {int(k): int(v) for k, v in state["consumed"].items()}


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
        self.cls: list[int] = []

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
    """The loader as an IterableDataset: each DataLoader worker reads its own streams (shards)."""

    def __init__(self, loader: BucketedLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.loader.iter_stream(worker, num)


def peek(shard: FeatureShard) -> dict[str, Any]:
    """Shapes of one shard's first sample: {"latent": (2C, h, w), "text_width": C or None, "bucket": key}."""
    entries = shard_entries(0, shard)
    if not entries:
        raise ValueError(f"{shard.latents}: no sample that is ok on every side")
    e = entries[0]
    with TarReader() as files:
        lat = load_npy(sample_members(files.read(shard.latents.removesuffix(".parquet") + ".tar", e.latent),
                                      e.key)["latent.npy"])
        width = None
        if shard.text is not None and e.text is not None:
            width = int(load_npy(sample_members(files.read(shard.text.removesuffix(".parquet") + ".tar", e.text),
                                                e.key)["t5.npy"]).shape[1])
        return {"latent": tuple(lat.shape), "text_width": width, "bucket": e.bucket}
