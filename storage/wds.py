"""Webdataset shard writing that never leaves an empty or unreadable tar behind.

    with ShardTarWriter(url) as w:          # writes to a temporary name
        w.write({"__key__": "sa_1", "t5.npy": arr, "meta.json": {...}})
    # published as `url` only if at least one sample was written and the tar closed cleanly

Keys must not contain dots (webdataset splits member names at the first dot of the basename). Members get a fixed
integer mtime, so the tar holds plain ustar headers (no pax records) and the same samples give the same bytes.

Reading one sample back from its byte range (`ShardTarWriter.write` returns it; feature indexes store it):

    members = sample_members(data, key)     # {ext: memoryview}, no copy
    arr = load_npy(members["t5.npy"])       # read-only ndarray view; never unpickles
"""

from __future__ import annotations

import functools
import io
import math
import tarfile
from typing import TYPE_CHECKING, Any

import numpy as np

from storage.commit import commit_shard
from storage.urls import filesystem

if TYPE_CHECKING:
    import webdataset as wds

MTIME = 0  # fixed member mtime: reproducible shards, and ustar headers without a pax record per member


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
        self.members: dict[str, int] = {}  # the last sample's {ext: tar offset of the member's header}

    def __enter__(self) -> ShardTarWriter:
        tmp = self._commit.__enter__()
        fs, path = filesystem(tmp)
        self._file = fs.open(path, "wb")
        import webdataset as wds  # here, not at the top: webdataset imports torch, which ingest never needs

        self._tar = wds.TarWriter(self._file, mtime=MTIME)
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
        end = self._tar.tarstream.offset
        self.members = _member_offsets(sample, start, end)
        return start, end - start

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


def _member_offsets(sample: dict[str, Any], start: int, end: int) -> dict[str, int]:
    """{ext: offset of its header} for a sample just written as plain ustar members (one 512-byte header each, in
    sorted order, as webdataset's TarWriter writes them); {} when the layout is anything else (a value the writer
    encodes, or a long name that needed an extra header): readers then parse the range instead."""
    members = sorted((k, v) for k, v in sample.items() if k != "__key__")
    if not all(isinstance(v, (bytes, bytearray, memoryview)) for _, v in members):
        return {}
    out, pos = {}, start
    for ext, value in members:
        out[ext] = pos
        pos += 512 + -(-memoryview(value).nbytes // 512) * 512
    return out if pos == end else {}


def read_sample(data: bytes) -> dict[str, bytes]:
    """The members of one sample from its byte range, as bytes: {ext: bytes}."""
    return {ext: bytes(view) for ext, view in sample_members(data).items()}


class CorruptSampleError(ValueError):
    """A sample's byte range is not what its index says: a bad header, a truncated member, another key."""


def sample_members(data: bytes | bytearray | memoryview, key: str | None = None) -> dict[str, memoryview]:
    """The members of one sample from its byte range: {ext: view of the member's bytes}, without copying.

    Plain ustar headers (what `ShardTarWriter` writes) are parsed here, checksum included; any other header (pax
    records, GNU long names, from other writers) sends the whole range through `tarfile`. With `key`, every member
    must belong to that key, which catches an index that points at the wrong place."""
    view = memoryview(data)
    spans = member_spans(view, key)
    if spans is None:
        return _members_via_tarfile(data, key)
    if not spans:
        raise CorruptSampleError("no tar member in the sample range")
    return {ext: view[start:start + size] for ext, (start, size) in spans.items()}


def member_spans(head: memoryview, key: str | None = None, length: int | None = None
                 ) -> dict[str, tuple[int, int]] | None:
    """{ext: (start, size)} of the members of a sample range of `length` bytes (default: all of `head`), from the
    headers found in `head`, its first bytes; None if a header is not a plain ustar file header (use tarfile). With
    a partial head, members whose header lies past it are not listed."""
    length = len(head) if length is None else length
    out: dict[str, tuple[int, int]] = {}
    pos = 0
    while pos + 512 <= min(len(head), length):
        header = bytes(head[pos:pos + 512])
        if header == _END_BLOCK:
            return out  # end-of-archive blocks
        member = ustar_member(header, f"at byte {pos} of the sample range")
        if member is None:
            return None
        name, size = member
        start = pos + 512
        if start + size > length:
            raise CorruptSampleError(f"tar member {name!r} runs past the end of the sample range")
        out[_ext(name, key)] = (start, size)
        pos = start + -(-size // 512) * 512
    if len(head) >= length and pos != length:  # a whole range ends exactly where its last member's padding does
        raise CorruptSampleError(f"the sample range ends inside a tar member or header (byte {pos} of {length})")
    return out


_END_BLOCK = bytes(512)


def ustar_member(header: bytes, where: str = "") -> tuple[str, int] | None:
    """(name, size) of a plain ustar file header (512 bytes), checksum checked; None for any other kind (pax
    records, GNU long names, links, base-256 sizes)."""
    if header[156] not in (0x30, 0) or header[124] & 0x80:
        return None
    if _octal(header[148:156]) != sum(header) - sum(header[148:156]) + 256:
        raise CorruptSampleError(f"bad tar header checksum {where}".rstrip())
    name = header[:100].split(b"\0", 1)[0]
    if header[345] != 0 and header[257:262] == b"ustar":
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode(), _octal(header[124:136])


def _octal(field: bytes) -> int:
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise CorruptSampleError(f"bad tar header number {field!r}") from None


def _ext(name: str, key: str | None) -> str:
    stem, _, ext = name.partition(".")
    if not ext or (key is not None and stem.rsplit("/", 1)[-1] != key):
        raise CorruptSampleError(f"tar member {name!r} does not belong to sample {key!r}")
    return ext


def _members_via_tarfile(data: bytes | bytearray | memoryview, key: str | None) -> dict[str, memoryview]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf:
            if info.isreg():
                out[_ext(info.name, key)] = memoryview(tf.extractfile(info).read())
    return out


def load_npy(data: bytes | bytearray | memoryview) -> np.ndarray:
    """An .npy member as a read-only array viewing `data` (no copy). Object arrays are refused: nothing is ever
    unpickled."""
    view = memoryview(data)
    shape, fortran, dtype, start = npy_layout(view)
    count = math.prod(shape)
    if len(view) - start != count * dtype.itemsize:
        raise ValueError(f".npy data holds {len(view) - start} bytes, its header says {count * dtype.itemsize}")
    arr = np.frombuffer(view, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def npy_layout(head: memoryview) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of an .npy from its first bytes. The header is parsed by numpy
    (`read_array_header_*`) and cached, since a shard repeats few; object dtypes are refused."""
    if bytes(head[:6]) != b"\x93NUMPY" or len(head) < 12:
        raise ValueError("not an .npy array (bad magic)")
    start = 10 + int.from_bytes(head[8:10], "little") if head[6] == 1 else 12 + int.from_bytes(head[8:12], "little")
    if start > len(head):
        raise ValueError(f".npy header of {start} bytes runs past the {len(head)} bytes given")
    return (*_npy_header(bytes(head[:start])), start)


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy version {version}")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("refusing an .npy object array (it would need unpickling)")
    return tuple(shape), bool(fortran), dtype
