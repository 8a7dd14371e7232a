"""The bucketed streaming loader: feature shards -> training batches, one aspect-ratio bucket per batch.

    shards = feature_shards(root, "sam", base_size=1024, multi_scale=True, caption_set="llava-...")
    loader = BucketedLoader(shards, batch_size=12, seed=0, rank=rank, world_size=world)
    loader.set_epoch(epoch)
    for batch in loader:            # {"latents" [B,4,h,w] fp32, "text" [B,120,d] fp16, "mask" [B,120], "img_hw" [B,2],
        ...                         #  "aspect_ratio" [B], "keys", (+ "cls" [B] for ImageNet)}
    state = loader.state_dict()     # resume mid-epoch: load_state_dict(state) replays exactly the remaining batches

How a batch is planned. Only the parquet indexes are read to plan: the epoch's shard order is a permutation seeded
by (seed, epoch); shard i goes to stream i mod (world_size x dataloader workers), so ranks and workers never share
a shard; within a shard the keys are shuffled (seed, epoch, shard). Each stream fills one buffer per bucket and emits
a batch whenever a buffer reaches `batch_size`, as PixArt's AspectRatioBatchSampler does; with drop_last the
leftovers are dropped. Text and latents are joined by key (a key missing or in error on either side is skipped).

How a batch is read. Each sample is one range read of its members (offset and length from the index) in the
latent tar and, for text, the text tar; arrays come through np.load(allow_pickle=False). T5 features are padded
with zeros to `max_tokens` and the mask rebuilt. Latents are sampled from the stored posterior,
(mean + std * eps) * scaling_factor, with eps drawn from a generator seeded by (seed, epoch, key): the same sample
gets the same noise whichever rank or worker reads it, and a resumed run sees exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pixart.config import ExtractConfig
from pixart.features import latent_urls, text_urls
from storage.commit import is_done
from storage.layout import latents_dir
from storage.parquet import read_rows
from storage.urls import filesystem, open_url
from storage.wds import read_sample

SCALING_FACTOR = 0.18215  # SD VAE latent scale, as PixArt-alpha trains


@dataclass(frozen=True)
class FeatureShard:
    """One shard's latent index (and text index, for captioned datasets), both committed."""

    name: str
    latents: str
    text: str | None = None


@dataclass(frozen=True)
class Entry:
    shard: int
    key: str
    bucket: str
    latent: tuple[int, int]
    text: tuple[int, int] | None


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


def shard_entries(index: int, shard: FeatureShard) -> list[Entry]:
    """The samples of one shard that are ok on every side, in index order."""
    text = {}
    if shard.text is not None:
        rows = read_rows(shard.text, ["key", "offset", "bytes", "status"])
        text = {r["key"]: (r["offset"], r["bytes"]) for r in rows if r["status"] == "ok"}
    out = []
    for r in read_rows(shard.latents, ["key", "bucket", "offset", "bytes", "status"]):
        if r["status"] != "ok" or (shard.text is not None and r["key"] not in text):
            continue
        out.append(Entry(index, r["key"], r["bucket"], (r["offset"], r["bytes"]), text.get(r["key"])))
    return out


class BucketedLoader:
    """See the module docstring. Iterate it directly, or through `torch.utils.data.DataLoader(loader.dataset(),
    batch_size=None, num_workers=N)` with `loader.track(batch)` on each batch to keep `state_dict` exact."""

    def __init__(self, shards: list[FeatureShard], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, max_tokens: int = 120, scaling_factor: float = SCALING_FACTOR,
                 drop_last: bool = True) -> None:
        if not shards:
            raise ValueError("no feature shards to load")
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.max_tokens, self.scaling_factor, self.drop_last = max_tokens, scaling_factor, drop_last
        self.epoch = 0
        self.consumed: dict[int, int] = {}  # per dataloader worker: batches handed to training this epoch
        self.num_workers = 1

    # -- plan ------------------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, {}

    def stream_shards(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        order = _rng(self.seed, self.epoch).permutation(len(self.shards)).tolist()
        streams = self.world_size * num_workers
        return order[self.rank * num_workers + worker::streams]

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

    def _sample(self, e: Entry, files: dict[str, Any]) -> dict[str, Any]:
        shard = self.shards[e.shard]
        lat = read_sample(_read(files, shard.latents.removesuffix(".parquet") + ".tar", e.latent))
        latent = np.load(io.BytesIO(lat["latent.npy"]), allow_pickle=False).astype(np.float32)
        mean, std = np.split(latent, 2, axis=0)
        eps = torch.from_numpy(mean).new_empty(mean.shape).normal_(
            generator=torch.Generator().manual_seed(int(_rng(self.seed, self.epoch, e.key).integers(2**62))))
        meta = json.loads(lat["json"])
        out = {"latents": (torch.from_numpy(mean) + torch.from_numpy(std) * eps) * self.scaling_factor,
               "img_hw": torch.tensor(meta["orig_hw"], dtype=torch.float32),
               "aspect_ratio": torch.tensor(float(meta["bucket"]), dtype=torch.float32), "key": e.key}
        if "cls" in lat:
            out["cls"] = torch.tensor(int(lat["cls"]), dtype=torch.long)
        if e.text is not None:
            txt = read_sample(_read(files, shard.text.removesuffix(".parquet") + ".tar", e.text))
            feats = np.load(io.BytesIO(txt["t5.npy"]), allow_pickle=False)[: self.max_tokens]
            padded = np.zeros((self.max_tokens, feats.shape[1]), dtype=feats.dtype)  # fp16 as stored: half the copy
            padded[: len(feats)] = feats
            mask = torch.zeros(self.max_tokens, dtype=torch.long)
            mask[: len(feats)] = 1
            out.update(text=torch.from_numpy(padded), mask=mask)
        return out

    def collate(self, entries: list[Entry], files: dict[str, Any]) -> dict[str, Any]:
        samples = [self._sample(e, files) for e in entries]
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "key"}
        batch["keys"] = [s["key"] for s in samples]
        return batch

    def iter_stream(self, worker: int = 0, num_workers: int = 1) -> Iterator[dict[str, Any]]:
        """Batches of one stream, skipping those already consumed (resume)."""
        skip = self.consumed.get(worker, 0)
        files: dict[str, Any] = {}
        try:
            for index, entries in enumerate(self.plan(worker, num_workers)):
                if index < skip:
                    continue
                batch = self.collate(entries, files)
                batch.update(worker=worker, index=index)
                yield batch
        finally:
            for f in files.values():
                f.close()

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


def _read(files: dict[str, Any], tar_url: str, span: tuple[int, int]) -> bytes:
    if tar_url not in files:
        files[tar_url] = open_url(tar_url, "rb")
    f = files[tar_url]
    f.seek(span[0])
    return f.read(span[1])


class _StreamDataset(torch.utils.data.IterableDataset):
    """The loader as an IterableDataset: each DataLoader worker reads its own streams (shards)."""

    def __init__(self, loader: BucketedLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.loader.iter_stream(worker, num)
