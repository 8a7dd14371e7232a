"""Stream members out of a (possibly compressed, possibly remote) tar archive without extracting anything.

Each regular file comes out as a `TarEntry` with its bytes. Members that must never be followed or written
(symlinks, hard links, devices, FIFOs, absolute or `..` names) come out as entries with an `error` and no data.
An archive cut short (mid-member, mid-header, or missing its end-of-archive blocks) ends with one entry whose
`truncated` flag is set: every complete member before the cut has already been yielded.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from storage.urls import filesystem, open_url, protocol_of

STREAM_BUFFER = 1 << 16  # tarfile's stream reader copies its leftover buffer on every read: keep it small
# Filesystems whose files seek backwards cheaply: plain tars on them are read in random-access mode ("r:"), about
# twice as fast as streaming. HTTP files (SA-1B CDN links) claim to seek but cannot go back, so they stream.
SEEKABLE_PROTOCOLS = {"file", "local", "s3", "s3a", "gs", "gcs", "memory"}
_ZERO_BLOCK = tarfile.NUL * tarfile.BLOCKSIZE


@dataclass
class TarEntry:
    """One archive member. `name` has any leading './' removed."""

    name: str
    data: bytes | None = None
    offset: int | None = None  # byte offset of the data in the (uncompressed) archive
    error: str | None = None
    truncated: bool = False


class _HeaderTrackingInfo(tarfile.TarInfo):
    """Remembers the last header block read, so a missing end-of-archive marker can be told from a clean end.

    tarfile treats a short or missing header after the first member as the end of the archive, which would make a
    tar cut exactly between two members look complete.
    """

    @classmethod
    def fromtarfile(cls, tf):  # type: ignore[override]
        block = tf.fileobj.read(tarfile.BLOCKSIZE)
        tf.last_header_block = block
        info = cls.frombuf(block, tf.encoding, tf.errors)
        info.offset = tf.fileobj.tell() - tarfile.BLOCKSIZE
        return info._proc_member(tf)


def normalize_member_name(name: str) -> tuple[str, str | None]:
    """(name without leading './', reason it is unsafe or None)."""
    clean = name
    while clean.startswith("./"):
        clean = clean[2:]
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        return clean, f"absolute member path {name!r} refused"
    if ".." in clean.split("/") or "\\" in clean or "\x00" in clean:
        return clean, f"unsafe member path {name!r} refused"
    return clean, None


def _kind(info: tarfile.TarInfo) -> str | None:
    if info.issym():
        return f"symlink to {info.linkname!r}"
    if info.islnk():
        return f"hard link to {info.linkname!r}"
    if info.ischr() or info.isblk():
        return "device file"
    if info.isfifo():
        return "FIFO"
    return None


def iter_tar(url: str, *, compressed: bool | None = None) -> Iterator[TarEntry]:
    """Yield every member of the tar at `url` in archive order (see module doc for the error entries).

    `compressed=None` lets tarfile detect gzip/bz2/xz; `compressed=False` promises a plain tar, which is then read
    in random-access mode where the filesystem allows. Raises SourceError only when the URL cannot be opened.
    """
    fs, _ = filesystem(url)
    if compressed is False and protocol_of(fs) in SEEKABLE_PROTOCOLS:
        mode, kwargs = "r:", {}
    else:
        mode, kwargs = ("r|*" if compressed is None else "r|gz" if compressed else "r|"), {"bufsize": STREAM_BUFFER}
    raw = open_url(url, "rb")
    count = 0
    try:
        try:
            tf = tarfile.open(fileobj=raw, mode=mode, tarinfo=_HeaderTrackingInfo, **kwargs)
        except (tarfile.TarError, EOFError, OSError) as e:
            yield TarEntry(name="", error=f"not a readable tar archive: {e}", truncated=True)
            return
        is_plain = mode == "r:" or getattr(tf.fileobj, "comptype", "tar") == "tar"
        try:
            for info in tf:
                name, unsafe = normalize_member_name(info.name)
                if info.isdir():
                    continue
                special = _kind(info)
                if unsafe or special or not info.isreg():
                    reason = unsafe or f"{special or 'non-regular member'} refused: {info.name!r}"
                    yield TarEntry(name=name, error=reason)
                    continue
                member = tf.extractfile(info)
                data = member.read() if member is not None else b""
                count += 1
                yield TarEntry(name=name, data=data, offset=info.offset_data if is_plain else None)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            yield TarEntry(name="", error=f"archive truncated or corrupt after {count} members: {e}", truncated=True)
            return
        last = getattr(tf, "last_header_block", None)
        if last != _ZERO_BLOCK:
            yield TarEntry(
                name="", error=f"archive truncated after {count} members: no end-of-archive marker", truncated=True
            )
    finally:
        raw.close()


def member_stem(name: str) -> tuple[str, str]:
    """('000/abc', '.jpg') style split of a member name into path-without-extension and lowercase extension."""
    root, ext = posixpath.splitext(name)
    return root, ext.lower()
