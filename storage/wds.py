"""Webdataset shard writing that never leaves an empty or unreadable tar behind.

    with ShardTarWriter(url) as w:          # writes to a temporary name
        w.write({"__key__": "sa_1", "t5.npy": arr, "meta.json": {...}})
    # published as `url` only if at least one sample was written and the tar closed cleanly

Keys must not contain dots (webdataset splits member names at the first dot of the basename).
"""

from __future__ import annotations

from typing import Any

import webdataset as wds

from storage.commit import commit_shard
from storage.urls import filesystem


class EmptyShardError(ValueError):
    """Raised on close when no sample was written: an empty tar is never published."""


class ShardTarWriter:
    """Write samples into one tar at `url` (local or s3); published atomically on a clean close."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.count = 0
        self._commit = commit_shard(url)
        self._file = None
        self._tar: wds.TarWriter | None = None

    def __enter__(self) -> ShardTarWriter:
        tmp = self._commit.__enter__()
        fs, path = filesystem(tmp)
        self._file = fs.open(path, "wb")
        self._tar = wds.TarWriter(self._file)
        return self

    def write(self, sample: dict[str, Any]) -> tuple[int, int]:
        """Append one sample; returns (offset, length) of its members' byte range in the tar, for range reads
        (`read_sample`)."""
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"sample key {key!r} must be a non-empty string without dots")
        assert self._tar is not None, "use ShardTarWriter as a context manager"
        start = self._tar.tarstream.offset  # the archive position (the file itself is written in 10 KiB records)
        self._tar.write(sample)
        self.count += 1
        return start, self._tar.tarstream.offset - start

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self._tar is not None
        error = exc
        try:
            self._tar.close()  # also closes the underlying file
            if error is None and self.count == 0:
                raise EmptyShardError(f"{self.url}: no samples written; an empty shard is not published")
        except Exception as e:  # noqa: BLE001 - keep the first error; the temp file is abandoned below
            error = error or e
        if error is None:
            self._commit.__exit__(None, None, None)  # publish
            return False
        self._commit.__exit__(type(error), error, error.__traceback__)  # deletes the temp file
        if error is not exc:
            raise error
        return False


def read_sample(data: bytes) -> dict[str, bytes]:
    """The members of one sample from its byte range (as `ShardTarWriter.write` returned it): {ext: bytes}."""
    import io
    import tarfile

    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf:
            if info.isreg():
                out[info.name.split(".", 1)[1]] = tf.extractfile(info).read()
    return out
