"""Reading feature tars for the loader (`pixart/data/loader.py`): one stream's open tars (`TarReader`) and the pool its
batch arrays come from (`ArrayPool`).

Local tars are read with os.preadv: an array whose offset the index gives lands straight in its slot of the batch,
its headers read in the same call and checked (`read_array_rows`); otherwise a sample's byte range is read into a
reused buffer (`read`), or its headers located first so T5 rows can still be read straight in (`locate_array`:
a `LocatedArray`). Remote tars (s3://, gs://...) get each batch's ranges fetched at once beforehand (`fetch`).

Nothing is allocated or read on the index's word alone: `check_span` bounds a sample's range by the tar's real size
(local tars; a remote read returns at most what the object holds) and by what its array can need. Every error about
one sample is a `FeatureError` naming the tar and the key (`naming`).
"""

from __future__ import annotations

import math
import os
import stat
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from storage.errors import PipelineError, SourceError, is_transient
from storage.urls import filesystem, open_url
from storage.wds import load_npy, member_spans, npy_layout, sample_members, ustar_member

HEAD_BYTES = 4096  # read first to locate a sample's members: its tar headers and the .npy header
NPY_HEAD = 128  # np.save's header for a 2-D float16 array (format 1.0: magic, version, length, padded dict)


class FeatureError(PipelineError, ValueError):
    """A feature shard (tar or index) that is not what its index promises, for one sample: the message names the
    file and the key. Permanent unless it wraps an I/O error that may pass (`transient`)."""


READ_ERRORS = (ValueError, KeyError, OSError, tarfile.TarError)  # what reading one sample can raise


def named(url: str, key: str, err: BaseException) -> FeatureError:
    """`err`, met reading sample `key` of `url`, as a `FeatureError` that names both (raise it `from err`)."""
    if isinstance(err, FeatureError):
        return err
    text = str(err).removeprefix(f"{url}: ")
    if not isinstance(err, ValueError):
        text = f"{type(err).__name__}: {text}"
    error = FeatureError(f"{url}: sample {key}: {text}")
    error.transient = is_transient(err)
    return error


@contextmanager
def naming(url: str, key: str) -> Iterator[None]:
    """Re-raise any error reading sample `key` of `url` as a `FeatureError` that names both (`named`)."""
    try:
        yield
    except READ_ERRORS as err:
        error = named(url, key, err)
        if error is err:
            raise
        raise error from err


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


class TarReader:
    """Open tar files of one stream, and one reused read buffer (a sample's arrays are copied out of it before the
    next read). Local files are read with os.preadv (one call, no buffering layer, straight into the target).
    Remote ones (s3://, gs://...) get each batch's sample ranges fetched at once beforehand (`fetch`): exact range
    requests, concurrent where the filesystem is async, instead of one buffered file read per sample."""

    def __init__(self) -> None:
        self.open: dict[str, Any] = {}
        self.sizes: dict[str, int] = {}  # local tars: their size when opened; remote ones: -1
        self.local: dict[str, bool] = {}
        self.text_widths: dict[str, int] = {}  # text tars: the T5 width their checked headers showed
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

    def check_span(self, tar_url: str, span: tuple[int, int], limit: int | None = None) -> None:
        """Refuse a sample range that the tar cannot hold (a local tar's real size) or that is longer than `limit`
        (what its array can need), before anything is allocated for it. The caller names the key (`naming`)."""
        offset, length = span
        size = self.sizes.get(tar_url)
        if size is None:
            if self.is_local(tar_url):
                self._file(tar_url)  # records its size
            size = self.sizes.setdefault(tar_url, -1)  # remote: a read returns at most what the object holds
        if offset < 0 or length <= 0:
            raise ValueError(f"the index gives the byte range {offset}+{length}")
        if limit is not None and length > limit:
            raise ValueError(f"the index gives a {length}-byte range (bytes {offset}-{offset + length}); "
                             f"the sample needs at most {limit}")
        if offset + length > size >= 0:
            raise ValueError(f"the index gives bytes {offset}-{offset + length}, past the end of the tar ({size} "
                             "bytes)")

    def fetch(self, ranges: list[tuple[str, tuple[int, int], str]]) -> None:
        """Fetch the given (tar URL, (offset, length), key) ranges of remote tars with one fsspec `cat_ranges` call
        per filesystem (s3fs and other async filesystems send the requests concurrently); `read` then serves them
        from memory, once each. Local ranges are skipped: they are read with os.preadv when needed. Every range was
        bounded by `check_span` first (what its array can need: latents by their bucket, text by max_tokens rows of
        the tar's T5 width), so a lying index row cannot pull more than that into memory."""
        groups: dict[int, tuple[Any, list[tuple[str, str, tuple[int, int], str]]]] = {}
        for url, span, key in ranges:
            if not self.is_local(url) and (url, span) not in self.fetched:
                fs, path = filesystem(url)
                groups.setdefault(id(fs), (fs, []))[1].append((url, path, span, key))
        for fs, items in groups.values():
            got = fs.cat_ranges([p for _, p, _, _ in items], [sp[0] for _, _, sp, _ in items],
                                [sp[0] + sp[1] for _, _, sp, _ in items], on_error="return")
            for (url, _, (offset, length), key), data in zip(items, got, strict=True):
                if isinstance(data, BaseException):
                    error = SourceError(f"{url}: reading bytes {offset}-{offset + length} failed (sample {key}): "
                                        f"{type(data).__name__}: {data}")
                    error.transient = is_transient(data)
                    raise error from data
                if len(data) != length:
                    raise FeatureError(f"{url}: sample {key}: short read at byte {offset} ({len(data)} of {length} "
                                       "bytes): truncated shard?")
                self.fetched[(url, (offset, length))] = data

    def read(self, tar_url: str, span: tuple[int, int]) -> memoryview:
        data = self.fetched.pop((tar_url, span), None)
        if data is not None:
            return memoryview(data)
        offset, length = span
        if length > len(self.buffer):
            self.check_span(tar_url, span)  # never allocate for bytes the tar does not have
            self.buffer = bytearray(length)
        view = memoryview(self.buffer)[:length]
        self._pread(tar_url, offset, view)
        return view

    def _file(self, tar_url: str) -> Any:
        """An open tar: an OS file descriptor (int) for local files, an fsspec file otherwise."""
        f = self.open.get(tar_url)
        if f is None:
            if not self.is_local(tar_url):
                f = self.open[tar_url] = open_url(tar_url, "rb")
                return f
            path = filesystem(tar_url)[1]
            f = os.open(path, os.O_RDONLY)
            info = os.fstat(f)
            if not stat.S_ISREG(info.st_mode):
                os.close(f)
                kind = IsADirectoryError if stat.S_ISDIR(info.st_mode) else ValueError
                raise kind(f"{tar_url}: not a regular file")
            self.open[tar_url], self.sizes[tar_url] = f, info.st_size
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
                   ) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
        """(shape, fortran order, dtype, file offset of the data) of one sample's .npy member, from the first bytes
        of its range; None where the headers do not fit there or are not plain ustar, or the tar is remote (then
        read the range whole: it was fetched with the batch)."""
        if not self.is_local(tar_url):
            return None
        head = self.read(tar_url, (span[0], min(span[1], HEAD_BYTES)))
        spans = member_spans(head, key, span[1])
        if spans is None or ext not in spans or spans[ext][0] + min(spans[ext][1], 1024) > len(head):
            return None
        start, size = spans[ext]
        shape, fortran, dtype, data = npy_layout(head[start:start + size])
        if size - data != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{tar_url}: {key}.{ext} holds {size - data} data bytes, its header says "
                             f"{math.prod(shape) * dtype.itemsize}")
        return shape, fortran, dtype, span[0] + start + data

    def locate_array(self, tar_url: str, span: tuple[int, int], key: str, ext: str) -> LocatedArray:
        """One sample's .npy member `ext`, found by its headers in the sample's byte range (`locate_npy`) or, where
        those are not plain ustar, read and parsed whole."""
        return LocatedArray(self, tar_url, span, key, ext)

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

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.open.values():
            os.close(f) if isinstance(f, int) else f.close()


class LocatedArray:
    """A sample's array in a tar (`TarReader.locate_array`): its header's shape, fortran order and dtype, and
    `read_into` for its first rows. Nothing of its data is read before the caller has checked the header."""

    def __init__(self, files: TarReader, tar_url: str, span: tuple[int, int], key: str, ext: str) -> None:
        self.files, self.url, self.key, self.ext = files, tar_url, key, ext
        found = files.locate_npy(tar_url, span, key, ext)
        self.array: np.ndarray | None = None
        if found is None:  # copied out of the reader's reused buffer, which the next read overwrites
            member = sample_members(files.read(tar_url, span), key).get(ext)
            if member is None:
                raise ValueError(f"no {key}.{ext} member in the sample's range")
            self.shape, self.fortran, self.dtype, _ = npy_layout(member)
            self.array, self.offset = np.array(load_npy(member)), -1
        else:
            self.shape, self.fortran, self.dtype, self.offset = found

    def read_into(self, dest: np.ndarray) -> None:
        """Its first len(dest) rows into `dest`: straight from the file where located (no intermediate copy)."""
        if self.fortran or self.dtype != dest.dtype or self.shape[1:] != dest.shape[1:] or len(dest) > self.shape[0]:
            raise ValueError(f"{self.key}.{self.ext}: {self.dtype}{list(self.shape)} read into {dest.dtype}"
                             f"{list(dest.shape)}")  # the caller checks first: a guard, never a cast
        if self.array is None:
            self.files.read_into(self.url, self.offset, dest)
        else:
            dest[...] = self.array[:len(dest)]


def _read_into(f: Any, view: memoryview) -> int:
    data = f.read(len(view))
    view[: len(data)] = data
    return len(data)
