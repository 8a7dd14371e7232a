"""The bucketed streaming loader: feature shards -> training batches, one aspect-ratio bucket per batch.

    shards = feature_shards(root, "sam", base_size=1024, multi_scale=True, caption_set="llava-...")
    loader = BucketedLoader(shards, batch_size=12, seed=0, rank=rank, world_size=world)
    loader.set_epoch(epoch)
    for batch in loader:            # {"latents" [B,4,h,w] fp32, "text" [B,120,d] fp16, "mask" [B,120], "img_hw" [B,2],
        ...                         #  "aspect_ratio" [B], "keys", (+ "cls" [B] for ImageNet)}
    # sample_posterior=False: "posterior" [B,8,h,w] fp16 and "noise_seed" [B] instead of "latents", for
    # sample_posterior(batch["posterior"].cuda(), batch["noise_seed"]) on the GPU
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
batches are never overwritten. Latents are sampled from the stored posterior, (mean + std * eps) *
scaling_factor, with eps drawn from a generator seeded by (seed, epoch, key): the same sample gets the same noise
whichever rank or worker reads it, and a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pixart.config import ExtractConfig
from pixart.features import latent_urls, text_urls
from storage.commit import is_done
from storage.errors import SourceError
from storage.layout import latents_dir
from storage.parquet import read_rows
from storage.urls import filesystem, open_url
from storage.wds import load_npy, member_spans, npy_layout, sample_members, ustar_member

HEAD_BYTES = 4096  # read first to locate a sample's members: its tar headers and the .npy header
NPY_HEAD = 128  # np.save's header for a 2-D float16 array (format 1.0: magic, version, length, padded dict)
SCALING_FACTOR = 0.18215  # SD VAE latent scale, as PixArt-alpha trains


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
        for i in range(rank, len(shards), world_size):
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
                 drop_last: bool = True, sample_posterior: bool = True) -> None:
        if not shards:
            raise ValueError("no feature shards to load")
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.max_tokens, self.scaling_factor, self.drop_last = max_tokens, scaling_factor, drop_last
        self.sample_posterior = sample_posterior
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

    def collate(self, entries: list[Entry], files: _Files) -> dict[str, Any]:
        """Read one planned batch straight into its batch arrays. Where the index gives a sample's array offset,
        each array is one os.preadv into its slot of the batch, headers checked (`_Files.read_array_rows`);
        otherwise the sample's byte range is read, its members located by their tar headers and copied in. Text is
        padded with zeros as it lands. The first sample of a batch takes the range path: it fixes the shapes."""
        n = len(entries)
        out = _Batch(n, self.max_tokens, files.arrays)
        tars = [self._tars(e) for e in entries]
        ranges = []
        for e, (latent_tar, text_tar) in zip(entries, tars, strict=True):
            ranges.append((latent_tar, e.latent))
            if text_tar is not None:
                ranges.append((text_tar, e.text))
        files.fetch(ranges)  # remote tars: the whole batch's ranges at once
        for i, (e, (latent_tar, text_tar)) in enumerate(zip(entries, tars, strict=True)):
            self._latent_into(out, i, e, latent_tar, files)
            if text_tar is not None:
                self._text_into(out, i, e, text_tar, files)
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

    def _latent_into(self, out: _Batch, i: int, e: Entry, url: str, files: _Files) -> None:
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

    def _text_into(self, out: _Batch, i: int, e: Entry, url: str, files: _Files) -> None:
        if out.text is not None and e.text_array is not None:
            at, n_rows = e.text_array
            rows = min(n_rows, self.max_tokens)
            if files.read_array_rows(url, at, f"{e.key}.t5.npy", out.text[i], rows, n_rows):
                out.pad(i, rows)
                return
        found = files.locate_npy(url, e.text, e.key, "t5.npy")
        if found is None:  # not a plain ustar layout: read it whole
            feats = load_npy(sample_members(files.read(url, e.text), e.key)["t5.npy"])
            shape, dtype = feats.shape, feats.dtype
        else:
            (shape, dtype, data_offset), feats = found, None
        text = out.text if out.text is not None else out.new_text(shape[1:], dtype)  # fp16 as stored
        if shape[1:] != text.shape[2:] or dtype != text.dtype:
            raise ValueError(f"{e.key}: T5 features {dtype}{list(shape)} do not match the batch's "
                             f"{text.dtype}{list(text.shape[1:])}")
        rows = min(shape[0], self.max_tokens)
        if feats is None:  # straight from the file into the batch: no intermediate copy
            files.read_into(url, data_offset, text[i, :rows])
        else:
            text[i, :rows] = feats[:rows]
        out.pad(i, rows)

    def iter_stream(self, worker: int = 0, num_workers: int = 1) -> Iterator[dict[str, Any]]:
        """Batches of one stream, skipping those already consumed (resume)."""
        skip = self.consumed.get(worker, 0)
        with _Files() as files:
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


def sample_posterior(posterior: torch.Tensor, noise_seed: torch.Tensor,
                     scaling_factor: float = SCALING_FACTOR) -> torch.Tensor:
    """Latents [B, C, h, w] fp32 from stored posteriors [B, 2C, h, w] (mean then std):
    (mean + std * eps) * scaling_factor, where sample i's eps comes from a generator on `posterior`'s device seeded
    with noise_seed[i]. The loader calls it on the CPU; with `sample_posterior=False` it hands over the posterior and
    the seeds instead, and training calls it on the GPU (same seeds; CUDA's generator draws other numbers than the
    CPU's, so a run keeps to one kind of device)."""
    mean, std = posterior.float().chunk(2, dim=1)
    eps = torch.empty_like(mean)
    gen = torch.Generator(device=posterior.device)
    for i, seed in enumerate(noise_seed.tolist()):
        eps[i].normal_(generator=gen.manual_seed(seed))
    return mean.add_(std.mul_(eps)).mul_(scaling_factor)


class _Batch:
    """The arrays of one batch being read; text and posterior come from the pool (`ArrayPool`)."""

    def __init__(self, n: int, max_tokens: int, pool: ArrayPool) -> None:
        self.n, self.max_tokens, self.pool = n, max_tokens, pool
        self.posterior: np.ndarray | None = None
        self.text: np.ndarray | None = None
        self.mask: np.ndarray | None = None
        self.img_hw = np.empty((n, 2), dtype=np.float32)
        self.ratio = np.empty(n, dtype=np.float32)
        self.cls: list[int] = []

    def new_text(self, row_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        self.text = self.pool.empty((self.n, self.max_tokens, *row_shape), dtype)
        self.mask = np.zeros((self.n, self.max_tokens), dtype=np.int64)
        return self.text

    def pad(self, i: int, rows: int) -> None:
        """Sample i holds `rows` valid rows: zero the rest, set its mask."""
        assert self.text is not None and self.mask is not None
        self.text[i, rows:] = 0
        self.mask[i, :rows] = 1


class ArrayPool:
    """Batch arrays handed out again once nothing outside the pool holds them, so a training loop does not pay
    page faults and kernel zeroing for a fresh 30 MB text batch every step. An array is reused only when its
    reference count shows the pool's own references alone: a batch the consumer still holds, a torch tensor made
    from it by `torch.from_numpy` (its storage keeps the array alive, views included) or any numpy view of it keeps
    it out. Contents of a reused array are stale: callers overwrite every element. At most `limit` arrays are
    pooled (the oldest is forgotten first), so memory stays bounded whatever the mix of shapes."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self.arrays: list[np.ndarray] = [np.empty(0)]
        self.unheld = self._refs(0)  # calibrated: the count of an array only the pool holds
        self.arrays.clear()

    def _refs(self, i: int) -> int:
        return sys.getrefcount(self.arrays[i])

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        for i in range(len(self.arrays)):
            if self.arrays[i].shape == shape and self.arrays[i].dtype == dtype and self._refs(i) == self.unheld:
                arr = self.arrays.pop(i)
                self.arrays.append(arr)
                return arr
        arr = np.empty(shape, dtype)
        self.arrays.append(arr)
        if len(self.arrays) > self.limit:
            del self.arrays[0]
        return arr


class _Files:
    """Open tar files of one stream, and one reused read buffer (a sample's arrays are copied out of it before the
    next read). Local files are read with os.preadv (one call, no buffering layer, straight into the target).
    Remote ones (s3://, gs://...) get each batch's sample ranges fetched at once beforehand (`fetch`): exact range
    requests, concurrent where the filesystem is async, instead of one buffered file read per sample."""

    def __init__(self) -> None:
        self.open: dict[str, Any] = {}
        self.local: dict[str, bool] = {}
        self.fetched: dict[tuple[str, tuple[int, int]], bytes] = {}
        self.buffer = bytearray(1 << 20)
        self.head = memoryview(bytearray(512 + NPY_HEAD))  # a member's tar header and its .npy header
        self.arrays = ArrayPool()

    def is_local(self, tar_url: str) -> bool:
        found = self.local.get(tar_url)
        if found is None:
            protocol = filesystem(tar_url)[0].protocol
            found = self.local[tar_url] = "file" in (protocol if isinstance(protocol, tuple) else (protocol,))
        return found

    def fetch(self, ranges: list[tuple[str, tuple[int, int]]]) -> None:
        """Fetch the given (tar URL, (offset, length)) ranges of remote tars with one fsspec `cat_ranges` call per
        filesystem (s3fs and other async filesystems send the requests concurrently); `read` then serves them from
        memory, once each. Local ranges are skipped: they are read with os.preadv when needed."""
        groups: dict[int, tuple[Any, list[tuple[str, str, tuple[int, int]]]]] = {}
        for url, span in ranges:
            if not self.is_local(url) and (url, span) not in self.fetched:
                fs, path = filesystem(url)
                groups.setdefault(id(fs), (fs, []))[1].append((url, path, span))
        for fs, items in groups.values():
            got = fs.cat_ranges([p for _, p, _ in items], [sp[0] for _, _, sp in items],
                                [sp[0] + sp[1] for _, _, sp in items], on_error="return")
            for (url, _, (offset, length)), data in zip(items, got, strict=True):
                if isinstance(data, BaseException):
                    raise SourceError(f"{url}: reading bytes {offset}-{offset + length} failed: "
                                      f"{type(data).__name__}: {data}") from data
                if len(data) != length:
                    raise ValueError(f"{url}: short read at byte {offset} ({len(data)} of {length} bytes): "
                                     "truncated shard?")
                self.fetched[(url, (offset, length))] = data

    def read(self, tar_url: str, span: tuple[int, int]) -> memoryview:
        data = self.fetched.pop((tar_url, span), None)
        if data is not None:
            return memoryview(data)
        offset, length = span
        if length > len(self.buffer):
            self.buffer = bytearray(length)
        view = memoryview(self.buffer)[:length]
        self._pread(tar_url, offset, view)
        return view

    def _file(self, tar_url: str) -> Any:
        """An open tar: an OS file descriptor (int) for local files, an fsspec file otherwise."""
        f = self.open.get(tar_url)
        if f is None:
            path = filesystem(tar_url)[1]
            f = self.open[tar_url] = os.open(path, os.O_RDONLY) if self.is_local(tar_url) else open_url(tar_url, "rb")
        return f

    def _pread(self, tar_url: str, offset: int, view: memoryview) -> None:
        f = self._file(tar_url)
        if isinstance(f, int):
            got = os.preadv(f, [view], offset)
        else:
            f.seek(offset)
            got = f.readinto(view) if hasattr(f, "readinto") else _read_into(f, view)
        if got != len(view):
            raise ValueError(f"{tar_url}: short read at byte {offset} ({got} of {len(view)} bytes): truncated shard?")

    def locate_npy(self, tar_url: str, span: tuple[int, int], key: str, ext: str
                   ) -> tuple[tuple[int, ...], np.dtype, int] | None:
        """(shape, dtype, file offset of the data) of one sample's C-order .npy member, from the first bytes of its
        range; None where the headers do not fit there or are not plain ustar, or the tar is remote (then read the
        range whole: it was fetched with the batch)."""
        if not self.is_local(tar_url):
            return None
        head = self.read(tar_url, (span[0], min(span[1], HEAD_BYTES)))
        spans = member_spans(head, key, span[1])
        if spans is None or ext not in spans or spans[ext][0] + min(spans[ext][1], 1024) > len(head):
            return None
        start, size = spans[ext]
        shape, fortran, dtype, data = npy_layout(head[start:start + size])
        if fortran:
            return None
        if size - data != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{tar_url}: {key}.{ext} holds {size - data} data bytes, its header says "
                             f"{math.prod(shape) * dtype.itemsize}")
        return shape, dtype, span[0] + start + data

    def read_array_rows(self, tar_url: str, at: int, name: str, out: np.ndarray, rows: int, n_rows: int) -> bool:
        """Fill out[:rows] with the first rows of the stored [n_rows, ...] array `name` whose tar header starts at
        byte `at` of a local tar, in one os.preadv: the tar header and a standard 128-byte .npy header land in a
        scratch buffer, the rows straight in `out`. The headers are then checked: a plain ustar header with a valid
        checksum, the member's name, and the .npy shape, dtype and size. False (out[:rows] then holds garbage) when
        the file is remote or any check fails; the caller reads the sample's range instead, which either succeeds
        or says what is wrong."""
        if not self.is_local(tar_url) or at < 0 or not 0 <= rows <= min(n_rows, len(out)):
            return False
        f = self._file(tar_url)
        target = memoryview(out[:rows].reshape(-1)).cast("B")
        if os.preadv(f, [self.head, target], at) != len(self.head) + len(target):
            return False
        try:
            member = ustar_member(bytes(self.head[:512]))
            if member is None or member[0] != name:
                return False
            shape, fortran, dtype, data = npy_layout(self.head[512:])
        except ValueError:  # a bad checksum, a longer .npy header: the range read reports it, or copes
            return False
        return (data == NPY_HEAD and not fortran and dtype == out.dtype and shape == (n_rows, *out.shape[1:])
                and member[1] == data + math.prod(shape) * dtype.itemsize)

    def read_into(self, tar_url: str, offset: int, out: np.ndarray) -> None:
        """Fill the C-contiguous array `out` with the bytes at `offset` (its first rows of a stored array)."""
        self._pread(tar_url, offset, memoryview(out.reshape(-1)).cast("B"))

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.open.values():
            os.close(f) if isinstance(f, int) else f.close()


def _read_into(f: Any, view: memoryview) -> int:
    data = f.read(len(view))
    view[: len(data)] = data
    return len(data)


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
    with _Files() as files:
        lat = load_npy(sample_members(files.read(shard.latents.removesuffix(".parquet") + ".tar", e.latent),
                                      e.key)["latent.npy"])
        width = None
        if shard.text is not None and e.text is not None:
            width = int(load_npy(sample_members(files.read(shard.text.removesuffix(".parquet") + ".tar", e.text),
                                                e.key)["t5.npy"]).shape[1])
        return {"latent": tuple(lat.shape), "text_width": width, "bucket": e.bucket}


class Prefetch:
    """Iterate `source` in a background thread, up to `depth` items ahead, in order, so reading and collating the
    next batch overlaps the training step (file reads and array copies release the GIL). `pin=True` pins each
    batch's tensors for asynchronous host-to-GPU copies. An exception in the source is raised at the consumer."""

    _END = object()

    def __init__(self, source: Iterator[dict[str, Any]], depth: int = 2, pin: bool = False) -> None:
        import threading

        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.pin = pin
        self.thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="pixart-prefetch")
        self.thread.start()

    def _run(self, source: Iterator[dict[str, Any]]) -> None:
        try:
            for item in source:
                if self.pin:
                    item = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:  # retry until the consumer takes it, or stops
                        continue
                if self.stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.queue.put(e)
            return
        self.queue.put(self._END)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
