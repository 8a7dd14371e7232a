"""Reading one planned batch of the bucketed loader (`pixart.data.loader`) straight into its batch arrays, and
checking every byte it reads against what the feature format promises (`pixart.features.format`).

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
from typing import Any

import numpy as np
import torch

from pixart.buckets import bucket_table
from pixart.data.finish import sample_posterior
from pixart.data.index import Entry, FeatureShard
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

VAE_FACTOR = 8  # latent pixels per image pixel, each side
RANGE_SLACK = 1 << 20  # a sample's range beyond its array's data: tar headers, the .npy header, json, class
MAX_T5_WIDTH = 4096  # d_model of T5-XXL (v1.1 and Flan), the widest T5: a text range's bound before its width is seen
MAX_STORED_TOKENS = 512  # T5's pre-training input length; features stored with more rows than this (and than the
# loader's max_tokens) are refused. PixArt-alpha keeps 120, Sigma 300; rows past max_tokens are read and dropped.


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


class BatchReader:
    """How `BucketedLoader` reads a batch: `collate(entries, files)`. Reads the loader's settings: `shards`, `seed`,
    `epoch` (the noise seeds), `max_tokens`, `pad_text`, `sample_posterior` and `scaling_factor`."""

    shards: list[FeatureShard]
    seed: int
    epoch: int
    max_tokens: int
    pad_text: bool
    sample_posterior: bool
    scaling_factor: float


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
                    files.check_span(text_tar, e.text, self._text_limit(files.text_widths.get(text_tar)))
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

    def _text_limit(self, width: int | None) -> int:
        """The longest sample range a text feature can need: max_tokens (at least MAX_STORED_TOKENS) rows of
        `width` (MAX_T5_WIDTH until a header of the tar has shown it) float16 values, plus the headers. Checked
        before anything is fetched or allocated; `_read_text` then bounds each range by its index's n_tokens."""
        rows = max(self.max_tokens, MAX_STORED_TOKENS)
        return rows * (width or MAX_T5_WIDTH) * FEATURE_DTYPE.itemsize + RANGE_SLACK

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
            files.text_widths[url] = width  # later batches bound this tar's ranges by it (`_text_limit`)
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
